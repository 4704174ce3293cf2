"""The calibration plan every quantizer driver shares (GPTQ / RTN in ``quantize``, UniQuan in
``uniquan_driver``): which weight products a block makes, along which axis each is quantized,
in which group size, and the input statistics calibration collects for them.

A weight is quantized along its *last contraction axis*, in groups that divide every size the
rate table keeps of that axis (``kept_sizes`` / ``group_size_for``), so each kept slice is a
whole number of groups and elastic slicing never re-quantizes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from uniql_jax.compress import calibration
from uniql_jax.compress.prune import abstract_params
from uniql_jax.config import ModelConfig
from uniql_jax.models.layers import record_weight_inputs

F32 = jnp.float32


def contraction_count(spec: str) -> int:
    """Number of leading weight axes an einsum spec "x,w->y" contracts."""
    _, rest = spec.split(",")
    w_spec, out_spec = rest.split("->")
    n = sum(1 for c in w_spec if c not in out_spec)
    if any(c in out_spec for c in w_spec[:n]):
        raise ValueError(f"{spec}: contraction axes of the weight must lead")
    return n


def linear_inputs(cfg, blk, module, x_BxTxD, positions_BxT, w_B) -> dict:
    """A calibration collector: {weight name: Σ xᵀx [Din, Din]} for every weight product of the block."""
    with record_weight_inputs() as calls:
        module(x_BxTxD, positions_BxT, None, None, "xla")
    names = {id(v.get_value()): n for n, v in vars(module).items() if isinstance(v, nnx.Param)}
    stats = {}
    for spec, x, w in calls:
        name = names.get(id(w))
        if name is None:
            continue
        n = contraction_count(spec)
        rows = calibration.weighted_rows(x.astype(F32), w_B)
        rows = rows.reshape(-1, math.prod(rows.shape[rows.ndim - n:]))
        corr = jnp.einsum("ni,nj->ij", rows, rows, preferred_element_type=F32)
        stats[name] = stats[name] + corr if name in stats else corr
    return stats


def linear_contractions(cfg: ModelConfig, blk, block_params: dict) -> dict:
    """{weight name: number of leading contraction axes} of every weight product of a block,
    read off the block's own `wdot` calls (abstract evaluation, nothing computed)."""
    module = calibration.bind_block(cfg, blk, jax.tree.map(jnp.asarray, block_params))
    ids = {id(v.get_value()): n for n, v in vars(module).items() if isinstance(v, nnx.Param)}
    x, pos = jnp.zeros((1, 2, cfg.hidden_size), F32), jnp.zeros((1, 2), jnp.int32)
    with record_weight_inputs() as calls:
        jax.eval_shape(lambda: module(x, pos, None, None, "xla"))
    return {ids[id(w)]: contraction_count(spec) for spec, _, w in calls if id(w) in ids}


def kept_sizes(cfg: ModelConfig, table: dict | None, block_index: int, name: str, axis: int) -> list[int]:
    """Every size the table keeps of `axis` of weight `name` of a block (full rank included)."""
    sizes = set()
    for blocks in [cfg.blocks] + list((table or {}).values()):
        shapes = abstract_params(cfg.with_blocks(blocks))["blocks"][block_index]
        sizes.add(int(shapes[name].shape[axis]))
    return sorted(sizes)


def group_size_for(sizes: list[int], requested: int) -> int | None:
    """The largest multiple of 8 <= requested dividing every size (None if there is none)."""
    g = 0
    for s in sizes:
        g = math.gcd(g, s)
    for cand in range(min(requested, g) // 8 * 8, 0, -8):
        if g % cand == 0:
            return cand
    return None


# prunable dimensions that are the input (quantized) axis of a weight: o (vo_rank), down (width), Mamba out (head_dim)
QUANTIZED_INPUT_DIMS = {"vo_rank": "head_dim", "width": "intermediate_size", "head_dim": "ssm_head_dim"}


def allocation_steps(cfg: ModelConfig, group_size: int, steps: dict) -> dict:
    """Rounding steps of the allocation that suit quantization: every pruned input axis a
    multiple of 8 (whole packed bytes), doubled up to the group size while the full size
    still spans at least eight steps, so quantization groups can be as large as possible."""
    out = dict(steps)
    for dim, full_attr in QUANTIZED_INPUT_DIMS.items():
        full = getattr(cfg, full_attr)
        if dim not in out or not full:
            continue
        step = math.lcm(int(out[dim]), 8)
        while 2 * step <= min(group_size, full // 8):
            step *= 2
        out[dim] = min(step, full)
    return out
