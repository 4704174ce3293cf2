"""BCQ matmul: every implementation against a float64 numpy oracle.

Weights are packed by the test from known bits (plane byte r holds rows 8r..8r+7, row 8r+j
in bit j), checked against `bcq.dequantize`; the oracle works from those bits. One shared
suite (`BCQCases`) runs through the dispatcher `api.matmul` once per implementation: "xla",
each Pallas kernel path in interpret mode (LUT-GEMM for batch 1, dequantize-in-kernel gemv /
tiled, split-K included) with NaN-poisoned outputs, and the compiled kernels on a GPU; each
case asserts from the dispatch log that the implementation (and kernel path) under test ran.
Products the kernels cannot take raise with implementation="pallas" and fall back, said
aloud, with "auto".
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common, tiling
from pallas_kernels.bcq import api, kernel
from pallas_kernels.testing import KernelCases, assert_close, bf16_round, jit_fast, poisoned_like
from uniql_jax.quant.formats import bcq

F32, BF16 = jnp.float32, jnp.bfloat16
# (M, Kin, N, group_size, bits, path), dtype: odd N, N not a multiple of the tile, 2-4 planes,
# several K steps and split-K. float32 and bfloat16 are both covered on every path.
CASES = [
    pytest.param((1, 256, 200, 64, 4, "lut"), F32, id="lut-N200-k4-f32"),
    pytest.param((1, 128, 40, 32, 3, "lut"), BF16, id="lut-N40-k3-bf16"),
    pytest.param((3, 128, 40, 32, 2, "gemv"), F32, id="gemv-M3-k2-f32"),
    pytest.param((5, 256, 136, 64, 3, "gemv"), BF16, id="gemv-M5-N136-k3-bf16"),
    pytest.param((37, 128, 48, 32, 2, "tiled"), F32, id="tiled-M37-k2-f32"),
    pytest.param((20, 256, 72, 128, 4, "tiled"), BF16, id="tiled-M20-k4-bf16"),
    pytest.param((1, 2048, 264, 128, 4, "lut"), BF16, id="lut-K2048-bf16", marks=pytest.mark.slow),
    pytest.param((16, 1024, 96, 128, 4, "gemv"), F32, id="gemv-K1024-splitK-f32", marks=pytest.mark.slow),
    pytest.param((70, 512, 130, 128, 4, "tiled"), BF16, id="tiled-M70-K512-bf16", marks=pytest.mark.slow),
]
# Error bound per output element, with S = sum_k |x_k| |W_kn| (float64):
#   float32: accumulation, 1e-6 * S;
#   bfloat16: a weight's bf16 rounding can differ by an ulp between summation orders, and the
#   LUT path does not round weights at all: 2**-8 * S; plus the output's own rounding 2**-8 |y|.
SCALE_TOL = {F32: (1e-6, 1e-6), BF16: (2.0 ** -8, 2.0 ** -8)}  # (atol per unit S, rtol)


def make_inputs(m, kin, n, group_size, bits, dtype, seed):
    """x [M, Kin] and a BCQArray (Kin, N) packed here in numpy; also the bits [Kin, k, N],
    alpha [Kin/gs, k, N] and offset [Kin/gs, N] it was packed from."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, kin), np.float32)).astype(dtype)
    plane_bits = rng.integers(0, 2, (kin, bits, n))
    groups = kin // group_size
    alpha = (rng.uniform(0.01, 0.2, (groups, bits, n)) * 2.0 ** -np.arange(bits)[None, :, None]).astype(np.float16)
    offset = rng.uniform(-0.05, 0.05, (groups, n)).astype(np.float16)
    by_byte = plane_bits.reshape(kin // 8, 8, bits, n)  # [Kin/8, j, k, N]
    planes = np.sum(by_byte << np.arange(8)[None, :, None, None], axis=1).astype(np.uint8)  # [Kin/8, k, N]
    w = bcq.BCQArray(jnp.asarray(planes), jnp.asarray(alpha), jnp.asarray(offset), bits=bits, group_size=group_size,
                     axis=0, shape=(kin, n))
    return x, w, (plane_bits, alpha, offset)


def oracle_weight(raw, group_size) -> np.ndarray:
    """float32 W [Kin, N] = sum_i alpha_i (2 b_i - 1) + offset, in that order."""
    plane_bits, alpha, offset = raw
    a = np.repeat(alpha.astype(np.float32), group_size, axis=0)  # [Kin, k, N]
    total = np.zeros((plane_bits.shape[0], plane_bits.shape[2]), np.float32)
    for i in range(plane_bits.shape[1]):
        total = total + a[:, i] * (2.0 * plane_bits[:, i] - 1.0).astype(np.float32)
    return total + np.repeat(offset.astype(np.float32), group_size, axis=0)


def oracle(x, raw, group_size):
    """(y float64 [M, N] with weights rounded to x's dtype, S = |x| @ |W| for the error bound)."""
    w = oracle_weight(raw, group_size)
    w = bf16_round(w) if x.dtype == BF16 else w.astype(np.float64)
    x64 = np.asarray(x.astype(F32), np.float64)
    return x64 @ w, np.abs(x64) @ np.abs(w)


class BCQCases(KernelCases):
    """The shared suite; subclasses choose the implementation."""

    OP = "bcq"

    def matmul(self, x, w, path):
        """api.matmul with this class's implementation (pallas: kernel `path` at its default
        launch shape, output aliased to a NaN-filled buffer), asserting that it ran."""
        if self.IMPLEMENTATION == "xla":
            fn, args = functools.partial(api.matmul, **self.dispatch()), (x, w)
            with self.expect_ran():
                return jit_fast(fn)(*args)
        m, n = x.shape[0], w.shape[1]
        if path == "lut":
            config = kernel.default_lut_config(w.shape[0], n, w.group_size)
            poison = poisoned_like(jnp.zeros(*kernel.lut_out_shape(config, n, x.dtype)))
        else:
            config = kernel.default_config(m, w.shape[0], n, w.group_size, path)
            poison = poisoned_like(jnp.zeros(*tiling.partial_out_shape(config, m, n, x.dtype)))
        fn = lambda x, w, init: api.matmul(x, w, **self.dispatch(), path=path, config=config, out_init=init)  # noqa: E731
        with self.expect_ran() as log:
            y = jit_fast(fn)(x, w, poison)
        kernel_name = "bcq-lut" if path == "lut" else "bcq-dequant"
        assert log.ran(kernel_name, "pallas") == 1, log.counts
        return y

    @pytest.mark.parametrize("case,dtype", CASES)
    def test_matches_oracle(self, case, dtype):
        m, kin, n, group_size, bits, path = case
        seed = zlib.crc32(repr((case, jnp.dtype(dtype).name, self.IMPLEMENTATION)).encode())  # fresh inputs per case
        x, w, raw = make_inputs(m, kin, n, group_size, bits, dtype, seed)
        y = self.matmul(x, w, path)
        assert y.dtype == dtype and y.shape == (m, n)
        want, scale = oracle(x, raw, group_size)
        per_s, rtol = SCALE_TOL[dtype]
        assert_close(y, want, atol=per_s * scale + 1e-6, rtol=rtol, what=f"{self.IMPLEMENTATION} {case}")


class TestBCQXla(BCQCases):
    IMPLEMENTATION = "xla"


class TestBCQPallas(BCQCases):
    IMPLEMENTATION, INTERPRET = "pallas", False


class TestBCQPallasInterpret(BCQCases):
    IMPLEMENTATION, INTERPRET = "pallas", True


def test_packing_matches_bcq_dequantize():
    """The test's numpy packing is the library's format: bcq.dequantize gives the oracle weight."""
    _, w, raw = make_inputs(1, 64, 24, 32, 3, F32, seed=4)
    np.testing.assert_allclose(np.asarray(w.dequantize(F32)), oracle_weight(raw, 32), rtol=1e-6, atol=1e-7)


def test_default_paths_and_splits():
    assert kernel.auto_path(1) == "lut" and kernel.auto_path(16) == "gemv" and kernel.auto_path(17) == "tiled"
    assert kernel.default_lut_config(4096, 4096, 128).k_splits > 1
    assert kernel.default_config(1, 1024, 96, 128, "gemv").k_splits > 1


UNSUPPORTED = [  # (M, Kin, N, group size, bits, path, the reason's words)
    pytest.param(4, 64, 24, 32, 2, None, "Kin=64", id="kin-too-small-for-the-mma"),
    pytest.param(4, 192, 24, 24, 3, None, "group_size 24", id="group-not-pow2"),
    pytest.param(3, 128, 24, 32, 2, "lut", "batch 1", id="lut-needs-batch-1"),
]


@pytest.mark.parametrize("m,kin,n,group_size,bits,path,words", UNSUPPORTED)
def test_unsupported_product_raises_with_pallas_and_falls_back_with_auto(m, kin, n, group_size, bits, path, words):
    """No silent fallback: implementation="pallas" refuses a product the kernels cannot take;
    "auto" runs the reference on it (the right product) and records why."""
    x, w, raw = make_inputs(m, kin, n, group_size, bits, F32, seed=kin + m)
    reason = kernel.unsupported_reason(x.shape, w, path or kernel.auto_path(m))
    assert reason is not None and words in reason
    with pytest.raises(ValueError, match=f"bcq: implementation='pallas'.*{words}"):
        api.matmul(x, w, implementation="pallas", path=path)
    with common.dispatch_log() as log:
        y = jit_fast(functools.partial(api.matmul, implementation="auto", path=path))(x, w)
    assert log.counts == {"bcq/fallback": 1} and log.fallback_reasons == {f"bcq: {reason}": 1}
    want, scale = oracle(x, raw, group_size)
    assert_close(y, want, atol=1e-6 * scale + 1e-6, rtol=1e-6, what=f"auto fallback {words}")


def test_auto_picks_the_kernel_path_by_batch():
    """auto on supported products runs the kernels: LUT for batch 1, dequantize above."""
    for m, kernel_name in ((1, "bcq-lut"), (4, "bcq-dequant")):
        x, w, _ = make_inputs(m, 128, 24, 32, 2, F32, seed=m)
        with common.dispatch_log() as log:
            jax.eval_shape(functools.partial(api.matmul, implementation=None), x, w)
        assert log.counts == {"bcq/pallas": 1, f"{kernel_name}/pallas": 1}
