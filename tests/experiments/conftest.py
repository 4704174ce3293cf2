"""A tiny compressed run folder (checkpoint + tokenizer + evaluation text) built without running compress."""

import shutil

import pytest

from uniql_jax.paths import DEFAULTS, TINYSTORIES

SEQ_LEN = 32


def tiny_table(cfg):
    """Rates 0, 0.15, 0.25, 0.35 of a 2-layer llama; 0.15 and 0.25 keep the same sizes (one shape, two rates)."""
    from uniql_jax.config import AttentionBlock, MLPBlock

    mid = (AttentionBlock(0, 4, 0, 12), MLPBlock(0, 48), AttentionBlock(1, 3, 0, 16), MLPBlock(1, 40))
    low = (AttentionBlock(0, 3, 0, 8), MLPBlock(0, 40), AttentionBlock(1, 3, 0, 12), MLPBlock(1, 32))
    return {0.0: cfg.blocks, 0.15: mid, 0.25: mid, 0.35: low}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder laid out as compress writes it: checkpoint/ (random 2-layer llama, vocabulary of the
    default tokenizer), tokenizer/ (the llama default's), and eval.txt, recorded as its evaluation source."""
    import uniql_jax as uq
    from tests.helpers import random_params
    from uniql_jax import data
    from uniql_jax.config import AttentionBlock, MLPBlock

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = uq.ModelConfig(arch="llama", vocab_size=1024, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16,
                         rotary_dim=16, intermediate_size=64,
                         blocks=tuple(b for i in range(2) for b in (AttentionBlock(i, 8, 0, 16), MLPBlock(i, 64))))
    (run / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULTS / "llama" / name, run / "tokenizer" / name)
    eval_text = "\n\n".join(data.load_documents(TINYSTORIES, part="heldout")[-6:])
    (run / "eval.txt").write_text(eval_text)
    uq.save(run / "checkpoint", cfg, random_params(cfg, seed=0), table=tiny_table(cfg),
            meta={"arch": "llama", "model": "random-init", "seq_len": SEQ_LEN, "eval_source": str(run / "eval.txt")})
    return run
