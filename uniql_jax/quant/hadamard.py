"""Orthonormal Hadamard rotations and the pure helpers that fold them into weights.

Why rotate (QuaRot, Ashkboos et al. 2024, §3-4; SpinQuant, Liu et al. 2024, §3):
for an orthogonal Q (Qᵀ Q = I) a linear ``y = x W`` (``W [Din, Dout]``) computes the
same function as ``y = (x Q)(Qᵀ W)``. Multiplying by a (randomized) Hadamard matrix
spreads every outlier channel of ``W``'s input rows over all rows ("incoherence
processing", QuIP §4), so per-group max-abs scales fit the weights better and 4-bit
error drops. In a pre-norm residual network RMSNorm commutes with Q once its weight
vector is folded into the next linear (``rms(x Q) = rms(x)`` because ``||x Q|| = ||x||``;
SliceGPT's "computational invariance"), so the rotation of the residual stream is
folded offline into the input side of the readers (q/k/v, gate/up, in_proj) and the
output side of the writers (o, down, out_proj) and the embeddings; nothing is computed
at run time. UniQL applies it only along the hidden size D, which is never pruned:
a rotation must never mix a prunable axis, or a leading slice would no longer be a
slice of the rotated model.

Supported sizes (``hadamard_matrix(n)``): ``n = 2**k * m`` where ``m = 1`` (Sylvester)
or ``m`` is the order of a Paley matrix built from a prime ``q``:

* Paley I,  ``m = q + 1``     with ``q`` prime, ``q % 4 == 3``  (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, ...);
* Paley II, ``m = 2 (q + 1)`` with ``q`` prime, ``q % 4 == 1``  (12, 28, 36, 60, 76, 108, 124, 148, ...).

This covers every power of two and e.g. 3584 = 28·128, 14336 = 28·512 (Llama-3
MLP), 18944 = 148·128 (Qwen-2.5-7B MLP), 5120 = 20·256. The smallest such m is used;
it can be large (11008 = 2·5504, Paley I with q = 5503). Orders that need other
constructions (52, 92, 156, 172, ... and every n not divisible by 4 except 1, 2)
raise ValueError. The matrix is ``kron(H_{2^k}, P_m) / sqrt(n)`` and
``hadamard_transform`` applies it in O(n (k + m)) per vector using that structure.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- construction


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j - i), χ the quadratic character mod prime q (χ(0) = 0); [q, q] int."""
    squares = np.zeros(q, dtype=bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1, -1)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> np.ndarray | None:
    """An (unnormalized, ±1) Hadamard matrix of order m by Paley I or II, or None."""
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [-1, Q]], Q skew-symmetric
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(m, dtype=np.int64) + s
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:  # Paley II: C = [[0, 1ᵀ], [1, Q]] symmetric, blocks substituted
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        zero_block = np.array([[1, -1], [-1, -1]])
        sign_block = np.array([[1, 1], [1, -1]])
        return np.where(
            (c == 0)[:, None, :, None], zero_block[None, :, None, :], c[:, None, :, None] * sign_block[None, :, None, :]
        ).reshape(m, m)
    return None


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, int]:
    """n = 2**k * m with a known order-m Hadamard (smallest such m); raises otherwise."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    two_power = n & -n
    k = two_power.bit_length() - 1
    for j in range(k, -1, -1):  # prefer the largest power of two (cheapest transform)
        m = n >> j
        if m in (1, 2) or _paley(m) is not None:
            return 1 << j, m
    raise ValueError(
        f"no Hadamard construction implemented for n={n}: supported are n = 2^k * m with m = 1, "
        f"m = q+1 (q prime, q%4==3) or m = 2(q+1) (q prime, q%4==1)"
    )


@functools.lru_cache(maxsize=None)
def _small_factor(m: int) -> np.ndarray:
    """The ±1 order-m factor (m = 1 or 2 or Paley), read-only."""
    h = np.array([[1]]) if m == 1 else np.array([[1, 1], [1, -1]]) if m == 2 else _paley(m)
    h = h.astype(np.float64)
    h.setflags(write=False)
    return h


def is_supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` has a construction."""
    try:
        _factor(n)
    except ValueError:
        return False
    return True


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """Orthonormal Hadamard ``Q [n, n] = kron(H_{2^k}, P_m) / sqrt(n)``, ``Qᵀ Q = I``.

    Entries are ±1/sqrt(n): every input channel is spread with equal weight over all
    outputs, the property QuaRot relies on to remove outlier channels (QuaRot §3).
    """
    two_power, m = _factor(n)
    sylvester = np.ones((1, 1), dtype=np.float32)
    while sylvester.shape[0] < two_power:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    unit = np.kron(sylvester, _small_factor(m).astype(np.float32))  # ±1 entries, exact in float32
    return jnp.asarray(unit * np.float32(1 / math.sqrt(n)), dtype=dtype)


