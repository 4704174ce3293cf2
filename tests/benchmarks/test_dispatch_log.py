"""`pallas_kernels.common.dispatch_log` tells which implementation each dispatcher ran, so the
benchmarks can prove a "pallas" figure is a kernel's (the GPU suite relies on it).

Traced only (`jax.eval_shape`): the log counts at trace time, no kernel needs to run here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import common, dispatch
from pallas_kernels.bcq import api as bcq_api
from pallas_kernels.rope import api as rope_api
from pallas_kernels.w4a16 import api as w4a16_api
from uniql_jax.quant.formats.bcq import BCQArray
from uniql_jax.quant.formats.qarray import QArray

S = jax.ShapeDtypeStruct


def qarray(kin, n, group_size, bits=4):
    return QArray(S((kin * bits // 8, n), jnp.uint8), S((kin // group_size, n), jnp.float16), bits, group_size, 0,
                  (kin, n))


def trace(fn, *args):
    with common.dispatch_log() as log:
        jax.eval_shape(fn, *args)
    return log


def test_w4a16_kernel_and_fallback_are_told_apart():
    x = S((1, 256), jnp.bfloat16)
    pallas = lambda x, w: w4a16_api.matmul(x, w, implementation="pallas")  # noqa: E731
    assert trace(pallas, x, qarray(256, 64, 32)).counts == {"w4a16/pallas": 1}
    auto = lambda x, w: w4a16_api.matmul(x, w, implementation="auto")  # noqa: E731
    assert trace(auto, x, qarray(256, 64, 32)).counts == {"w4a16/pallas": 1}
    log = trace(auto, x, qarray(256, 64, 32, bits=8))  # the kernel is 4-bit only: reference runs
    assert log.counts == {"w4a16/fallback": 1}
    assert list(log.fallback_reasons) == ["w4a16: bits=8 (kernel is 4-bit only)"]
    with pytest.raises(ValueError, match="bits=8"):  # asked for explicitly: no silent fallback
        trace(pallas, x, qarray(256, 64, 32, bits=8))
    assert trace(lambda x, w: w4a16_api.matmul(x, w), x, qarray(256, 64, 32)).counts == {"w4a16/xla": 1}


def bcq(kin, n, gs, bits=3):
    return BCQArray(S((kin // 8, bits, n), jnp.uint8), S((kin // gs, bits, n), jnp.float16),
                    S((kin // gs, n), jnp.float16), bits, gs, 0, (kin, n))


def test_bcq_paths_and_fallback():
    pallas = lambda x, w: bcq_api.matmul(x, w, implementation="pallas")  # noqa: E731
    assert trace(pallas, S((1, 256), jnp.bfloat16), bcq(256, 64, 32)).counts == {"bcq/pallas": 1, "bcq-lut/pallas": 1}
    assert trace(pallas, S((4, 256), jnp.bfloat16), bcq(256, 64, 32)).counts == {"bcq/pallas": 1,
                                                                                 "bcq-dequant/pallas": 1}
    log = trace(lambda x, w: bcq_api.matmul(x, w, implementation=None), S((4, 192), jnp.bfloat16),
                bcq(192, 64, 24))  # group size not a power of two
    assert log.counts == {"bcq/fallback": 1} and len(log.fallback_reasons) == 1
    with pytest.raises(ValueError, match="group_size 24"):
        trace(pallas, S((4, 192), jnp.bfloat16), bcq(192, 64, 24))


def test_packed_einsum_spec_outside_the_rule_falls_back_and_says_so():
    w = qarray(256, 64, 32)
    x = S((2, 3, 256), jnp.bfloat16)
    assert trace(lambda x, w: dispatch.packed_einsum("btd,df->btf", x, w), x, w).counts == {"w4a16/pallas": 1}
    # the contraction on w's *last* axis breaks the leading-contraction rule: dequantize + einsum
    log = trace(lambda x, w: dispatch.packed_einsum("btf,df->btd", x, w), S((2, 3, 64), jnp.bfloat16), w)
    assert log.counts == {"packed_einsum/fallback": 1}
    with pytest.raises(ValueError, match="leading-contraction rule"):
        trace(lambda x, w: dispatch.packed_einsum("btf,df->btd", x, w, implementation="pallas"),
              S((2, 3, 64), jnp.bfloat16), w)


def test_rope_and_nested_logs():
    q, k = S((1, 2, 2, 2, 2, 4), jnp.float32), S((1, 2, 2, 2, 4), jnp.float32)
    pos, pairs, freq = S((1, 2), jnp.int32), S((2, 4), jnp.int32), S((8,), jnp.float32)
    with common.dispatch_log() as outer:
        inner = trace(lambda *a: rope_api.rope(*a, implementation="pallas"), q, k, pos, pairs, freq)
        jax.eval_shape(lambda *a: rope_api.rope(*a), q, k, pos, pairs, freq)
    assert inner.counts == {"rope/pallas": 1}
    assert outer.counts == {"rope/pallas": 1, "rope/xla": 1}
    assert not common._DISPATCH_LOGS  # every log removed on exit


def test_default_interpret_override():
    assert common.resolve_interpret(None) is True  # CPU
    with common.default_interpret(False):
        assert common.resolve_interpret(None) is False
        assert common.resolve_interpret(True) is True  # an explicit choice wins
    assert common.resolve_interpret(None) is True
