"""Pruning a quantized model (docs/method.md, "Deployment", issue 6): slicing never re-quantizes.

For all five architectures, a small random model is allocated with
quantization-compatible steps (``plan.allocation_steps``) and quantized once
(GPTQ through the driver, or RTN), 4 or 3 bits. Then, at several rates:

* every packed weight of ``uq.prune(quantized)`` is, byte for byte, the leading box of
  the unpruned packed arrays (codes and scales), with the same bits / group size /
  axis; no quantizer runs while pruning; the input-split weights (o, down, Mamba out)
  really lose part of their quantized axis;
* the quantized pruned forward equals the forward of the dequantized-then-pruned
  float model;
* the abstract layout behind the Llama-3.1-8B memory figure is the driver's;
* on the real stories260K, GPTQ-4bit perplexity is at most RTN-4bit perplexity (slow).

The GPTQ driver's calibration pass compiles every block (tens of seconds for Mamba2
blocks on CPU), so the default run uses it for llama only; the other archs are quantized
with ``uq.quantize(method="rtn")``, which needs no calibration pass (checked below), and
every arch goes through GPTQ in the slow run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from uniql_jax.compress.allocate import blocks_for_fractions, default_steps, layer_groups
from uniql_jax.compress.prune import abstract_params
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.quant import gptq, rtn
from uniql_jax.quant.formats import packed, qarray
from uniql_jax.quant.plan import allocation_steps

ARCHS = ("llama", "qwen2", "mamba2", "nemotron_h", "bamba")
RATES = (0.0, 0.1, 0.2, 0.35)
V, D, F = 64, 32, 64
ATTN = dict(num_heads=4, num_kv_heads=2, head_dim=32)  # GQA; v/o rank 32 -> kept ranks step 8
SSM = dict(ssm_heads=4, ssm_head_dim=16, ssm_groups=2, ssm_state=16, conv_kernel=4, ssm_chunk_size=8)


def small_config(arch: str) -> ModelConfig:
    """Two or four blocks per arch, every pruned input axis (width, v/o rank, Mamba head_dim)
    wide enough for several multiples of 8, so quantized axes really are sliced."""
    hd = ATTN["head_dim"]
    if arch in ("llama", "qwen2"):
        blocks = [b for i in range(2) for b in (AttentionBlock(i, hd // 2, 0, hd), MLPBlock(i, F))]
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=tuple(blocks), rotary_dim=hd,
                           attention_bias=arch == "qwen2", intermediate_size=F, **ATTN)
    if arch == "mamba2":
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, tie_word_embeddings=True,
                           blocks=(Mamba2Block(0, 16, 16), Mamba2Block(1, 16, 16)), **SSM)
    if arch == "nemotron_h":  # Mamba2 / attention without RoPE / ReLU² MLP / Mamba2
        blocks = (Mamba2Block(0, 16, 16), AttentionBlock(1, 0, hd, hd), MLPBlock(2, F), Mamba2Block(3, 16, 16))
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=0, intermediate_size=F,
                           mlp_activation="relu2", **ATTN, **SSM)
    if arch == "bamba":  # Mamba2 + MLP, partial-rotary attention + MLP
        rot = hd // 2
        blocks = (Mamba2Block(0, 16, 16), MLPBlock(0, F), AttentionBlock(1, rot // 2, hd - rot, hd), MLPBlock(1, F))
        return ModelConfig(arch=arch, vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=rot,
                           intermediate_size=F, **ATTN, **SSM)
    raise ValueError(arch)


# (arch, method, bits); method "gptq" / "rtn": the driver uq.quantize (calibration pass);
# "rtn-direct": uq.quantize(method="rtn") without calibration windows (it runs no calibration pass);
# a "-zp" suffix: zero_point=True (asymmetric ZeroPointQArray weights, offsets sliced like scales).
# Default: every arch once, the GPTQ driver on llama, 3-bit packing (3 bytes per 8 codes) on
# Nemotron-H, which has every block kind; the driver on the other archs is slow.
FAST_CASES = [("llama", "gptq", 4), ("qwen2", "rtn-direct", 4), ("mamba2", "rtn-direct", 4),
              ("nemotron_h", "rtn-direct", 3), ("bamba", "rtn-direct", 4), ("llama", "rtn-direct-zp", 4)]
SLOW_CASES = [(a, "gptq", 4) for a in ARCHS[1:]] + [("llama", "rtn", 3), ("nemotron_h", "rtn", 3),
                                                     ("bamba", "gptq", 3), ("llama", "gptq-zp", 4),
                                                     ("nemotron_h", "rtn-direct-zp", 3)]


def cases(fast_ids=None, keep=lambda arch, method, bits: True):
    """pytest params of FAST_CASES + SLOW_CASES satisfying `keep`; those not in FAST_CASES (or
    not in `fast_ids` when given) marked slow."""
    out = []
    for c in FAST_CASES + SLOW_CASES:
        if not keep(*c):
            continue
        cid = f"{c[0]}-{c[1]}{c[2]}"
        fast = c in FAST_CASES and (fast_ids is None or cid in fast_ids)
        out.append(pytest.param(*c, id=cid) if fast else pytest.param(*c, id=cid, marks=pytest.mark.slow))
    return out


CASES = cases()
# Weights that stay float: norms, biases, conv, SSM dynamics, RoPE indices.
FLOAT_NAMES = {"norm", "final_norm", "gnorm", "A_log", "D", "dt_bias", "pair_index"}


# The weight of each block kind whose quantized (input) axis is a pruned dimension.
INPUT_PRUNED = {"attention": "o", "mlp": "down", "mamba2": "out"}


def stays_float(name: str) -> bool:
    return name in FLOAT_NAMES or name.endswith("_bias") or name.startswith("conv_")


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Params of `cfg` drawn with numpy (no per-op JAX compiles): weights N(0, 0.25²), norms
    around 1, Mamba2's A / D / dt at their usual init, RoPE pair indices in order."""
    rng = np.random.default_rng(seed)
    H = cfg.ssm_heads

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "pair_index":
            return jnp.broadcast_to(jnp.arange(shape[-1], dtype=leaf.dtype), shape)
        if name == "A_log":
            return jnp.log(jnp.arange(1, H + 1, dtype=leaf.dtype))
        if name == "dt_bias":  # softplus⁻¹ of Δ log-spaced in [1e-3, 1e-1]
            return jnp.asarray(np.log(np.expm1(np.geomspace(1e-3, 1e-1, H))), leaf.dtype)
        if name == "D":
            return jnp.ones(shape, leaf.dtype)
        scale, mean = (0.2, 1.0) if "norm" in name else (0.25, 0.0)
        return jnp.asarray(mean + scale * rng.standard_normal(shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def rate_table(cfg: ModelConfig, steps: dict) -> dict:
    """{rate: per-block sizes}: the layers prune from 1.5·rate (first) down to 0.5·rate (last) of
    every prunable dimension, so layers of one model keep different sizes (group sizes must divide
    all of them); the first layer, Mamba2 in every SSM arch, prunes most (its head_dim steps are 8 of 16)."""
    spread = np.linspace(1.5, 0.5, len(layer_groups(cfg)))
    return {r: blocks_for_fractions(cfg, spread * r, steps) for r in RATES}


@functools.lru_cache(maxsize=None)
def quantized_model(arch: str, method: str, bits: int):
    """(cfg, float params, table, quantized params): quantized once per session, for a table
    whose steps are the quantization-compatible ones compress.py uses."""
    cfg = small_config(arch)
    params = random_params(cfg, seed=3)
    table = rate_table(cfg, allocation_steps(cfg, 128, default_steps(cfg)))
    method, zp = method.removesuffix("-zp"), method.endswith("-zp")
    if method == "rtn-direct":
        return cfg, params, table, uq.quantize(cfg, params, None, method="rtn", bits=bits, group_size=128, table=table,
                                               zero_point=zp)
    calib = np.random.default_rng(7).integers(0, V, (8, 32)).astype(np.int32)
    qparams = uq.quantize(cfg, params, calib, method=method, bits=bits, group_size=128, table=table, progress=False,
                          zero_point=zp)
    return cfg, params, table, qparams


def named_leaves(tree, prefix=()):
    """[(path, leaf)] with packed weights as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=qarray.is_qarray)
    return [(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path), leaf) for path, leaf in flat]


def leaf_at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def box(shape):
    return tuple(slice(0, n) for n in shape)


@pytest.mark.parametrize("arch,method,bits", CASES)
def test_every_linear_weight_is_packed(arch, method, bits):
    """quantize() leaves nothing prunable in 16 bits when allocation used quantization steps."""
    cfg, params, table, qparams = quantized_model(arch, method, bits)
    for path, leaf in named_leaves(qparams):
        if stays_float(path[-1]):
            assert not qarray.is_qarray(leaf), path
        else:
            assert qarray.is_qarray(leaf) and leaf.bits == bits, (path, leaf)
            assert (type(leaf) is qarray.ZeroPointQArray) == method.endswith("-zp"), (path, leaf)
            assert leaf.shape == tuple(leaf_at(params, path).shape)


@pytest.mark.parametrize("arch,method,bits", CASES)
def test_pruning_slices_packed_bytes_never_requantizes(arch, method, bits, monkeypatch):
    cfg, params, table, qparams = quantized_model(arch, method, bits)

    def forbidden(*args, **kwargs):
        raise AssertionError("a quantizer ran while pruning")

    sliced_quantized_axes = {}  # rate -> names of packed weights cut along their quantized axis
    for rate in RATES:
        with monkeypatch.context() as m:  # slicing packed weights must not quantize or pack anything
            for module, name in [(rtn, "quantize_rtn"), (qarray, "from_codes"), (qarray, "pack_codes"),
                                 (rtn, "codes_for_scales"), (gptq, "gptq_quantize"), (rtn, "rtn_quantize"),
                                 (rtn, "rtn_quantize_embedding")]:
                m.setattr(module, name, forbidden)
            cfg_p, pruned = uq.prune(cfg, qparams, rate, table)
        target = abstract_params(cfg_p)
        sliced = set()
        for path, small in named_leaves(pruned):
            full = leaf_at(qparams, path)
            want_shape = tuple(leaf_at(target, path).shape)
            if not qarray.is_qarray(full):
                assert not qarray.is_qarray(small), path
                continue
            assert qarray.is_qarray(small), path
            assert (small.bits, small.group_size, small.axis, small.shape) == (
                full.bits, full.group_size, full.axis, want_shape), path
            ax, n = full.axis, want_shape[full.axis]
            codes_box = want_shape[:ax] + (n * bits // 8,) + want_shape[ax + 1:]
            scales_box = want_shape[:ax] + (n // full.group_size,) + want_shape[ax + 1:]
            assert small.codes.shape == codes_box and small.scales.shape == scales_box, path
            np.testing.assert_array_equal(np.asarray(small.codes), np.asarray(full.codes)[box(codes_box)])
            np.testing.assert_array_equal(np.asarray(small.scales).view(np.uint16),
                                          np.asarray(full.scales).view(np.uint16)[box(scales_box)])
            assert type(small) is type(full), path
            if full.offset is not None:  # zero point: the offsets are sliced exactly like the scales
                np.testing.assert_array_equal(np.asarray(small.offset).view(np.uint16),
                                              np.asarray(full.offset).view(np.uint16)[box(scales_box)])
            if n < full.shape[ax]:
                sliced.add(path[-1])
        sliced_quantized_axes[rate] = sliced
    # Non-vacuous: at 0 % nothing is cut; at 35 % the weights whose quantized (grouped) input axis is
    # pruned, per head for o and Mamba out (where the reference re-quantizes), keep a whole-group slice.
    assert sliced_quantized_axes[0.0] == set()
    assert sliced_quantized_axes[0.35] == {INPUT_PRUNED[b.kind] for b in cfg.blocks}, sliced_quantized_axes


def dequantized(tree):
    return jax.tree.map(lambda x: qarray.dequantize(x, jnp.float32) if qarray.is_qarray(x) else x, tree,
                        is_leaf=qarray.is_qarray)


FORWARD_RATES = (0.35,)
# Each forward compile is costly (Mamba2 blocks most): llama (RoPE attention, gated MLP) by
# default; Nemotron-H (Mamba2, attention without RoPE, ReLU² MLP) and the rest slow.
FORWARD_CASES = cases(fast_ids=("llama-gptq4", "llama-rtn-direct-zp4"))


@pytest.mark.parametrize("arch,method,bits", FORWARD_CASES)
def test_quantized_pruned_forward_equals_dequantized_then_pruned(arch, method, bits):
    """forward(prune(Q)) == forward(prune(dequantize(Q))): the packed slice is the slice of the
    dequantized weights. Not bit-equal only because XLA fuses dequantize into the products
    (a different summation order): measured max |Δ| / max |logits| <= 3e-6, against >= 1e-2
    for what quantization itself changes."""
    cfg, params, table, qparams = quantized_model(arch, method, bits)
    dense = dequantized(qparams)
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, V, (2, 24)), jnp.int32)
    for rate in FORWARD_RATES:
        cfg_p, q_pruned = uq.prune(cfg, qparams, rate, table)
        cfg_d, d_pruned = uq.prune(cfg, dense, rate, table)
        assert cfg_p == cfg_d and not cfg_p.is_full_rank()
        got = np.asarray(uq.forward(cfg_p, q_pruned, tokens), np.float64)
        want = np.asarray(uq.forward(cfg_d, d_pruned, tokens), np.float64)
        unquantized = np.asarray(uq.forward(*uq.prune(cfg, params, rate, table), tokens), np.float64)
        scale = np.max(np.abs(want))
        mismatch, quant_effect = np.max(np.abs(got - want)) / scale, np.max(np.abs(unquantized - want)) / scale
        assert mismatch <= 1e-5, (rate, mismatch)
        assert quant_effect >= 1e3 * max(mismatch, 1e-9), (rate, mismatch, quant_effect)


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def stories260k():
    from converters import llama2c
    from tests.conftest import SHARED_DATA
    from uniql_jax import data

    folder = SHARED_DATA / "stories260K"
    text = SHARED_DATA / "tinystories" / "tinystories_valid_900.txt"
    if not folder.is_dir() or not text.is_file():
        pytest.fail(f"{folder} and {text} are required")
    cfg, params = llama2c.load(folder / "stories260K.bin")
    tok = llama2c.load_tokenizer(folder / "tok512.bin")
    calib = data.calibration_windows(data.load_tokens(text, tok, part="train"), 32, 256, seed=0)
    return cfg, params, calib, data.load_tokens(text, tok, part="heldout")


@pytest.mark.slow
def test_gptq_perplexity_at_most_rtn_on_stories260k(stories260k):
    """Unsorted, no rate table, held-out TinyStories (45k tokens): measured float 5.670, GPTQ-W4 6.447,
    RTN-W4 6.801. stories260K's MLP width 172 has no multiple-of-8 group: down_proj stays 16-bit in both."""
    cfg, params, calib, eval_stream = stories260k
    ppl = {"float": uq.perplexity(cfg, params, eval_stream, seq_len=256)}
    for method in ("gptq", "rtn"):
        q = uq.quantize(cfg, params, calib, method=method, bits=4, group_size=128, progress=False)
        assert qarray.is_qarray(q["blocks"][0]["q"]) and qarray.is_qarray(q["embed"])
        ppl[method] = uq.perplexity(cfg, q, eval_stream, seq_len=256)
    assert ppl["float"] < ppl["gptq"] <= ppl["rtn"], ppl


# the bench layout is the symmetric one: zero-point cases are not its layout
@pytest.mark.parametrize("arch,method,bits", cases(keep=lambda arch, method, bits: method in ("gptq", "rtn")))
def test_abstract_layout_is_what_quantize_produces(arch, method, bits):
    """The abstract W4 layout behind the Llama-3.1-8B memory figure (benchmarks/bench_quantization.py)
    is exactly the driver's: same packed weights, axes, group sizes, array shapes and bytes."""
    from uniql_jax.quant.layout import quantized_layout

    cfg, params, table, qparams = quantized_model(arch, method, bits)
    layout = quantized_layout(cfg, table, bits=bits, group_size=128)
    assert jax.tree.structure(layout) == jax.tree.structure(qparams)
    assert any(qarray.is_qarray(leaf) for _, leaf in named_leaves(layout))
    for (path, a), (_, b) in zip(named_leaves(layout), named_leaves(qparams)):
        if qarray.is_qarray(b):
            assert (a.bits, a.group_size, a.axis, a.shape) == (b.bits, b.group_size, b.axis, b.shape), path
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(a)] == [(x.shape, x.dtype) for x in jax.tree.leaves(b)]
    assert packed.deployed_bytes(layout) == packed.deployed_bytes(qparams)
    rate = RATES[-1]
    pruned_layout = jax.eval_shape(lambda t: uq.prune(cfg, t, rate, table)[1], layout)
    assert packed.deployed_bytes(pruned_layout) == packed.deployed_bytes(uq.prune(cfg, qparams, rate, table)[1])
    assert packed.deployed_bytes(pruned_layout) < packed.deployed_bytes(layout)


def test_rtn_runs_no_calibration_pass_and_rounds_to_nearest(monkeypatch):
    """RTN uses no activations: uq.quantize(method="rtn") never runs the model, and every packed
    weight is the nearest level of its group's grid (|w - ŵ| <= scale / 2 for unclipped codes)."""
    from uniql_jax.compress import calibration

    def no_pass(*a, **kw):
        raise AssertionError("RTN ran a calibration pass")

    monkeypatch.setattr(calibration, "run_blocks", no_pass)
    cfg = small_config("llama")
    params = random_params(cfg, seed=3)
    table = rate_table(cfg, allocation_steps(cfg, 128, default_steps(cfg)))
    q = uq.quantize(cfg, params, None, method="rtn", bits=4, group_size=128, table=table)
    packed = [(path, leaf) for path, leaf in named_leaves(q) if qarray.is_qarray(leaf)]
    assert len(packed) == 2 * 7 + 2  # q, k, v, o, gate, up, down of both layers; the embedding and the untied head
    for path, leaf in packed:
        w = np.asarray(dict(named_leaves(params))[path], np.float32)
        deq = np.asarray(qarray.dequantize(leaf), np.float32)
        scale = np.repeat(np.asarray(leaf.scales, np.float32), leaf.group_size, axis=leaf.axis)
        inside = np.abs(w) <= 7 * scale  # codes -8..7: beyond +7 steps a value is clipped
        assert np.all(np.abs(w - deq)[inside] <= scale[inside] / 2 * (1 + 1e-3) + 1e-7), path


def test_quantize_without_table_then_prune_says_what_to_pass():
    """The API trap of issue 18: groups chosen without the table need not divide a pruned size;
    prune then names the fix, and passing the table makes every stored rate slice whole groups."""
    cfg = small_config("llama")
    params = random_params(cfg, seed=3)
    table = rate_table(cfg, allocation_steps(cfg, 128, default_steps(cfg)))
    rate = RATES[-1]
    loose = uq.quantize(cfg, params, None, method="rtn", bits=4, group_size=128)
    with pytest.raises(ValueError, match=r"uq\.quantize\(\.\.\., table=table\)"):
        uq.prune(cfg, loose, rate, table)
    fitted = uq.quantize(cfg, params, None, method="rtn", bits=4, group_size=128, table=table)
    uq.prune(cfg, fitted, rate, table)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_consuming_quantize_frees_each_block_and_packs_the_same_codes(method):
    """quantize(consume=True) (what compress does) drops every float block from the input once it
    is packed, and packs exactly what quantize without it packs."""
    cfg = small_config("llama")
    params = random_params(cfg, seed=0)
    table = rate_table(cfg, allocation_steps(cfg, 128, default_steps(cfg)))
    calib = np.random.default_rng(1).integers(0, V, (8, 32)).astype(np.int32)
    kw = dict(method=method, bits=4, group_size=128, table=table, progress=False)
    want = uq.quantize(cfg, params, calib, **kw)
    handed = {**params, "blocks": list(params["blocks"])}
    got = uq.quantize(cfg, handed, calib, consume=True, **kw)
    assert handed["blocks"] == [None] * len(cfg.blocks)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
