"""BCQ matmul: dispatch between the XLA reference and the Pallas kernels."""

from __future__ import annotations

import jax

from pallas_kernels.bcq import kernel, reference
from pallas_kernels.common import choose_implementation, record_dispatch, resolve_interpret
from uniql_jax.quant.formats.bcq import BCQArray


def matmul(x: jax.Array, w: BCQArray, *, implementation: str | None = "xla", interpret: bool | None = None,
           path: str | None = None, **kernel_options) -> jax.Array:
    """x [M, Kin] @ w -> [M, N] in x.dtype with float32 accumulation.

    w: `BCQArray` of logical shape (Kin, N) along axis 0 (k bit-planes, per-group alpha, offset).
    implementation: "xla" (dequantize then dot), "pallas" or None / "auto" (the kernel where
      it can, else the reference). Products the chosen kernel cannot take (group size not a
      power of two, Kin too small) raise with "pallas" and fall back with "auto"
      (`common.choose_implementation`).
    path (pallas): "lut" (table-lookup GEMV, batch 1), "gemv" / "tiled" (dequantize in the
      kernel); None picks "lut" for M = 1, "gemv" for M <= 16, "tiled" above.
    interpret: Pallas interpret mode; None -> True unless running on a GPU.
    kernel_options: `config` (kernel.Config or kernel.LutConfig), pallas only.
    What ran is recorded for `common.dispatch_log` ("bcq/pallas" with "bcq-lut/pallas" or
    "bcq-dequant/pallas", "bcq/fallback", "bcq/xla").
    """
    path = path or kernel.auto_path(x.shape[0])
    reason = kernel.unsupported_reason(x.shape, w, path)
    if choose_implementation("bcq", implementation, reason, kernel_options) == "xla":
        return reference.matmul(x, w)
    if path == "lut":
        record_dispatch("bcq-lut", "pallas")
        return kernel.matmul_lut(x, w, interpret=resolve_interpret(interpret), **kernel_options)
    record_dispatch("bcq-dequant", "pallas")
    return kernel.matmul_dequant(x, w, interpret=resolve_interpret(interpret), path=path, **kernel_options)
