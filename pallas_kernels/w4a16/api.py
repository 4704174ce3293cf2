"""W4A16 group-wise matmul: dispatch between the XLA reference and the Pallas kernel."""

from __future__ import annotations

import jax

from pallas_kernels.common import check_implementation, resolve_interpret
from pallas_kernels.w4a16 import kernel, reference
from uniql_jax.quant.qarray import QArray


def matmul(x: jax.Array, w: QArray, *, implementation: str = "xla", interpret: bool | None = None,
           **kernel_options) -> jax.Array:
    """x [M, Kin] @ w -> [M, N] in x.dtype with float32 accumulation.

    w: `QArray` of logical shape (Kin, N) quantized along axis 0.
    implementation: "xla" (dequantize then dot) or "pallas" (dequantize inside the kernel).
      The kernel covers 4-bit weights with a power-of-two group size and Kin a multiple of
      max(group_size, 32); anything else (e.g. 2/3/8-bit) falls back to the reference.
    interpret: Pallas interpret mode; None -> True unless running on a GPU.
    kernel_options: `config` (kernel.Config) or `path` ("gemv" | "tiled"), pallas only.
    """
    if check_implementation(implementation) == "pallas" and kernel.unsupported_reason(x.shape, w) is None:
        return kernel.matmul(x, w, interpret=resolve_interpret(interpret), **kernel_options)
    return reference.matmul(x, w)
