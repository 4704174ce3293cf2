"""W4A16 group-wise matmul: dispatch between the XLA reference and the Pallas kernel."""

from __future__ import annotations

import jax

from pallas_kernels.common import choose_implementation, resolve_interpret
from pallas_kernels.w4a16 import kernel, reference
from uniql_jax.quant.formats.qarray import QArray


def matmul(x: jax.Array, w: QArray, *, implementation: str | None = "xla", interpret: bool | None = None,
           **kernel_options) -> jax.Array:
    """x [M, Kin] @ w -> [M, N] in x.dtype with float32 accumulation.

    w: `QArray` of logical shape (Kin, N) quantized along axis 0, symmetric or with a zero point
      (`ZeroPointQArray`: the kernel adds the group offsets itself).
    implementation: "xla" (dequantize then dot), "pallas" (dequantize inside the kernel) or
      None / "auto" (the kernel where it can, else the reference). The kernel covers 4-bit
      weights with a power-of-two group size and Kin a multiple of max(group_size, 32);
      anything else (e.g. 2/3/8-bit) raises with "pallas" and falls back with "auto"
      (`common.choose_implementation`).
    interpret: Pallas interpret mode; None -> True unless running on a GPU.
    kernel_options: `config` (kernel.Config) or `path` ("gemv" | "tiled"), pallas only.
    What ran is recorded for `common.dispatch_log` ("w4a16/pallas", "w4a16/fallback", "w4a16/xla").
    """
    reason = kernel.unsupported_reason(x.shape, w)
    if choose_implementation("w4a16", implementation, reason, kernel_options) == "pallas":
        return kernel.matmul(x, w, interpret=resolve_interpret(interpret), **kernel_options)
    return reference.matmul(x, w)
