"""Helpers shared by every kernel folder: dispatch defaults, block-size rules, GPU lowering.

All kernels here are written for the Pallas *Triton* GPU backend (``pl.pallas_call`` with
``plt.CompilerParams``), which is also what ``interpret=True`` executes on CPU. Two Triton
rules shape every kernel:

* every array a kernel loads or stores must have a power-of-two number of elements, so
  odd or pruned sizes (5 RoPE pairs, 7 query heads, N = 200 columns) are covered by a
  power-of-two block and the tail is masked (``plt.load(..., mask, other)`` / ``plt.store(..., mask)``);
* Triton does not clip blocks at array edges (the pointer just runs past the end), and the
  interpreter pads edge blocks with NaN, so *every* edge load and store must be masked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging

import jax
from jax.experimental.pallas import triton as plt

IMPLEMENTATIONS = ("xla", "pallas")  # what can run
AUTO = "auto"  # (or None) the kernel where it can take the product, else the reference, said aloud

logger = logging.getLogger(__name__)

# The custom-call target of Pallas Triton kernels; `jax.export` refuses it unless told
# (the kernel IR is not covered by export's compatibility guarantees).
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# Stack of `default_interpret` overrides (innermost last).
_INTERPRET_DEFAULTS: list[bool] = []


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> interpret everywhere but on a GPU (Pallas cannot compile kernels for CPU),
    unless a `default_interpret` block says otherwise."""
    if interpret is not None:
        return bool(interpret)
    if _INTERPRET_DEFAULTS:
        return _INTERPRET_DEFAULTS[-1]
    return not on_gpu()


@contextlib.contextmanager
def default_interpret(interpret: bool):
    """Within the block, `interpret=None` means `interpret`. `default_interpret(False)` lets a
    CPU host trace a whole model with the Triton lowering, for `jax.export(platforms=["cuda"])`
    (the models' dispatch passes interpret=None)."""
    _INTERPRET_DEFAULTS.append(bool(interpret))
    try:
        yield
    finally:
        _INTERPRET_DEFAULTS.pop()


@dataclasses.dataclass(eq=False)  # identity: nested logs are removed by identity, not by equal counts
class DispatchLog:
    """What the dispatchers chose while a `dispatch_log` block was active.

    counts: {"op/ran": calls}, ran = "pallas" (the kernel), "xla" (the reference was asked
    for) or "fallback" (implementation=None / "auto" and the kernel cannot take the product:
    the reference ran; see `choose_implementation`). Counted at trace time: a program
    compiled once counts each call site once, and a cached trace (a second call of a jitted
    function) counts nothing.
    fallback_reasons: {"op: reason": calls}.
    """

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallback_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def ran(self, op: str, implementation: str) -> int:
        return self.counts[f"{op}/{implementation}"]

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())),
                "fallback_reasons": dict(sorted(self.fallback_reasons.items()))}


_DISPATCH_LOGS: list[DispatchLog] = []


@contextlib.contextmanager
def dispatch_log():
    """Records which implementation every dispatcher call ran (see `DispatchLog`), so that a
    benchmark can prove its "pallas" figures are the kernels' and not a silent fallback."""
    log = DispatchLog()
    _DISPATCH_LOGS.append(log)
    try:
        yield log
    finally:
        _DISPATCH_LOGS.remove(log)


def record_dispatch(op: str, implementation: str, reason: str | None = None) -> None:
    """Called by the dispatchers: `implementation` is what ran ("pallas" | "xla" | "fallback")."""
    for log in _DISPATCH_LOGS:
        log.counts[f"{op}/{implementation}"] += 1
        if reason is not None:
            log.fallback_reasons[f"{op}: {reason}"] += 1


def check_implementation(implementation: str | None) -> str:
    """The mode asked for: "xla", "pallas" or "auto" (None is "auto")."""
    mode = AUTO if implementation is None else implementation
    if mode not in (*IMPLEMENTATIONS, AUTO):
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, {AUTO!r} or None, got {implementation!r}")
    return mode


_LOGGED_FALLBACKS: set[str] = set()


def choose_implementation(op: str, implementation: str | None, unsupported_reason: str | None,
                          kernel_options: dict | None = None) -> str:
    """The dispatch rule of every op: what runs ("pallas" | "xla"), recorded for `dispatch_log`.

    implementation="xla": the reference ("op/xla"); kernel options are then an error.
    implementation="pallas": the kernel ("op/pallas"), or, when it cannot take the product
      (`unsupported_reason` is not None), a ValueError naming the op and the reason: an
      explicit request for the kernel never silently runs the reference.
    implementation=None / "auto": the kernel when it can take the product, else the reference,
      recorded as "op/fallback" with the reason (`DispatchLog.fallback_reasons`) and logged
      once per (op, reason) at WARNING.
    """
    mode = check_implementation(implementation)
    if mode == "xla":
        if kernel_options:
            raise TypeError(f"{op}: kernel options {sorted(kernel_options)} apply to the Pallas kernel only, "
                            "not to implementation='xla'")
        record_dispatch(op, "xla")
        return "xla"
    if unsupported_reason is None:
        record_dispatch(op, "pallas")
        return "pallas"
    if mode == "pallas":
        raise ValueError(f"{op}: implementation='pallas' was asked for but the kernel cannot take this product: "
                         f"{unsupported_reason} (implementation=None or 'auto' runs the XLA reference instead)")
    record_dispatch(op, "fallback", unsupported_reason)
    key = f"{op}: {unsupported_reason}"
    if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        logger.warning("%s: the Pallas kernel cannot take this product (%s); running the XLA reference", op,
                    unsupported_reason)
    return "xla"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def triton_params(num_warps: int = 4, num_stages: int = 2) -> plt.CompilerParams:
    """Selects the Triton lowering (jax 0.10 would otherwise pick Mosaic GPU on CUDA)."""
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def lane_mask(start, size: int, limit: int):
    """[size] bool: which of the indices start, start+1, ... start+size-1 are < limit."""
    return start + jax.lax.iota("int32", size) < limit


def alias_initial_outputs(args: list, in_specs: list, out_shapes, out_specs, out_inits) -> dict:
    """Append initial-value buffers for the outputs as extra inputs aliased to them.

    Tests pass NaN-poisoned buffers so that any output element a kernel does not write stays
    NaN. out_inits: None (no aliasing) or one buffer per output. Mutates args / in_specs and
    returns the `input_output_aliases` for `pl.pallas_call`.
    """
    if out_inits is None:
        return {}
    aliases = {}
    for o, (init, shape, spec) in enumerate(zip(out_inits, out_shapes, out_specs, strict=True)):
        aliases[len(args)] = o
        args.append(init.astype(shape.dtype).reshape(shape.shape))
        in_specs.append(spec)
    return aliases


def export_for_cuda(fn, *args_or_shapes):
    """`jax.export` of `jax.jit(fn)` for platform cuda, on any host (no GPU needed).

    Succeeds only if every pallas_call inside lowers to Triton IR; returns the Exported.
    """
    return jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)],
    )(*args_or_shapes)


__all__ = [
    "IMPLEMENTATIONS", "AUTO", "TRITON_CUSTOM_CALL", "on_gpu", "resolve_interpret", "default_interpret", "DispatchLog",
    "dispatch_log", "record_dispatch", "check_implementation", "choose_implementation",
    "next_pow2", "is_pow2", "triton_params", "lane_mask", "alias_initial_outputs", "export_for_cuda",
]
