"""`packed_einsum`: every weight product of the models when impl="pallas".

A model weight keeps each prunable axis as its own array axis (e.g. q [D, K, G, 2, P],
o [K, G, R, D]), while the kernels take a 2-D weight [Kin, N] quantized along Kin. Rule that
makes the two meet without touching the packed bytes: in every model spec the contraction
axes of w are its *leading* axes and the quantized axis is the *last* of them, e.g.

    "btd,dkgcp->btkgcp"  q  [D, K, G, 2, P]   contraction (d),       quantized axis 0
    "btkgr,kgrd->btd"    o  [K, G, R, D]      contraction (k, g, r), quantized axis 2
    "btf,fd->btd"        down [F, D]          contraction (f),       quantized axis 0

Then the packed arrays reshape (a free view, groups stay contiguous because every group lies
inside one run of the quantized axis) to a 2-D packed weight [prod(contraction), prod(rest)],
x reshapes to [M, prod(contraction)], one kernel call, and the result reshapes back.
Specs outside the rule run dequantize + einsum (`packed.dense_einsum`, what
`layers.wdot(..., "xla")` computes) under the dispatch rule of `common.choose_implementation`:
recorded as a fallback with implementation="auto" (the default: the models' impl="pallas"
switch covers a whole model, some of whose products the kernels cannot take), a ValueError
with implementation="pallas". The packed-weight helpers come from the formats layer
(`uniql_jax.quant.formats.packed`): this dispatcher sits below the models and never imports them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_implementation, choose_implementation, record_dispatch
from uniql_jax.quant.formats import qarray
from uniql_jax.quant.formats.packed import dense_einsum, is_packed
from uniql_jax.quant.formats.packed import flatten_contraction as flatten_packed


@dataclasses.dataclass(frozen=True)
class Plan:
    """How `spec` maps onto one [M, Kin] @ [Kin, N] product."""

    n_contract: int  # leading axes of w that are contracted
    x_perm: tuple[int, ...]  # transpose of x to (batch axes..., contraction axes in w's order)
    out_perm: tuple[int, ...]  # transpose of (batch axes..., w's remaining axes) to the output spec


def plan_spec(spec: str, x_ndim: int, w_ndim: int, w_axis: int) -> Plan | None:
    """The reshape plan for `spec`, or None if the spec does not follow the rule above."""
    if "..." in spec or "->" not in spec:
        return None
    inputs, out = spec.replace(" ", "").split("->")
    if inputs.count(",") != 1:
        return None
    xs, ws = inputs.split(",")
    if len(xs) != x_ndim or len(ws) != w_ndim:
        return None
    if any(len(set(s)) != len(s) for s in (xs, ws, out)):
        return None  # repeated letters (diagonals, traces): not a plain product
    contract = [c for c in ws if c in xs and c not in out]
    n_contract = len(contract)
    if n_contract == 0 or list(ws[:n_contract]) != contract or w_axis != n_contract - 1:
        return None
    batch = [c for c in xs if c not in contract]
    rest = list(ws[n_contract:])
    if any(c in xs for c in rest) or sorted(batch + rest) != sorted(out):
        return None  # a batch axis shared with w, or an x axis summed away: not a plain product
    x_perm = tuple(xs.index(c) for c in batch + contract)
    produced = batch + rest
    out_perm = tuple(produced.index(c) for c in out)
    return Plan(n_contract, x_perm, out_perm)


def _matmul_2d(x2, w2, implementation, interpret):
    if qarray.is_qarray(w2):
        from pallas_kernels.w4a16 import api as w4a16_api

        return w4a16_api.matmul(x2, w2, implementation=implementation, interpret=interpret)
    from pallas_kernels.bcq import api as bcq_api

    return bcq_api.matmul(x2, w2, implementation=implementation, interpret=interpret)


def packed_einsum(spec: str, x: jax.Array, w, *, implementation: str | None = "auto",
                  interpret: bool | None = None) -> jax.Array:
    """einsum(spec, x, w) in x.dtype (float32 accumulation) with packed weights on the kernels.

    Dense weights: plain einsum. Packed weights (`QArray`, `BCQArray`) whose spec follows the
    module rule: one kernel call through the op's dispatcher, with the same `implementation`;
    otherwise dequantize + einsum. implementation: "auto" / None (default; a product no kernel
    takes runs the reference, recorded as a fallback), "pallas" (such a product raises
    ValueError) or "xla" (always dequantize + einsum). Every choice, and the kernel
    dispatchers' own, is recorded for `common.dispatch_log`.
    """
    if not is_packed(w):
        check_implementation(implementation)
        record_dispatch("packed_einsum", "xla")  # a dense weight: nothing for the kernels
        return dense_einsum(spec, x, w)
    plan = plan_spec(spec, x.ndim, w.ndim, w.axis)
    if plan is None:
        reason = f"spec {spec} outside the leading-contraction rule"
        choose_implementation("packed_einsum", implementation, reason)  # "xla", "fallback" or raises
        return dense_einsum(spec, x, w)
    if check_implementation(implementation) == "xla":
        record_dispatch("packed_einsum", "xla")
        return dense_einsum(spec, x, w)
    w2 = flatten_packed(w, plan.n_contract)
    xt = jnp.transpose(x, plan.x_perm)
    batch_shape = xt.shape[: x.ndim - plan.n_contract]
    y2 = _matmul_2d(xt.reshape(math.prod(batch_shape), w2.shape[0]), w2, implementation, interpret)  # [M, N]
    y = y2.reshape(batch_shape + tuple(w.shape[plan.n_contract:]))
    return jnp.transpose(y, plan.out_perm)
