"""`experiments.evaluate` over a rate grid: one compiled evaluation program per distinct block shape
(plus the embedding and the head), the count reported, and each rate's perplexity equal to that of
`uq.load` at that rate."""

import logging

import uniql_jax as uq
from experiments import evaluate
from tests.experiments.conftest import SEQ_LEN
from uniql_jax import data
from uniql_jax.models.stacks import block_key
from uniql_jax.pipeline import load_saved_tokenizer


def test_one_compile_per_distinct_shape_and_reported(tiny_run, caplog):
    # tiny_run stores 0.15 and 0.25 with the same sizes: four rates, three model shapes, whose blocks
    # have 9 distinct shapes (two layers alike at full rank; 0.35 reuses an MLP width of 0.15)
    info = uq.checkpoint.read_info(tiny_run / "checkpoint")
    block_shapes = {block_key(info.cfg, b) for r in (0.0, 0.15, 0.35) for b in info.table[r]}
    assert len(block_shapes) == 9
    with caplog.at_level(logging.INFO, logger="evaluate"):
        rows, compiles = evaluate.run(["--ckpt", str(tiny_run), "--rates", "0,0.15,0.25,0.35", "--json"])
    assert [r["rate"] for r in rows] == [0.0, 0.15, 0.25, 0.35]
    assert compiles == 9 + 2  # and the embedding and the head, once
    assert "4 rates evaluated with 11 compiled evaluation programs" in caplog.text
    assert rows[1]["ppl"] == rows[2]["ppl"] and len({r["ppl"] for r in rows}) == 3

    # a second grid over the same shapes compiles nothing more
    rows_again, compiles_again = evaluate.run(["--ckpt", str(tiny_run), "--rates", "0.25,0.35"])
    assert compiles_again == 0
    assert [r["ppl"] for r in rows_again] == [rows[2]["ppl"], rows[3]["ppl"]]

    # the in-memory rate switch evaluates the same model as a load at that rate (the stored eval text)
    tokens = data.load_tokens(tiny_run / "eval.txt", load_saved_tokenizer(tiny_run))
    for row in rows:
        cfg, params = uq.load(tiny_run / "checkpoint", rate=row["rate"])
        assert uq.perplexity(cfg, params, tokens, seq_len=SEQ_LEN, batch_size=8) == row["ppl"]
