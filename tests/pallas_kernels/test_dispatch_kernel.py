"""packed_einsum: the model's weight products on the kernels equal a float64 numpy einsum.

Every spec the models use goes through the flatten-and-call rule with packed QArray / BCQArray
weights (kernels in interpret mode; the dispatch log shows the kernel ran, no fallback); specs
outside the rule raise with implementation="pallas" and fall back to dequantize + einsum,
recorded, with "auto" (the default, what the models' impl="pallas" uses).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common, dispatch
from pallas_kernels.testing import assert_close, jit_fast
from uniql_jax.quant import rtn
from uniql_jax.quant.formats import bcq

# (spec, x shape, w shape, quantized axis, group size): the model products (attention q, o,
# mlp down, a [heads, channels, D] product) plus a transposed-output one.
RULE_CASES = [
    pytest.param("btd,dkgcp->btkgcp", (1, 3, 64), (64, 2, 3, 2, 5), 0, 32, id="q-proj"),
    pytest.param("btkgr,kgrd->btd", (1, 2, 2, 3, 64), (2, 3, 64, 24), 2, 32, id="o-proj"),
    pytest.param("bthc,hcd->btd", (2, 1, 2, 64), (2, 64, 24), 1, 64, id="heads-channels"),
    pytest.param("tbf,fd->dbt", (3, 1, 128), (128, 40), 0, 32, id="transposed-out"),
]


# one compiled program per call instead of op-by-op dispatch: keeps the suite fast on CPU
_quantize = jit_fast(rtn.quantize_rtn, static_argnames=("bits", "group_size", "axis", "zero_point"))


def quantized(shape, axis, group_size, seed, zero_point=False):
    rng = np.random.default_rng(seed)
    return _quantize(jnp.asarray(rng.standard_normal(shape, np.float32) + 0.3), bits=4, group_size=group_size,
                     axis=axis, zero_point=zero_point)


def check(spec, x, w, ran, implementation="auto"):
    """packed_einsum == float64 einsum, and the dispatch log (a fresh trace) is exactly `ran`."""
    with common.dispatch_log() as log:
        got = jit_fast(functools.partial(dispatch.packed_einsum, spec, implementation=implementation))(x, w)
    assert log.counts == ran, (log.counts, log.fallback_reasons)
    dense = np.asarray(w.dequantize(jnp.float32), np.float64)
    x64 = np.asarray(x, np.float64)
    want, scale = np.einsum(spec, x64, dense), np.einsum(spec, np.abs(x64), np.abs(dense))
    assert got.dtype == x.dtype
    assert_close(got, want, atol=1e-6 * scale + 1e-6, rtol=1e-6, what=spec)


@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize("spec,x_shape,w_shape,axis,group_size", RULE_CASES)
def test_packed_einsum_rule_specs(spec, x_shape, w_shape, axis, group_size, zero_point):
    """Every model spec on the W4A16 kernel (logged, no fallback), with or without zero point."""
    w = quantized(w_shape, axis, group_size, seed=len(spec) + sum(w_shape), zero_point=zero_point)
    assert (w.offset is not None) == zero_point
    assert dispatch.plan_spec(spec, len(x_shape), len(w_shape), axis) is not None
    x = jnp.asarray(np.random.default_rng(sum(x_shape)).standard_normal(x_shape, np.float32))
    for implementation in ("auto", "pallas"):
        check(spec, x, w, {"w4a16/pallas": 1}, implementation)
    check(spec, x, w, {"packed_einsum/xla": 1}, "xla")


def test_packed_einsum_bcq_weight():
    """A BCQ o-proj [K, G, R, D] quantized along R goes through the BCQ kernel."""
    w = bcq.from_uniform(quantized((2, 1, 128, 24), 2, 64, seed=3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 2, 1, 128), np.float32))
    check("btkgr,kgrd->btd", x, w, {"bcq/pallas": 1, "bcq-dequant/pallas": 1}, "pallas")


def test_packed_einsum_outside_the_rule_raises_with_pallas_and_falls_back_with_auto():
    """Contraction axis not leading in w ("btd,kd->btk", quantized along d): "pallas" refuses,
    "auto" runs dequantize + einsum and records why."""
    w = quantized((24, 64), 1, 32, seed=5)
    assert dispatch.plan_spec("btd,kd->btk", 3, 2, 1) is None
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 64), np.float32))
    with pytest.raises(ValueError, match="packed_einsum: implementation='pallas'.*leading-contraction rule"):
        dispatch.packed_einsum("btd,kd->btk", x, w, implementation="pallas")
    check("btd,kd->btk", x, w, {"packed_einsum/fallback": 1})
    with common.dispatch_log() as log:
        dispatch.packed_einsum("btd,kd->btk", x, w, implementation=None)
    assert log.fallback_reasons == {"packed_einsum: spec btd,kd->btk outside the leading-contraction rule": 1}


def test_packed_einsum_kernel_refusal_propagates():
    """A rule spec whose 2-D product the kernel cannot take (8-bit): "pallas" raises from the
    w4a16 dispatcher, "auto" falls back there."""
    w = rtn.quantize_rtn(jnp.asarray(np.random.default_rng(4).standard_normal((64, 24), np.float32)), bits=8,
                         group_size=32, axis=0)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 64), np.float32))
    with pytest.raises(ValueError, match="w4a16: implementation='pallas'.*bits=8"):
        dispatch.packed_einsum("btd,dn->btn", x, w, implementation="pallas")
    check("btd,dn->btn", x, w, {"w4a16/fallback": 1})


def test_plan_spec_rejects_non_products():
    assert dispatch.plan_spec("btd,dn->bn", 3, 2, 0) is None  # x axis t summed away
    assert dispatch.plan_spec("bd,bdn->bn", 2, 3, 1) is None  # batch axis shared with w
    assert dispatch.plan_spec("btd,dkr->btkr", 3, 3, 2) is None  # quantized axis not the contraction one
    assert dispatch.plan_spec("...d,dn->...n", 2, 2, 0) is None
    plan = dispatch.plan_spec("tbf,fd->dbt", 3, 2, 0)
    assert plan.n_contract == 1 and plan.x_perm == (0, 1, 2) and plan.out_perm == (2, 1, 0)


def test_dense_weight_is_plain_einsum():
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((2, 3, 16), (16, 8)))
    with common.dispatch_log() as log:
        got = dispatch.packed_einsum("btd,dn->btn", x, w)
    assert log.counts == {"packed_einsum/xla": 1}
    np.testing.assert_allclose(np.asarray(got), np.einsum("btd,dn->btn", np.asarray(x), np.asarray(w)), rtol=1e-5,
                               atol=1e-5)
