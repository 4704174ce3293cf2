"""Fused RoPE for sorted/pruned heads: every implementation against a float64 numpy oracle.

One shared suite (`RopeCases`) runs through the dispatcher `api.rope` once per
implementation: "xla" (the model's reference path), the Pallas kernel in interpret mode
(outputs NaN-poisoned before the call) and the compiled kernel on a GPU; each case asserts
from the dispatch log that the implementation under test ran.
"""

from __future__ import annotations

import functools
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.rope import api
from pallas_kernels.testing import KernelCases, assert_close, jit_fast, poisoned_like

# (B, T, K, G, P, P0, block_tokens): batch, tokens, kv heads, query heads per kv head, kept
# pairs, full-rank pairs, kernel token block (None: default). Odd, non-power-of-two and
# pruned sizes (P < P0, pair indices permuted per kv head) throughout.
CASES = [
    pytest.param((1, 1, 1, 1, 1, 1, None), id="decode-minimal"),
    pytest.param((2, 5, 3, 3, 5, 8, 4), id="odd-pruned-P5"),
    pytest.param((3, 1, 2, 7, 12, 16, None), id="decode-G7-P12"),
    pytest.param((1, 37, 2, 2, 48, 64, None), id="prefill-P48-2blocks"),
    pytest.param((2, 9, 1, 4, 64, 64, 8), id="unpruned-P64", marks=pytest.mark.slow),
    pytest.param((1, 130, 8, 4, 40, 64, None), id="llama-heads-long", marks=pytest.mark.slow),
]
DTYPES = [jnp.float32, jnp.bfloat16]
# The oracle uses the float32 angle (as the model does) and float64 cos/sin and products;
# the only float32 error left is cos/sin and one multiply-add. bfloat16 adds the output
# rounding, at most half an ulp (2**-9 relative).
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=1e-5, rtol=2 ** -8)}


def make_inputs(case, dtype, seed):
    """numpy-generated (cheap: no per-shape jax.random compiles) inputs for one case."""
    B, T, K, G, P, P0, _ = case
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, K, G, 2, P), np.float32)).astype(dtype)
    k = jnp.asarray(rng.standard_normal((B, T, K, 2, P), np.float32)).astype(dtype)
    positions = jnp.asarray(rng.integers(0, 4096, (B, T)), jnp.int32)
    # each kv head keeps its own P of the P0 pairs, in its own sorted order
    pair_index = jnp.asarray(np.stack([rng.permutation(P0)[:P] for _ in range(K)]), jnp.int32)
    inv_freq = jnp.asarray(1.0 / (10000.0 ** (np.arange(P0) / P0)), jnp.float32)
    return q, k, positions, pair_index, inv_freq


def oracle(q, k, positions, pair_index, inv_freq):
    """Rotate-half RoPE from its definition, float64 (angle rounded to float32 as the model does)."""
    freq = np.asarray(inv_freq)[np.asarray(pair_index)]  # [K, P] float32
    angle = (np.asarray(positions, np.float32)[:, :, None, None] * freq[None, None]).astype(np.float64)  # [B,T,K,P]
    cos, sin = np.cos(angle), np.sin(angle)

    def rot(x, c, s):
        x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        x1, x2 = x[..., 0, :], x[..., 1, :]
        return np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)

    return rot(q, cos[:, :, :, None], sin[:, :, :, None]), rot(k, cos, sin)


class RopeCases(KernelCases):
    """The shared suite; subclasses choose the implementation."""

    OP = "rope"

    def rope(self, case, q, k, positions, pair_index, inv_freq):
        """api.rope with this class's implementation (pallas: the case's token block, outputs
        aliased to NaN-filled buffers), asserting that implementation ran."""
        args = (q, k, positions, pair_index, inv_freq)
        if self.IMPLEMENTATION == "xla":
            fn = functools.partial(api.rope, **self.dispatch())
        else:
            args += (poisoned_like(q), poisoned_like(k))
            fn = lambda *a: api.rope(*a[:5], **self.dispatch(), block_tokens=case[-1], out_init=a[5:])  # noqa: E731
        with self.expect_ran():
            return jit_fast(fn)(*args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES)
    def test_matches_oracle(self, case, dtype):
        seed = zlib.crc32(repr((case, jnp.dtype(dtype).name, self.IMPLEMENTATION)).encode())  # fresh inputs per case
        inputs = make_inputs(case, dtype, seed)
        q_rot, k_rot = self.rope(case, *inputs)
        assert q_rot.dtype == dtype and k_rot.dtype == dtype
        q_want, k_want = oracle(*inputs)
        assert_close(q_rot, q_want, **TOLERANCE[dtype], what=f"{self.IMPLEMENTATION} q")
        assert_close(k_rot, k_want, **TOLERANCE[dtype], what=f"{self.IMPLEMENTATION} k")

    def test_pair_index_is_honoured(self):
        """Swapping two kept pairs' frequency indices changes exactly those pairs' outputs."""
        case = (1, 4, 1, 1, 4, 8, None)
        q, k, positions, pair_index, inv_freq = make_inputs(case, jnp.float32, seed=3)
        base_q, _ = self.rope(case, q, k, positions, pair_index, inv_freq)
        swapped = pair_index.at[0, 0].set(pair_index[0, 1]).at[0, 1].set(pair_index[0, 0])
        new_q, _ = self.rope(case, q, k, positions, swapped, inv_freq)
        changed = np.abs(np.asarray(new_q) - np.asarray(base_q)).max(axis=(0, 1, 2, 3, 4))  # per pair
        assert changed[0] > 1e-3 and changed[1] > 1e-3
        assert changed[2] == 0 and changed[3] == 0


class TestRopeXla(RopeCases):
    IMPLEMENTATION = "xla"


class TestRopePallas(RopeCases):
    IMPLEMENTATION, INTERPRET = "pallas", False


class TestRopePallasInterpret(RopeCases):
    IMPLEMENTATION, INTERPRET = "pallas", True


@pytest.mark.parametrize("implementation", ["pallas", "auto", None])
def test_api_pallas_defaults_to_interpret_off_gpu(implementation):
    """implementation="pallas" (or auto: the kernel takes every shape) with interpret=None runs
    the kernel here (CPU) and agrees with xla."""
    inputs = make_inputs((1, 3, 2, 2, 6, 8, None), jnp.float32, seed=7)
    with common.dispatch_log() as log:
        got = jit_fast(functools.partial(api.rope, implementation=implementation))(*inputs)
    assert log.counts == {"rope/pallas": 1}
    want = api.rope(*inputs, implementation="xla")
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_rejects_unknown_implementation():
    inputs = make_inputs((1, 1, 1, 1, 2, 2, None), jnp.float32, seed=0)
    with pytest.raises(ValueError):
        api.rope(*inputs, implementation="triton")
    with pytest.raises(TypeError, match="rope: kernel options"):
        api.rope(*inputs, implementation="xla", block_tokens=4)
