"""W4A16 group-wise matmul: every implementation against a float64 numpy oracle.

Weights are packed by the test itself from known integer codes (even row in the low nibble,
checked byte-identical to `qarray.from_codes`), and the oracle works from those codes. One
shared suite (`W4A16Cases`) runs through the dispatcher `api.matmul` once per implementation:
"xla", the Pallas kernel in interpret mode (both launch paths, split-K included, outputs
NaN-poisoned before the call) and the compiled kernel on a GPU; each case asserts from the
dispatch log that the implementation under test ran. Products the kernel cannot take raise
with implementation="pallas" and fall back, said aloud, with "auto".
"""

from __future__ import annotations

import functools
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common, tiling
from pallas_kernels.testing import KernelCases, assert_close, bf16_round, jit_fast, poisoned_like
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


class W4A16Cases(KernelCases):
    """The shared suite; subclasses choose the implementation."""

    OP = "w4a16"

    def matmul(self, x, w, path):
        """api.matmul with this class's implementation (pallas: `path`'s default launch shape,
        output aliased to a NaN-filled buffer), asserting that implementation ran."""
        if self.IMPLEMENTATION == "xla":
            fn, args = functools.partial(api.matmul, **self.dispatch()), (x, w)
        else:
            config = kernel.default_config(x.shape[0], x.shape[1], w.shape[1], w.group_size, path)
            poison = poisoned_like(jnp.zeros(*tiling.partial_out_shape(config, x.shape[0], w.shape[1], x.dtype)))
            fn = lambda x, w, init: api.matmul(x, w, **self.dispatch(), config=config, out_init=init)  # noqa: E731
            args = (x, w, poison)
        with self.expect_ran():
            return jit_fast(fn)(*args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES)
    def test_matches_oracle(self, case, dtype):
        m, kin, n, group_size, path = case
        seed = zlib.crc32(repr((case, jnp.dtype(dtype).name, self.IMPLEMENTATION)).encode())  # fresh inputs per case
        x, w, codes, scales = make_inputs(m, kin, n, group_size, dtype, seed)
        y = self.matmul(x, w, path)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, oracle(x, codes, scales, group_size), **TOLERANCE[dtype],
                     what=f"{self.IMPLEMENTATION} {case}")

    @pytest.mark.parametrize("case", [c for c in CASES if not c.marks])
    def test_zero_point_matches_oracle(self, case):
        """A ZeroPointQArray (w = s * code + o per group): the kernel adds the offsets itself."""
        m, kin, n, group_size, path = case
        x, w, codes, scales = make_inputs(m, kin, n, group_size, jnp.float32, seed=zlib.crc32(repr(case).encode()))
        offset = np.random.default_rng(n).uniform(-1.0, 0.5, scales.shape).astype(np.float16)
        w = qarray.ZeroPointQArray(w.codes, w.scales, w.bits, w.group_size, w.axis, w.shape, jnp.asarray(offset))
        assert kernel.unsupported_reason(x.shape, w) is None
        want = oracle(x, codes + 8, scales, group_size) + np.asarray(x, np.float64) @ np.repeat(
            offset.astype(np.float64), group_size, axis=0)  # s * (q + 8 - 8) + o
        y = self.matmul(x, w, path)
        assert_close(y, want, **TOLERANCE[jnp.float32], what=f"{self.IMPLEMENTATION} {case} zero point")


class TestW4A16Xla(W4A16Cases):
    IMPLEMENTATION = "xla"


class TestW4A16Pallas(W4A16Cases):
    IMPLEMENTATION, INTERPRET = "pallas", False


class TestW4A16PallasInterpret(W4A16Cases):
    IMPLEMENTATION, INTERPRET = "pallas", True


def test_packing_convention_matches_qarray():
    """The test's numpy packing is byte-identical to `qarray.from_codes` (so the suite tests the real format)."""
    x, w, codes, scales = make_inputs(1, 64, 24, 32, jnp.float32, seed=2)
    ref = qarray.from_codes(jnp.asarray(codes), jnp.asarray(scales), bits=4, group_size=32, axis=0)
    np.testing.assert_array_equal(np.asarray(ref.codes), np.asarray(w.codes))


def test_split_k_really_splits():
    """The gemv default for a long Kin uses split-K (so the test above covers it)."""
    assert kernel.default_config(16, 512, 96, 128, "gemv").k_splits > 1
    assert kernel.default_config(1, 4096, 4096, 128).k_splits > 1


