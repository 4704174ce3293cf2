"""UniQuan through the model pipeline: sorted tiny Llama -> allocate -> uq.quantize(method="uniquan").

Properties: every linear becomes a BCQ weight whose groups divide every stored kept
size; the model runs; slicing it at each stored rate gives exactly the leading boxes
of the unpruned arrays (same bytes, same values: never re-quantized); the nested
k'-plane model keeps the first planes bit for bit and its refit scales beat truncation;
each reconstructed block has a smaller output error than round-to-nearest at 3 bits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from uniql_jax.compress import calibration
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig
from uniql_jax.quant import uniquan_driver as ud
from uniql_jax.quant.formats import bcq, packed
from uniql_jax.quant.formats.packed import dense as weight
from uniql_jax.quant.plan import kept_sizes, linear_contractions

V, D, BITS = 64, 32, 3
RATES = (0.0, 0.25, 0.5)
# rounding steps that prune the quantized input axes of o (R) and down (F) by whole bytes
STEPS = {"width": 16, "vo_rank": 8, "qk_pairs": 2}


def tiny_llama(tied: bool) -> ModelConfig:
    blocks = (AttentionBlock(0, 8, 0, 16), MLPBlock(0, 64))
    return ModelConfig(arch="llama", vocab_size=V, hidden_size=D, blocks=blocks, rotary_dim=16, intermediate_size=64,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)


def random_params(cfg, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "pair_index" or name in ("A_log", "dt_bias", "D"):
            return leaf
        if "norm" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, uq.init_params(cfg, seed))


def tokens(n, t, seed):
    # a skewed unigram stream gives the blocks structured (not uniform random) inputs
    p = np.random.default_rng(seed + 100).dirichlet(np.full(V, 0.3))
    return np.random.default_rng(seed).choice(V, size=(n, t), p=p).astype(np.int32)


def build(sort: bool):
    """(cfg, params, calib, table, 3-bit UniQuan params) of the tiny Llama, sorted or not."""
    cfg = tiny_llama(tied=not sort)  # the untied lm_head (reconstructed on the logits) in the slow run only
    params = random_params(cfg)
    calib = tokens(8, 32, seed=1)
    if sort:
        cfg, params = uq.sort(cfg, params, calib, progress=False)
    table = uq.allocate(cfg, params, calib, list(RATES), steps=STEPS, method="block_influence" if sort else "uniform")
    q = uq.quantize(cfg, params, calib, method="uniquan", bits=BITS, group_size=128, table=table, progress=False)
    return cfg, params, calib, table, q


@pytest.fixture(scope="module")
def pipeline():
    # unsorted (the elastic layout alone decides what slicing keeps) to keep the default run short;
    # the sorted UniQL pipeline is the slow test below
    return build(sort=False)


@pytest.fixture(scope="module")
def sorted_pipeline():
    return build(sort=True)


def packed_names(block):
    return sorted(k for k, v in block.items() if bcq.is_bcq(v))


def test_every_linear_is_sliceable_bcq_and_the_model_runs(pipeline):
    cfg, params_s, calib, table, q = pipeline
    for i, (blk, block) in enumerate(zip(cfg.blocks, q["blocks"])):
        contractions = linear_contractions(cfg, blk, params_s["blocks"][i])
        assert packed_names(block) == sorted(contractions)  # every weight product, nothing else
        for name, n in contractions.items():
            axis = n - 1  # the last contraction axis
            w = block[name]
            assert (w.bits, w.axis, w.shape) == (BITS, axis, tuple(params_s["blocks"][i][name].shape))
            assert all(n % w.group_size == 0 for n in kept_sizes(cfg, table, i, name, axis))
    assert q["embed"].bits == BITS and q["embed"].axis == 1  # per-row RTN, read by the tied head too
    logits_q = uq.forward(cfg, q, jnp.asarray(calib[:2]))
    logits_fp = uq.forward(cfg, params_s, jnp.asarray(calib[:2]))
    assert bool(jnp.all(jnp.isfinite(logits_q)))
    assert float(jnp.mean((logits_q - logits_fp) ** 2)) < 0.25 * float(jnp.var(logits_fp))


def dense_block(block):
    """A block's params with packed weights (uniform or BCQ) dequantized to float32."""
    return {k: weight(v, jnp.float32) if packed.is_packed(v) else v for k, v in block.items()}


def _box(a, shape):
    return np.asarray(a)[tuple(slice(0, n) for n in shape)]


