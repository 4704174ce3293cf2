"""uniql_jax.pipeline.compress, the library form of `experiments.compress`: its settings reach the model."""

import jax
import numpy as np
import pytest

from uniql_jax import pipeline
from uniql_jax.compress.prune import prune
from uniql_jax.eval import perplexity
from uniql_jax.quant.formats.packed import is_packed
from uniql_jax.quant.formats.qarray import QArray, ZeroPointQArray

SMALL = dict(arch="llama", quantizer="rtn", calib_samples=4, seq_len=32, rates=(0.0, 0.25), eval_windows=4)


def packed_leaves(params):
    return [x for x in jax.tree.leaves(params, is_leaf=is_packed) if is_packed(x)]


def test_zero_point_reaches_every_packed_weight_and_the_report():
    config = pipeline.CompressConfig(**SMALL, zero_point=True)
    inputs = pipeline.load_inputs(config)
    cfg, params, table, report = pipeline.compress(config, inputs)
    leaves = packed_leaves(params)
    assert leaves and all(isinstance(x, ZeroPointQArray) for x in leaves)
    assert report["zero_point"] is True and report["quantizer_options"] == {}
    # the report's perplexity at 25 % is the one of the returned model sliced to that rate
    cfg_p, params_p = prune(cfg, params, 0.25, table)
    ppl = perplexity(cfg_p, params_p, inputs.eval_tokens, seq_len=config.seq_len)
    assert np.isclose(ppl, next(r["ppl"] for r in report["rates"] if r["rate"] == 0.25), rtol=1e-6)

    symmetric = pipeline.compress(pipeline.CompressConfig(**SMALL), inputs)[1]
    assert all(type(x) is QArray for x in packed_leaves(symmetric))


def test_act_order_reaches_every_gptq_solve_and_the_report(monkeypatch):
    from uniql_jax.quant import gptq

    seen = []
    real = gptq.gptq_quantize

    def spy(*args, **kwargs):
        seen.append(kwargs.get("act_order"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize", spy)
    config = pipeline.CompressConfig(**{**SMALL, "quantizer": "gptq"}, act_order=True, tied_head="gptq")
    report = pipeline.compress(config)[3]
    assert report["act_order"] is True
    assert seen and all(seen), seen  # every linear and the tied head


def test_finetune_micro_batch_splits_the_step_into_accumulated_micro_batches():
    """`finetune_micro_batch` sets the training step's shape: FINETUNE_BATCH windows as
    FINETUNE_BATCH / micro accumulated micro-batches (the report's train config); a size that
    does not divide the step is refused before anything runs."""
    config = pipeline.CompressConfig(**{**SMALL, "quantizer": "none"}, finetune_steps=1, finetune_micro_batch=2)
    report = pipeline.compress(config, pipeline.load_inputs(config))[3]
    train = report["finetune"]["config"]["train"]
    assert (train["batch_size"], train["grad_accum"]) == (2, pipeline.FINETUNE_BATCH // 2)
    with pytest.raises(ValueError, match="must divide"):
        pipeline.CompressConfig(**SMALL, finetune_micro_batch=3)
