"""W4A16 group-wise matmul: every implementation against a float64 numpy oracle.

Weights are packed by the test itself from known integer codes (even row in the low nibble,
checked byte-identical to `qarray.from_codes`), and the oracle works from those codes. The same parametrized cases run
against implementation="xla" and the Pallas kernel in interpret mode (both launch paths,
split-K included), whose outputs are NaN-poisoned before the call.
"""

from __future__ import annotations

import functools
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.testing import assert_close, bf16_round, jit_fast, poisoned_like
from pallas_kernels import tiling
from pallas_kernels.w4a16 import api, kernel
from uniql_jax.quant.formats import qarray

# (M, Kin, N, group_size, path): decode-shaped (gemv) and prefill-shaped (tiled) products with
# odd M and N, N not a multiple of the tile, several K steps and split-K.
CASES = [
    pytest.param((1, 128, 48, 32, "gemv"), id="gemv-M1-gs32"),
    pytest.param((3, 256, 200, 64, "gemv"), id="gemv-M3-N200-gs64"),
    pytest.param((16, 512, 96, 128, "gemv"), id="gemv-M16-splitK-gs128"),
    pytest.param((37, 256, 72, 32, "tiled"), id="tiled-M37-N72-gs32"),
    pytest.param((70, 384, 136, 128, "tiled"), id="tiled-M70-N136-3ksteps", marks=pytest.mark.slow),
    pytest.param((64, 1024, 256, 64, "tiled"), id="tiled-M64-K1024", marks=pytest.mark.slow),
    pytest.param((9, 2048, 160, 128, "gemv"), id="gemv-K2048-splitK", marks=pytest.mark.slow),
]
DTYPES = [jnp.float32, jnp.bfloat16]
# float32: Kin products accumulated in float32 (error ~ sqrt(Kin) * 2**-24 * sum|x w|, far
# below 1e-4 here). bfloat16: weights are rounded to bfloat16 exactly as in the oracle, products
# are exact in float32, so the error is the output rounding: half an ulp, 2**-9 relative.
TOLERANCE = {jnp.float32: dict(atol=1e-4, rtol=1e-5), jnp.bfloat16: dict(atol=1e-3, rtol=2 ** -8)}
IMPLEMENTATIONS = ["xla", "pallas"]


def make_inputs(m, kin, n, group_size, dtype, seed):
    """x [M, Kin] and a 4-bit QArray (Kin, N) packed here in numpy by the documented
    convention (two codes per byte along Kin, even row in the low nibble): cheap, and
    independent of `qarray`'s own packer. Returns (x, w, codes [Kin, N] int, scales [Kin/gs, N])."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, kin), np.float32)).astype(dtype)
    codes = rng.integers(0, 16, (kin, n))
    # per-column magnitudes vary so that group scales differ
    scales = (rng.uniform(0.02, 0.3, (kin // group_size, n)) * rng.uniform(0.2, 2.0, (1, n))).astype(np.float16)
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)  # [Kin/2, N]
    w = qarray.QArray(jnp.asarray(packed), jnp.asarray(scales), bits=4, group_size=group_size, axis=0, shape=(kin, n))
    return x, w, codes, scales


def oracle(x, codes, scales, group_size) -> np.ndarray:
    """float64 x @ W, W formed as float32 s*(q-8) (as stored) rounded to x's dtype."""
    w = (codes - 8).astype(np.float32) * np.repeat(scales.astype(np.float32), group_size, axis=0)
    w = bf16_round(w) if x.dtype == jnp.bfloat16 else w.astype(np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ w


def run(implementation, x, w, path):
    if implementation == "xla":
        return jit_fast(functools.partial(api.matmul, implementation="xla"))(x, w)
    config = kernel.default_config(x.shape[0], x.shape[1], w.shape[1], w.group_size, path)
    poison = poisoned_like(jnp.zeros(*tiling.partial_out_shape(config, x.shape[0], w.shape[1], x.dtype)))
    fn = jit_fast(lambda x, w, init: kernel.matmul(x, w, interpret=True, config=config, out_init=init))
    return fn(x, w, poison)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [c for c in CASES if not c.marks])