def check_slices_are_leading_boxes(cfg, calib, table, q):
    cut_along_quantized_axis = set()
    for rate in RATES:
        cfg_p, q_p = uq.prune(cfg, q, rate, table)
        for i, (full, part) in enumerate(zip(q["blocks"], q_p["blocks"])):
            for name in packed_names(full):
                w, s = full[name], part[name]
                a, g = w.axis, w.group_size
                assert (s.bits, s.group_size, s.axis) == (w.bits, g, a)
                # the packed arrays of the slice are the leading boxes of the packed full arrays
                planes_box = s.shape[:a] + (s.shape[a] // 8, w.bits) + s.shape[a + 1:]
                alpha_box = s.shape[:a] + (s.shape[a] // g, w.bits) + s.shape[a + 1:]
                offset_box = s.shape[:a] + (s.shape[a] // g,) + s.shape[a + 1:]
                assert np.array_equal(np.asarray(s.planes), _box(w.planes, planes_box))
                assert np.array_equal(np.asarray(s.alpha), _box(w.alpha, alpha_box))
                assert np.array_equal(np.asarray(s.offset), _box(w.offset, offset_box))
                assert np.array_equal(np.asarray(s.dequantize()), _box(w.dequantize(), s.shape))
                if s.shape[a] < w.shape[a]:
                    cut_along_quantized_axis.add(name)
        assert bool(jnp.all(jnp.isfinite(uq.forward(cfg_p, q_p, jnp.asarray(calib[:1])))))
    assert {"o", "down"} <= cut_along_quantized_axis  # the rates really drop whole groups


def test_slicing_at_stored_rates_keeps_the_bytes_of_the_leading_boxes(pipeline):
    cfg, _, calib, table, q = pipeline
    check_slices_are_leading_boxes(cfg, calib, table, q)


@pytest.mark.slow
def test_sorted_uniql_model_slices_without_requantizing(sorted_pipeline):
    cfg, _, calib, table, q = sorted_pipeline
    check_slices_are_leading_boxes(cfg, calib, table, q)


@pytest.mark.slow
def test_nested_planes_keep_the_leading_planes_and_refit_beats_truncation(sorted_pipeline):
    cfg, params_s, calib, table, q = sorted_pipeline
    assert bcq.is_bcq(q["lm_head"])
    k = BITS - 1
    refit = ud.nested_planes(cfg, q, params_s, calib, k)
    trunc = ud.nested_planes(cfg, q, params_s, calib, k, refit=False)
    for n in (refit, trunc):
        for full, nested in zip(q["blocks"] + [{"lm_head": q["lm_head"]}], n["blocks"] + [{"lm_head": n["lm_head"]}]):
            for name in packed_names(full):
                w, m = full[name], nested[name]
                assert m.bits == k and m.shape == w.shape
                leading = jax.lax.slice_in_dim(w.planes, 0, k, axis=w.axis + 1)
                assert np.array_equal(np.asarray(m.planes), np.asarray(leading))
    x = jnp.asarray(calib)
    ref = uq.forward(cfg, params_s, x)
    err = {name: float(jnp.mean((uq.forward(cfg, n, x) - ref) ** 2))
           for name, n in (("refit", refit), ("trunc", trunc))}
    assert err["refit"] < err["trunc"], err
    # both elastic axes at once: a rate of the table on the k'-plane model
    cfg_p, n_p = uq.prune(cfg, refit, RATES[1], table)
    assert bool(jnp.all(jnp.isfinite(uq.forward(cfg_p, n_p, x[:1]))))


def test_reconstructed_blocks_beat_round_to_nearest_at_3_bits(pipeline):
    cfg, params_s, calib, table, q = pipeline
    rtn = uq.quantize(cfg, params_s, calib, method="rtn", bits=BITS, group_size=128, table=table, progress=False)
    x = calibration.embed_windows(cfg, params_s, calib)  # the full-precision stream
    for i, blk in enumerate(cfg.blocks):
        apply_fn = jax.jit(ud.block_apply(cfg, blk))
        y = apply_fn(calibration.as_float32(params_s["blocks"][i]), x)
        y_uq = apply_fn(dense_block(q["blocks"][i]), x)
        y_rtn = apply_fn(dense_block(rtn["blocks"][i]), x)
        mse_uq, mse_rtn = float(jnp.mean((y_uq - y) ** 2)), float(jnp.mean((y_rtn - y) ** 2))
        assert mse_uq < mse_rtn, (i, blk.kind, mse_uq, mse_rtn)
        x = np.asarray(y)


def test_axis_correlation_averages_the_per_head_inputs_of_the_quantized_axis():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(50, 2, 3, 8)), jnp.float32)  # inputs of o: [tokens, K, G, R]
    corr = jnp.einsum("ni,nj->ij", x.reshape(50, -1), x.reshape(50, -1))
    H = ud.axis_correlation(corr, (2, 3, 8, 5), 3)
    direct = jnp.mean(jnp.einsum("nkgi,nkgj->kgij", x, x).reshape(6, 8, 8), axis=0)
    np.testing.assert_allclose(np.asarray(H), np.asarray(direct), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ud.axis_correlation(corr[:8, :8], (8, 5), 1)), np.asarray(corr[:8, :8]))


