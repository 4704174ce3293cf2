"""Helpers for the kernel test suites (shared so that every op is checked the same way)."""

from __future__ import annotations

import contextlib
import unittest

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import dispatch_log, on_gpu


# Interpret-mode kernels are mostly XLA compile time on CPU; the unoptimised backend cuts it
# by about a third and does not change results (same HLO, no fast-math rewrites).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_fast(fn, **jit_kwargs):
    """jax.jit with the cheap CPU backend options, for tests and --small benchmarks."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs)


def poisoned_like(x: jax.Array) -> jax.Array:
    """A NaN-filled buffer shaped like `x`: handed to a kernel as its aliased output, any
    element the kernel does not write stays NaN and fails `assert_close`."""
    return jnp.full(x.shape, jnp.nan, x.dtype)


def assert_close(actual, expected, *, atol: float, rtol: float, what: str = ""):
    """|actual - expected| <= atol + rtol * |expected| elementwise, no NaN/inf anywhere.

    `expected` is usually a float64 numpy oracle; `actual` is compared in float64.
    """
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad_values = ~np.isfinite(a)
    assert not bad_values.any(), f"{what}: {bad_values.sum()} of {a.size} elements not finite (unwritten?)"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    over = err > bound
    assert not over.any(), (
        f"{what}: {over.sum()} of {a.size} elements off; worst |err| {err.max():.3g} "
        f"(bound there {bound.flat[np.argmax(err - bound)]:.3g})"
    )


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 and back (the rounding the kernels apply to weights)."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


class KernelCases:
    """Base of each op's shared test suite, run once per implementation by subclassing
    (the jax `class ...InterpretTest(...Test): INTERPRET = True` pattern):

        class W4A16Cases(KernelCases): OP = "w4a16"; def test_...(self): ...
        class TestW4A16Xla(W4A16Cases): IMPLEMENTATION = "xla"
        class TestW4A16Pallas(W4A16Cases): IMPLEMENTATION, INTERPRET = "pallas", False  # skipped off GPU
        class TestW4A16PallasInterpret(W4A16Cases): IMPLEMENTATION, INTERPRET = "pallas", True

    Every case goes through the op's dispatcher with `dispatch()` and runs inside
    `expect_ran()`, which asserts from `common.dispatch_log` that the implementation under
    test is the one that ran: comparing "pallas" with the reference would otherwise still pass
    if the dispatcher had quietly run the reference.
    """

    OP: str = ""  # the dispatcher's name in the log ("w4a16", "bcq", "rope")
    IMPLEMENTATION: str = "xla"  # "xla" | "pallas"
    INTERPRET: bool | None = None  # Pallas interpret mode (pallas only)

    def setup_method(self, method):
        """pytest's per-test hook: compiled kernels need a GPU (pytest reports SkipTest as a skip)."""
        if self.IMPLEMENTATION != "xla" and self.INTERPRET is False and not on_gpu():
            raise unittest.SkipTest("compiled Pallas kernels need a GPU (the interpret subclass runs them here)")

    def dispatch(self) -> dict:
        """Keyword arguments selecting this class's implementation in a dispatcher call."""
        if self.IMPLEMENTATION == "xla":
            return dict(implementation="xla")
        return dict(implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)

    @contextlib.contextmanager
    def expect_ran(self, calls: int = 1):
        """The block traces `calls` dispatcher calls of `OP`, every one on `IMPLEMENTATION`:
        no fallback, nothing else. Trace-time counts: call a freshly jitted function inside."""
        with dispatch_log() as log:
            yield log
        ran = {key: n for key, n in log.counts.items() if key.split("/")[0] == self.OP}
        assert ran == {f"{self.OP}/{self.IMPLEMENTATION}": calls}, (
            f"expected {calls} x {self.OP}/{self.IMPLEMENTATION}, the dispatcher ran {ran} "
            f"(fallback reasons: {dict(log.fallback_reasons)})")