def test_w4a16_zero_point_matches_oracle(implementation, case):
    """A ZeroPointQArray (w = s * code + o per group): the kernel adds the offsets itself."""
    from pallas_kernels.common import dispatch_log

    m, kin, n, group_size, path = case
    x, w, codes, scales = make_inputs(m, kin, n, group_size, jnp.float32, seed=zlib.crc32(repr(case).encode()))
    offset = np.random.default_rng(n).uniform(-1.0, 0.5, scales.shape).astype(np.float16)
    w = qarray.ZeroPointQArray(w.codes, w.scales, w.bits, w.group_size, w.axis, w.shape, jnp.asarray(offset))
    assert kernel.unsupported_reason(x.shape, w) is None
    want = oracle(x, codes + 8, scales, group_size) + np.asarray(x, np.float64) @ np.repeat(
        offset.astype(np.float64), group_size, axis=0)  # s * (q + 8 - 8) + o
    with dispatch_log() as log:
        y = run(implementation, x, w, path)
        y_api = api.matmul(x, w, implementation=implementation, interpret=True)
    assert log.ran("w4a16", "fallback") == 0 and log.ran("w4a16", implementation) >= 1
    assert_close(y, want, **TOLERANCE[jnp.float32], what=f"{implementation} {case} zero point")
    assert_close(y_api, want, **TOLERANCE[jnp.float32], what=f"api {implementation} {case} zero point")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_w4a16_matches_oracle(implementation, case, dtype):
    m, kin, n, group_size, path = case
    seed = zlib.crc32(repr((case, jnp.dtype(dtype).name, implementation)).encode())  # fresh inputs per case
    x, w, codes, scales = make_inputs(m, kin, n, group_size, dtype, seed)
    y = run(implementation, x, w, path)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, oracle(x, codes, scales, group_size), **TOLERANCE[dtype], what=f"{implementation} {case}")


def test_packing_convention_matches_qarray():
    """The test's numpy packing is byte-identical to `qarray.from_codes` (so the suite tests the real format)."""
    x, w, codes, scales = make_inputs(1, 64, 24, 32, jnp.float32, seed=2)
    ref = qarray.from_codes(jnp.asarray(codes), jnp.asarray(scales), bits=4, group_size=32, axis=0)
    np.testing.assert_array_equal(np.asarray(ref.codes), np.asarray(w.codes))


def test_split_k_really_splits():
    """The gemv default for a long Kin uses split-K (so the test above covers it)."""
    assert kernel.default_config(16, 512, 96, 128, "gemv").k_splits > 1
    assert kernel.default_config(1, 4096, 4096, 128).k_splits > 1


def test_api_pallas_falls_back_for_8_bit():
    """8-bit weights are not in the kernel: implementation="pallas" still gives the right product."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((3, 64), np.float32))
    w = qarray.from_codes(jnp.asarray(rng.integers(0, 256, (64, 24))), jnp.asarray(rng.uniform(0.01, 0.1, (2, 24))),
                          bits=8, group_size=32, axis=0)
    assert kernel.unsupported_reason(x.shape, w) is not None
    y = api.matmul(x, w, implementation="pallas")
    want = np.asarray(x, np.float64) @ np.asarray(qarray.dequantize(w, jnp.float32), np.float64)
    assert_close(y, want, **TOLERANCE[jnp.float32])


def test_api_pallas_defaults_to_interpret_off_gpu():
    x, w, codes, scales = make_inputs(2, 64, 32, 32, jnp.float32, seed=5)
    y = jit_fast(functools.partial(api.matmul, implementation="pallas"))(x, w)
    assert_close(y, oracle(x, codes, scales, 32), **TOLERANCE[jnp.float32])


def test_kernel_rejects_bad_config():
    x, w, _, _ = make_inputs(2, 128, 32, 64, jnp.float32, seed=1)
    with pytest.raises(ValueError):
        kernel.matmul(x, w, interpret=True, config=kernel.Config(block_m=16, block_n=32, block_k=96))