UNSUPPORTED = [  # (M, Kin, N, bits, group size, the reason's words)
    pytest.param(3, 64, 24, 8, 32, "bits=8", id="8-bit"),
    pytest.param(2, 96, 16, 4, 24, "group_size 24", id="group-not-pow2"),
    pytest.param(2, 48, 16, 4, 16, "Kin=48", id="kin-too-small"),
]


@pytest.mark.parametrize("m,kin,n,bits,group_size,words", UNSUPPORTED)
def test_unsupported_product_raises_with_pallas_and_falls_back_with_auto(m, kin, n, bits, group_size, words,
                                                                         caplog, monkeypatch):
    """No silent fallback: implementation="pallas" refuses a product the kernel cannot take;
    "auto" (and None) run the reference on it, recorded in the log with the reason and logged once."""
    rng = np.random.default_rng(kin + bits)
    x = jnp.asarray(rng.standard_normal((m, kin), np.float32))
    w = qarray.from_codes(jnp.asarray(rng.integers(0, 2 ** bits, (kin, n))),
                          jnp.asarray(rng.uniform(0.01, 0.1, (kin // group_size, n))), bits=bits,
                          group_size=group_size, axis=0)
    reason = kernel.unsupported_reason(x.shape, w)
    assert reason is not None and words in reason
    monkeypatch.setattr(common, "_LOGGED_FALLBACKS", set())  # as in a fresh process
    with pytest.raises(ValueError, match=f"w4a16: implementation='pallas'.*{words}"):
        api.matmul(x, w, implementation="pallas")
    want = np.asarray(x, np.float64) @ np.asarray(qarray.dequantize(w, jnp.float32), np.float64)
    for implementation in ("auto", None):
        with caplog.at_level(logging.WARNING, logger="pallas_kernels.common"), common.dispatch_log() as log:
            y = jit_fast(functools.partial(api.matmul, implementation=implementation))(x, w)
        assert log.counts == {"w4a16/fallback": 1} and log.fallback_reasons == {f"w4a16: {reason}": 1}
        assert_close(y, want, **TOLERANCE[jnp.float32], what=f"auto fallback {words}")
    assert [r.getMessage() for r in caplog.records] == [  # two fallbacks, one warning (once per op and reason)
        f"w4a16: the Pallas kernel cannot take this product ({reason}); running the XLA reference"]


def test_expect_ran_catches_a_fallback_and_the_wrong_implementation():
    """The suite's dispatch assertion can fail: a fallback, or the reference, is not "pallas"."""
    x = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    w8 = qarray.QArray(jax.ShapeDtypeStruct((64, 16), jnp.uint8), jax.ShapeDtypeStruct((2, 16), jnp.float16), 8, 32, 0,
                       (64, 16))
    w4 = qarray.QArray(jax.ShapeDtypeStruct((32, 16), jnp.uint8), jax.ShapeDtypeStruct((2, 16), jnp.float16), 4, 32, 0,
                       (64, 16))
    suite = TestW4A16PallasInterpret()
    for w, implementation in ((w8, "auto"), (w4, "xla")):
        with pytest.raises(AssertionError, match="expected 1 x w4a16/pallas"):
            with suite.expect_ran():
                jax.eval_shape(functools.partial(api.matmul, implementation=implementation), x, w)
    with suite.expect_ran():
        jax.eval_shape(functools.partial(api.matmul, **suite.dispatch()), x, w4)


def test_auto_runs_the_kernel_when_it_can():
    x, w, _, _ = make_inputs(2, 64, 32, 32, jnp.float32, seed=6)
    with common.dispatch_log() as log:
        jax.eval_shape(functools.partial(api.matmul, implementation="auto"), x, w)
    assert log.counts == {"w4a16/pallas": 1}


def test_api_pallas_defaults_to_interpret_off_gpu():
    x, w, codes, scales = make_inputs(2, 64, 32, 32, jnp.float32, seed=5)
    with common.dispatch_log() as log:
        y = jit_fast(functools.partial(api.matmul, implementation="pallas"))(x, w)
    assert log.counts == {"w4a16/pallas": 1}
    assert_close(y, oracle(x, codes, scales, 32), **TOLERANCE[jnp.float32])


def test_kernel_options_are_refused_with_xla():
    x, w, _, _ = make_inputs(2, 64, 32, 32, jnp.float32, seed=5)
    with pytest.raises(TypeError, match="w4a16: kernel options"):
        api.matmul(x, w, implementation="xla", path="gemv")


def test_kernel_rejects_bad_config():
    x, w, _, _ = make_inputs(2, 128, 32, 64, jnp.float32, seed=1)
    with pytest.raises(ValueError):
        kernel.matmul(x, w, interpret=True, config=kernel.Config(block_m=16, block_n=32, block_k=96))
