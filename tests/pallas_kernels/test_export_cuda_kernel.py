"""GPU lowering from CPU: every kernel (every launch path) exports for platform cuda.

`jax.export` for "cuda" runs the Pallas Triton lowering (kernel -> Triton IR, embedded in a
`__gpu$xla.gpu.triton` custom call) without a GPU, on abstract shapes, so Llama-3.1-8B sizes
cost nothing here. Triton's own compile to PTX still happens only on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import common
from pallas_kernels.bcq import kernel as bcq_kernel
from pallas_kernels.rope import kernel as rope_kernel
from pallas_kernels.w4a16 import kernel as w4a16_kernel
from uniql_jax.quant.formats.bcq import BCQArray
from uniql_jax.quant.formats.qarray import QArray, ZeroPointQArray

S = jax.ShapeDtypeStruct


def abstract_qarray(kin, n, group_size):
    return QArray(S((kin // 2, n), jnp.uint8), S((kin // group_size, n), jnp.float16), 4, group_size, 0, (kin, n))


def abstract_zero_point_qarray(kin, n, group_size):
    return ZeroPointQArray(S((kin // 2, n), jnp.uint8), S((kin // group_size, n), jnp.float16), 4, group_size, 0,
                           (kin, n), S((kin // group_size, n), jnp.float16))


def abstract_bcq(kin, n, group_size, bits):
    return BCQArray(S((kin // 8, bits, n), jnp.uint8), S((kin // group_size, bits, n), jnp.float16),
                    S((kin // group_size, n), jnp.float16), bits, group_size, 0, (kin, n))


def assert_triton_kernels(exported, name, count=1):
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert text.count(common.TRITON_CUSTOM_CALL) == count, text[:2000]
    assert f'name = "{name}"' in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("B,T,P", [(1, 1, 64), (4, 1, 48), (1, 512, 40), (2, 33, 5)],
                         ids=["decode-full", "decode-pruned", "prefill-pruned", "odd"])
def test_rope_exports_for_cuda(B, T, P, dtype):
    K, G, P0 = 8, 4, 64  # Llama-3.1-8B heads
    args = (S((B, T, K, G, 2, P), dtype), S((B, T, K, 2, P), dtype), S((B, T), jnp.int32), S((K, P), jnp.int32),
            S((P0,), jnp.float32))
    assert_triton_kernels(common.export_for_cuda(rope_kernel.rope, *args), "uniql_rope")


LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]


@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("kin,n", LLAMA_SHAPES)
def test_w4a16_exports_for_cuda(kin, n, M):
    exported = common.export_for_cuda(w4a16_kernel.matmul, S((M, kin), jnp.bfloat16), abstract_qarray(kin, n, 128))
    assert_triton_kernels(exported, "uniql_w4a16")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("M,kin,n,gs", [(3, 256, 200, 32), (37, 512, 72, 64)], ids=["gemv-gs32", "tiled-gs64"])
def test_w4a16_small_groups_export_for_cuda(M, kin, n, gs, dtype):
    exported = common.export_for_cuda(w4a16_kernel.matmul, S((M, kin), dtype), abstract_qarray(kin, n, gs))
    assert_triton_kernels(exported, "uniql_w4a16")


@pytest.mark.parametrize("M", [1, 64])
def test_w4a16_zero_point_exports_for_cuda(M):
    """The offset path (w = s * code + o per group) lowers to the same one Triton kernel."""
    exported = common.export_for_cuda(w4a16_kernel.matmul, S((M, 4096), jnp.bfloat16),
                                      abstract_zero_point_qarray(4096, 4096, 128))
    assert_triton_kernels(exported, "uniql_w4a16")


@pytest.mark.parametrize("M,path,name", [(1, "lut", "uniql_bcq_lut"), (1, "gemv", "uniql_bcq_dequant"),
                                         (16, "gemv", "uniql_bcq_dequant"), (64, "tiled", "uniql_bcq_dequant")])
@pytest.mark.parametrize("kin,n", [(4096, 4096), (14336, 4096)])
def test_bcq_exports_for_cuda(kin, n, M, path, name):
    x, w = S((M, kin), jnp.bfloat16), abstract_bcq(kin, n, 128, 4)
    if path == "lut":
        fn = bcq_kernel.matmul_lut
    else:
        fn = functools.partial(bcq_kernel.matmul_dequant, path=path)
    assert_triton_kernels(common.export_for_cuda(fn, x, w), name)