def random_signs(n: int, seed: int | jax.Array) -> jax.Array:
    """Random ±1 vector [n] (float32) from an int seed or a PRNG key."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return jax.random.rademacher(key, (n,), dtype=jnp.float32)


def random_hadamard_matrix(n: int, seed: int | jax.Array, dtype=jnp.float32) -> jax.Array:
    """Randomized orthonormal Hadamard ``Q = diag(s) H / sqrt(n)``, s ∈ {±1}ⁿ from ``seed``.

    QuaRot (§4, "random Hadamard") and SpinQuant (§3, the R1/R2 initialisation) use the
    random sign flip so the rotation is one draw from a family of incoherent
    rotations; different seeds give different, equally valid, rotations.
    """
    return (random_signs(n, seed)[:, None] * hadamard_matrix(n, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def hadamard_transform(x: jax.Array, axis: int = -1, signs: jax.Array | None = None) -> jax.Array:
    """``x @ Q`` along ``axis`` for ``Q = diag(signs) hadamard_matrix(n)`` without forming Q.

    Uses ``Q = kron(H_{2^k}, P_m) / sqrt(n)``: the flat index is ``(a, b)`` with
    ``a < 2^k`` (butterflies, the fast Walsh-Hadamard transform) and ``b < m``
    (a dense m×m product). Float32 arithmetic, result in ``x.dtype``.
    """
    x_moved = jnp.moveaxis(x, axis, -1)
    lead, n = x_moved.shape[:-1], x_moved.shape[-1]
    two_power, m = _factor(n)
    y = x_moved.astype(jnp.float32)
    if signs is not None:
        y = y * signs
    y = y.reshape(*lead, two_power, m)  # [..., 2^k, m]
    half = 1
    while half < two_power:  # one butterfly level per factor H_2 of H_{2^k}
        y = y.reshape(*lead, two_power // (2 * half), 2, half, m)
        top, bottom = y[..., 0, :, :], y[..., 1, :, :]
        y = jnp.stack([top + bottom, top - bottom], axis=-3)
        half *= 2
    y = y.reshape(*lead, two_power, m)
    if m > 1:
        y = jnp.einsum("...am,mp->...ap", y, jnp.asarray(_small_factor(m), jnp.float32), precision=_HIGHEST)
    y = y.reshape(*lead, n) / math.sqrt(n)
    return jnp.moveaxis(y.astype(x.dtype), -1, axis)


# ----------------------------------------------------------------------------- folding


def rotate_input_side(w: jax.Array, rotation_FxF: jax.Array, axis: int = 0) -> jax.Array:
    """``W ← Qᵀ W`` along the input ``axis``: the layer that reads ``x Q`` instead of ``x``.

    For ``y = x W`` and a rotated input ``x' = x Q``: ``x' (Qᵀ W) = x Q Qᵀ W = x W``
    (QuaRot §4, "fusing the rotation into the weights"; SpinQuant R1 on the readers of
    the residual stream). ``w`` may have any rank; ``axis`` is the one contracted with
    x (size n; ``rotation_FxF`` is [n, n], F the rotated feature axis). Float32 arithmetic, result
    in ``w.dtype``.
    """
    w_moved = jnp.moveaxis(w.astype(jnp.float32), axis, 0)  # [n, ...]
    rotated = jnp.tensordot(rotation_FxF.astype(jnp.float32).T, w_moved, axes=1, precision=_HIGHEST)
    return jnp.moveaxis(rotated, 0, axis).astype(w.dtype)


def rotate_output_side(w: jax.Array, rotation_FxF: jax.Array, axis: int = -1) -> jax.Array:
    """``W ← W Q`` along the output ``axis``: the layer whose output must come out rotated.

    ``y' = x (W Q) = y Q``, so a writer of the residual stream (o_proj, down_proj,
    out_proj, the embedding table with ``axis=1``) produces the rotated stream that the
    input-side-rotated readers expect (QuaRot §4). Apply the same call to a bias
    ``[n]`` (``b' = b Q``). Float32 arithmetic, result in ``w.dtype``.
    """
    w_moved = jnp.moveaxis(w.astype(jnp.float32), axis, -1)  # [..., n]
    rotated = jnp.matmul(w_moved, rotation_FxF.astype(jnp.float32), precision=_HIGHEST)
    return jnp.moveaxis(rotated, -1, axis).astype(w.dtype)


def fold_norm_into_linear(norm_weight_N: jax.Array, w: jax.Array, axis: int = 0) -> jax.Array:
    """``W ← diag(g) W``: the RMSNorm scale ``g [n]`` moved into the next linear's input rows.

    ``RMSNorm_g(x) W = (x / rms(x)) diag(g) W``; after folding, the norm's weight must be
    replaced by ones (fold it into *every* reader of that norm, e.g. q, k and v). With
    unit weights RMSNorm commutes with an orthogonal Q (``rms(x Q) = rms(x)``), which is
    what allows the residual rotation of QuaRot §4 / SpinQuant §3 to pass through norms.
    Float32 arithmetic, result in ``w.dtype``.
    """
    shape = [1] * w.ndim
    shape[axis] = -1
    return (w.astype(jnp.float32) * norm_weight_N.astype(jnp.float32).reshape(shape)).astype(w.dtype)