@pytest.mark.slow
def test_mamba2_out_proj_is_quantized_along_its_head_channels():
    cfg = ModelConfig(arch="mamba2", vocab_size=V, hidden_size=D, blocks=(Mamba2Block(0, 8, 8),),
                      tie_word_embeddings=True, ssm_heads=4, ssm_head_dim=8, ssm_groups=2, ssm_state=8, conv_kernel=3,
                      ssm_chunk_size=8)
    params = random_params(cfg)
    calib = tokens(4, 16, seed=2)
    q = ud.quantize(cfg, params, calib, bits=BITS, steps=20, progress=False)
    out = q["blocks"][0]["out"]
    assert bcq.is_bcq(out) and out.axis == 1 and out.group_size == 8
    assert bool(jnp.all(jnp.isfinite(uq.forward(cfg, q, jnp.asarray(calib)))))


@pytest.mark.slow
def test_compress_cli_with_uniquan_reloads_at_a_rate_with_the_reported_perplexity(tmp_path, monkeypatch):
    """experiments.compress --quantizer uniquan end to end on the embedded Llama default: the
    checkpoint holds BCQ weights, and uq.load(path, rate) gives the perplexity the report states."""
    import functools

    from experiments import compress
    from uniql_jax import data
    from uniql_jax.eval import perplexity
    from uniql_jax.paths import TINYSTORIES
    from uniql_jax.pipeline import load_saved_tokenizer

    monkeypatch.setattr(ud, "quantize", functools.partial(ud.quantize, steps=4))  # the pipeline, not the training
    text = TINYSTORIES.read_text()
    (tmp_path / "eval.txt").write_text(text[-6000:])  # a few held-out stories: a cheap evaluation
    out = compress.run(["--arch", "llama", "--quantizer", "uniquan", "--bits", "3", "--rates", "0,0.15,0.25",
                        "--calib-samples", "4", "--seq-len", "64", "--eval", str(tmp_path / "eval.txt"),
                        "--out", str(tmp_path / "run")])
    report = json.loads((out / "report.json").read_text())
    assert report["quantizer"] == "uniquan" and [r["rate"] for r in report["rates"]] == [0.0, 0.15, 0.25]
    tokens = data.token_source(str(tmp_path / "eval.txt"), load_saved_tokenizer(out), "all")
    for row in report["rates"][1:2]:
        cfg_r, params_r = uq.load(out / "checkpoint", rate=row["rate"])
        packed = [v for b in params_r["blocks"] for v in b.values() if bcq.is_bcq(v)]
        assert packed and all(w.bits == 3 for w in packed) and bcq.is_bcq(params_r["lm_head"])
        assert perplexity(cfg_r, params_r, tokens, seq_len=64, batch_size=4) == pytest.approx(row["ppl"], rel=1e-6)
    assert report["rates"][1]["params"] < report["rates"][0]["params"]


def test_uniquan_layout_is_the_uniform_layout_read_as_bit_planes(pipeline):
    # benchmarks/cpu-quantizers' Llama-3.1-8B BCQ bytes are the abstract uniform layout read as planes
    from uniql_jax.quant.layout import array_layout, to_bcq_planes

    cfg, params, calib, table, q = pipeline
    rtn = uq.quantize(cfg, params, calib, method="rtn", bits=BITS, group_size=128, table=table, progress=False)
    assert array_layout(q) == array_layout(to_bcq_planes(rtn))
    assert packed.deployed_bytes(q) == packed.deployed_bytes(to_bcq_planes(rtn))


def test_quantize_forwards_method_options_and_rejects_unknown_ones(monkeypatch):
    """`uq.quantize(..., options=...)` reaches the UniQuan driver's settings (dict or dataclass);
    an unknown key raises before any work, naming the keys the method takes."""
    import dataclasses
    import functools

    from uniql_jax.quant import quantize as qz

    assert {"steps", "lr", "alpha_lr_ratio", "windows_per_step", "mix_prob", "period", "head_steps",
            "seed"} <= set(qz.method_options("uniquan"))
    assert qz.method_options("uniquan")["steps"] == 200 and qz.method_options("gptq") == {}
    seen = {}

    @functools.wraps(ud.quantize)  # the driver's signature: what `options` is checked against
    def driver(*args, **kwargs):
        seen.update(kwargs)
        return "done"

    monkeypatch.setattr(ud, "quantize", driver)
    assert uq.quantize(None, {}, None, method="uniquan", options={"steps": 7, "lr": 1e-3}) == "done"
    assert seen["steps"] == 7 and seen["lr"] == 1e-3 and seen["bits"] == 4

    @dataclasses.dataclass
    class Settings:
        steps: int = 3
        mix_prob: float = 0.25

    uq.quantize(None, {}, None, method="uniquan", options=Settings())
    assert seen["steps"] == 3 and seen["mix_prob"] == 0.25
    with pytest.raises(ValueError, match=r"unknown uniquan option\(s\) \['stepz'\].*'steps'"):
        uq.quantize(None, {}, None, method="uniquan", options={"stepz": 7})
    with pytest.raises(ValueError, match="unknown gptq option"):
        uq.quantize(None, {}, None, method="gptq", options={"steps": 7})
    with pytest.raises(TypeError, match="options must be a dict"):
        uq.quantize(None, {}, None, method="uniquan", options=[("steps", 7)])
