"""Helpers for the kernel test suites (shared so that every op is checked the same way)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
