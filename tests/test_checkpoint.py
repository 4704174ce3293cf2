"""Checkpoint save / rate-selective load / in-process rate switching.

Properties: round trips are bit-exact (dense, QArray, BCQArray), a load at a rate is
bit-exact ``prune`` of the full model, a rate reads only what it keeps (bytes counted
by TensorStore), a switched rate never touches the disk and never recompiles, and
every bad input is one clear error.

(Over 400 lines on purpose: the save/load, rate and ElasticModel tests share one set of
module-scoped fixtures, a dense and a quantized model saved once.)
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uniql_jax as uq
from uniql_jax import checkpoint as ck
from uniql_jax.checkpoint import io as ck_io
from uniql_jax.checkpoint.manifest import DATA_PREFIX, write_manifest
from uniql_jax.compress.prune import prune
from uniql_jax.config import AttentionBlock, Mamba2Block, MLPBlock, ModelConfig, config_from_dict, config_to_dict
from uniql_jax.elastic import ElasticModel
from uniql_jax.quant.formats import packed, qarray
from uniql_jax.quant.rtn import quantize_rtn

from tests.helpers import data_dir, largest_data_file, random_params

REPO = Path(__file__).resolve().parents[1]
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# Small dense model: odd kept sizes (gcd of MLP widths 128, 104, 88, 80 is 8) exercise the split chunking.
CFG = ModelConfig(
    arch="llama", vocab_size=64, hidden_size=64,
    blocks=(AttentionBlock(0, 8, 0, 16), MLPBlock(0, 128), AttentionBlock(1, 8, 0, 16), MLPBlock(1, 128)),
    num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=16, intermediate_size=128,
)
DENSE_TABLE = {
    0.0: CFG.blocks,
    0.2: (AttentionBlock(0, 7, 0, 13), MLPBlock(0, 104), AttentionBlock(1, 6, 0, 14), MLPBlock(1, 88)),
    0.35: (AttentionBlock(0, 5, 0, 10), MLPBlock(0, 80), AttentionBlock(1, 6, 0, 11), MLPBlock(1, 88)),
}
# Quantized model, large enough that chunks are several KiB (TensorStore reads through gaps under 4 KiB).
QCFG = ModelConfig(
    arch="llama", vocab_size=256, hidden_size=256,
    blocks=(AttentionBlock(0, 32, 0, 64), MLPBlock(0, 768), AttentionBlock(1, 32, 0, 64), MLPBlock(1, 768)),
    num_heads=4, num_kv_heads=2, head_dim=64, rotary_dim=64, intermediate_size=768,
)
# Whole quantization groups where a quantized axis is pruned (o along R: groups of 8; down along F: 128).
QUANT_TABLE = {
    0.0: QCFG.blocks,
    0.2: (AttentionBlock(0, 24, 0, 48), MLPBlock(0, 640), AttentionBlock(1, 24, 0, 56), MLPBlock(1, 512)),
    0.35: (AttentionBlock(0, 16, 0, 40), MLPBlock(0, 512), AttentionBlock(1, 24, 0, 32), MLPBlock(1, 384)),
}
META = {"model": "random-init", "data": "none", "seed": 0, "quantizer": "rtn", "bits": 4}


def quantize_params(params):
    """RTN 4-bit: linears along their input axis, o along R, embed per row; block 3's up/down and lm_head as BCQ."""
    from uniql_jax.quant.formats import bcq

    rtn = jax.jit(quantize_rtn, static_argnames=("bits", "group_size", "axis"))
    to_bcq = jax.jit(bcq.from_uniform)
    rules = {"q": (0, 128), "k": (0, 128), "v": (0, 128), "o": (2, 8), "gate": (0, 128), "up": (0, 128),
             "down": (0, 128)}
    out = dict(params)
    out["embed"] = rtn(params["embed"], bits=4, group_size=128, axis=1)
    out["lm_head"] = to_bcq(rtn(params["lm_head"], bits=4, group_size=128, axis=0))
    blocks = []
    for i, blk in enumerate(params["blocks"]):
        new = {}
        for name, w in blk.items():
            if name in rules:
                axis, group = rules[name]
                w = rtn(w, bits=4, group_size=group, axis=axis)
                if i == 3 and name in ("up", "down"):
                    w = to_bcq(w)
            new[name] = w
        blocks.append(new)
    out["blocks"] = blocks
    return out


def pruned(cfg, params, rate, table):
    """uq.prune, jitted: one compile per rate instead of one per slice op."""
    small = {}

    def run(p):
        small["cfg"], p = prune(cfg, p, rate, table)
        return p

    params_p = jax.jit(run)(params)
    return small["cfg"], params_p


def assert_trees_identical(a, b):
    """Same structure (packed types and static fields included), dtypes and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class CompileCounter:
    """Counts XLA backend compilations while the ``with`` block runs."""

    def __enter__(self):
        self.count = 0
        self._listener = lambda event, duration, **kw: setattr(self, "count", self.count + (event == BACKEND_COMPILE_EVENT))
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    params = random_params(CFG, seed=0)
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    ck.save(path, CFG, params, table=DENSE_TABLE, meta=META)
    return path, params


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    params = quantize_params(random_params(QCFG, seed=1))
    path = tmp_path_factory.mktemp("quant") / "ckpt"
    ck.save(path, QCFG, params, table=QUANT_TABLE, meta=META)
    return path, params


@pytest.fixture
def dense_copy(dense, tmp_path):
    """A private copy to damage."""
    return Path(shutil.copytree(dense[0], tmp_path / "ckpt"))


# ---------------------------------------------------------------------------
# Config serialization
# ---------------------------------------------------------------------------


def test_config_json_round_trip_all_block_kinds():
    cfg = ModelConfig(
        arch="bamba", vocab_size=50, hidden_size=32,
        blocks=(Mamba2Block(0, 16, 8), MLPBlock(0, 64), AttentionBlock(1, 4, 2, 12), MLPBlock(1, 48)),
        num_heads=4, num_kv_heads=2, head_dim=12, rotary_dim=8, rope_scaling=(("factor", 8.0), ("rope_type", "llama3")),
        ssm_heads=4, ssm_head_dim=8, ssm_state=16, time_step_limit=(0.0, float("inf")), extra=(("torch_dtype", "bf16"),),
    )
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg and hash(back) == hash(cfg) and back.extra == cfg.extra
    assert back.blocks[0].kind == "mamba2" and back.time_step_limit == (0.0, float("inf"))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(bogus=1), "unknown model config fields"),
    (lambda d: d.pop("hidden_size"), "missing model config fields"),
    (lambda d: d["blocks"][0].update(kind="conv"), "not a block config"),
    (lambda d: d["blocks"][1].update(width="128"), "must be an int"),
])
def test_config_from_dict_rejects_bad_fields(edit, match):
    d = config_to_dict(CFG)
    edit(d)
    with pytest.raises(ValueError, match=match):
        config_from_dict(d)


# ---------------------------------------------------------------------------
# Round trips and load == prune
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which, cfg", [("dense", CFG), ("quant", QCFG)])
def test_round_trip_full_rank_is_bit_exact(which, cfg, request):
    path, params = request.getfixturevalue(which)
    cfg_loaded, loaded = uq.load(path)
    assert cfg_loaded == cfg
    assert_trees_identical(loaded, params)


def test_round_trip_bfloat16(tmp_path):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, random_params(CFG, 3))
    ck.save(tmp_path / "c", CFG, params, table=DENSE_TABLE)
    _, loaded = uq.load(tmp_path / "c")
    assert loaded["embed"].dtype == jnp.bfloat16
    assert_trees_identical(loaded, params)


def test_save_load_and_elastic_model_take_relative_paths(tmp_path, monkeypatch):
    """A relative folder (what a user types) works everywhere a path enters; the manifest is written
    where the user meant, and loading from another working directory through its absolute path agrees."""
    params = random_params(CFG, 5)
    monkeypatch.chdir(tmp_path)
    returned = uq.save("runs/ckpt", CFG, params, table=DENSE_TABLE)
    assert returned == tmp_path / "runs" / "ckpt" and returned.is_absolute()
    assert (tmp_path / "runs" / "ckpt" / ck.MANIFEST).is_file()
    for rate in DENSE_TABLE:
        cfg_r, loaded = uq.load("runs/ckpt", rate=rate)
        assert_trees_identical(loaded, pruned(CFG, params, rate, DENSE_TABLE)[1])
    model = ElasticModel.from_checkpoint("./runs/../runs/ckpt", rate=0.35)
    assert model.cfg == pruned(CFG, params, 0.35, DENSE_TABLE)[0]
    monkeypatch.chdir(tmp_path / "runs")
    assert_trees_identical(uq.load("ckpt", rate=0.2)[1], pruned(CFG, params, 0.2, DENSE_TABLE)[1])


def test_quantized_fixture_really_holds_both_packed_types(quant):
    from uniql_jax.quant.formats import bcq

    _, loaded = uq.load(quant[0])
    kinds = {type(x) for x in jax.tree.leaves(loaded, is_leaf=packed.is_packed)}
    assert {qarray.QArray, bcq.BCQArray} <= kinds


@pytest.mark.parametrize("which, cfg, table", [("dense", CFG, DENSE_TABLE), ("quant", QCFG, QUANT_TABLE)])
def test_load_at_rate_equals_prune_of_full_model(which, cfg, table, request):
    path, params = request.getfixturevalue(which)
    for rate in table:
        cfg_r, loaded = uq.load(path, rate=rate)
        cfg_p, params_p = pruned(cfg, params, rate, table)
        assert cfg_r == cfg_p
        assert_trees_identical(loaded, params_p)


# Hybrid (Bamba-like): Mamba2 d_state / head_dim, partial rotary pairs + pass channels, tied embeddings.
HYBRID = ModelConfig(
    arch="bamba", vocab_size=64, hidden_size=64, tie_word_embeddings=True,
    blocks=(Mamba2Block(0, 16, 8), MLPBlock(0, 128), AttentionBlock(1, 4, 8, 16), MLPBlock(1, 128)),
    num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=8, intermediate_size=128,
    ssm_heads=8, ssm_head_dim=8, ssm_groups=2, ssm_state=16,
)
HYBRID_TABLE = {
    0.1: (Mamba2Block(0, 12, 6), MLPBlock(0, 112), AttentionBlock(1, 3, 6, 12), MLPBlock(1, 96)),
    0.3: (Mamba2Block(0, 8, 4), MLPBlock(0, 80), AttentionBlock(1, 2, 5, 11), MLPBlock(1, 72)),
}


def test_hybrid_model_load_at_rate_equals_prune(tmp_path):
    params = random_params(HYBRID, seed=4)
    ck.save(tmp_path / "c", HYBRID, params, table=HYBRID_TABLE)
    assert "lm_head" not in params
    for rate in HYBRID_TABLE:
        cfg_r, loaded = uq.load(tmp_path / "c", rate=rate)
        cfg_p, params_p = pruned(HYBRID, params, rate, HYBRID_TABLE)
        assert cfg_r == cfg_p
        assert_trees_identical(loaded, params_p)
    assert_trees_identical(uq.load(tmp_path / "c", rate=0.0)[1], params)


def test_manifest_records_table_meta_quantizer_and_versions(quant):
    info = ck.read_info(quant[0])
    assert info.cfg == QCFG and info.rates == (0.0, 0.2, 0.35) and info.table == QUANT_TABLE
    assert info.meta == META
    assert info.provenance["versions"]["jax"] == jax.__version__
    assert info.quantization["packed"]["QArray"]["bits"] == [4]
    assert info.quantization["packed"]["BCQArray"]["count"] == 3
    assert info.param_bytes == packed.nbytes(quant[1])
    assert info.rate_bytes[0.35] < info.rate_bytes[0.2] < info.rate_bytes[0.0] == info.param_bytes


# ---------------------------------------------------------------------------
# Bytes read
# ---------------------------------------------------------------------------


def test_load_reads_only_the_kept_part(quant):
    path, _ = quant
    info = ck.read_info(path)
    read = {}
    for rate in info.rates:
        with ck.ReadCounter() as counter:
            uq.load(path, rate=rate)
        read[rate] = counter.tensorstore
    # The counter sees the data: a full-rank load reads at least the (zstd-compressed) payload.
    assert read[0.0] > 0.5 * info.param_bytes
    assert read[0.35] < read[0.2] < read[0.0]
    # Reads follow what each rate keeps (a small fixed overhead: OCDBT index nodes, zarr metadata) ...
    for rate in (0.2, 0.35):
        kept = info.rate_bytes[rate] / info.param_bytes
        assert read[rate] / read[0.0] < kept + 0.06, (rate, read, kept)
    # ... and 35 % reads at most ~70 % of the full model.
    assert read[0.35] <= 0.70 * read[0.0], read


# ---------------------------------------------------------------------------
# Switching rates in a running process
# ---------------------------------------------------------------------------


def test_elastic_model_switches_from_memory_equal_to_load(quant, tmp_path):
    """Packed params: every rate cut in memory equals uq.load at that rate; the disk is never touched."""
    path = Path(shutil.copytree(quant[0], tmp_path / "ckpt"))
    expected = {rate: uq.load(path, rate=rate) for rate in QUANT_TABLE}
    model = ElasticModel.from_checkpoint(path)
    shutil.rmtree(path)  # from here on, any read of the checkpoint would fail
    with ck.ReadCounter() as counter:
        for rate in (0.35, 0.0, 0.2, 0.35):
            cfg_r, params_r = model.set_rate(rate)
            assert cfg_r == expected[rate][0] and model.rate == rate
            assert_trees_identical(params_r, expected[rate][1])
    assert counter.tensorstore == 0
    # arrays a rate does not shrink are the full-rank ones, not copies
    assert model.params["embed"].codes is model.full_params["embed"].codes


def test_elastic_model_switching_back_costs_no_recompilation(dense):
    path, _ = dense
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % CFG.vocab_size
    cfg_r, params_r = uq.load(path, rate=0.35)
    logits = uq.forward(cfg_r, params_r, tokens)
    model = ElasticModel.from_checkpoint(path)
    for rate in (0.0, 0.35):  # first visit: traced and compiled
        model.set_rate(rate)
        model.forward(tokens)
    traces = dict(model.traces)
    with CompileCounter() as compiles:
        for rate in (0.0, 0.35, 0.0, 0.35):  # switching back and forth
            model.set_rate(rate)
            out = model.forward(tokens)
    np.testing.assert_array_equal(out, logits)
    assert traces.keys() == {0.0, 0.35} and model.traces == traces  # nothing traced again
    assert compiles.count == 0  # nor compiled


def test_compile_counter_sees_compilations():
    """The counter the switching test relies on does count a fresh compilation."""
    with CompileCounter() as compiles:
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    assert compiles.count >= 1


def test_elastic_model_rejects_bad_rates(quant):
    model = ElasticModel(QCFG, quant[1], QUANT_TABLE)
    with pytest.raises(ck.RateError, match="not stored"):
        model.set_rate(0.3)
    with pytest.raises(ck.RateError, match="outside"):
        model.set_rate(0.9)


# ---------------------------------------------------------------------------
# Bad inputs: one clear error each
# ---------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        uq.load(tmp_path / "nowhere", rate=0.0)


def test_checkpoint_path_is_a_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ck.CheckpointError, match="not a directory"):
        uq.load(tmp_path / "model.bin")


def test_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ck.CheckpointError, match="uniql.json is missing"):
        uq.load(tmp_path / "ckpt")


def _rewrite_body(path, edit):
    """Edit the manifest body and re-seal it (a well-formed but wrong manifest)."""
    doc = json.loads((path / ck.MANIFEST).read_text())
    edit(doc["body"])
    write_manifest(path, doc["body"])


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / ck.MANIFEST).write_text("{not json"), "not valid JSON"),
    (lambda p: (p / ck.MANIFEST).write_text(json.dumps({"hello": 1})), "not a uniql-jax-checkpoint manifest"),
    (lambda p: (p / ck.MANIFEST).write_text((p / ck.MANIFEST).read_text().replace('"seed": 0', '"seed": 7')),
     "does not match its sha256"),
    (lambda p: _rewrite_body(p, lambda b: b.pop("arrays")), "malformed checkpoint manifest"),
    (lambda p: _rewrite_body(p, lambda b: b["config"].pop("hidden_size")), "malformed checkpoint manifest"),
    (lambda p: _rewrite_body(p, lambda b: b["layout"]["dict"]["blocks"]["list"][0]["dict"].update(
        q={"packed": "os:system", "static": {}})), "unknown packed type 'os:system'"),
])
def test_malformed_manifest(dense_copy, damage, match):
    damage(dense_copy)
    with pytest.raises(ck.CheckpointError, match=match):
        uq.load(dense_copy, rate=0.2)


def test_truncated_data_file(dense_copy):
    victim = largest_data_file(dense_copy)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ck.CheckpointError, match="truncated"):
        uq.load(dense_copy, rate=0.35)


def test_missing_array_folder(dense_copy):
    shutil.rmtree(data_dir(dense_copy))
    with pytest.raises(ck.CheckpointError, match="missing"):
        uq.load(dense_copy)


def test_corrupted_metadata_file(dense_copy):
    victim = data_dir(dense_copy) / "_METADATA"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    victim.write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match="_METADATA is corrupted"):
        uq.load(dense_copy)


def _flip_bytes(victim: Path, start: int, count: int):
    raw = bytearray(victim.read_bytes())
    for i in range(start, min(start + count, len(raw))):
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))


def test_corrupted_array_bytes_fail_the_crc(tmp_path):
    """Uncompressed data: flipped bytes decode fine, only the recorded CRC-32 catches them."""
    params = random_params(CFG, seed=2)
    path = tmp_path / "raw"
    ck.save(path, CFG, params, table=DENSE_TABLE, compress=False)
    victim = largest_data_file(path)
    _flip_bytes(victim, victim.stat().st_size // 3, 64)
    with pytest.raises(ck.CheckpointError, match="fails its CRC-32"):
        uq.load(path)


def test_corrupted_compressed_data_is_one_clear_error(dense_copy):
    victim = largest_data_file(dense_copy)
    _flip_bytes(victim, victim.stat().st_size // 3, 64)
    with pytest.raises(ck.CheckpointError, match="corrupted"):
        uq.load(dense_copy)


@pytest.mark.parametrize("rate", [-0.05, 0.4, 1.0, float("nan"), float("inf")])
def test_rate_out_of_range(dense, rate):
    with pytest.raises(ck.RateError, match=r"outside \[0, 0.35\]"):
        uq.load(dense[0], rate=rate)


def test_rate_not_a_number(dense):
    with pytest.raises(ck.RateError, match="must be a number"):
        uq.load(dense[0], rate="a quarter")


def test_rate_not_in_table_is_an_error_naming_the_nearest(dense):
    with pytest.raises(ck.RateError, match=r"not stored.*0, 0.2, 0.35.*not rounded.*\(0.2\)"):
        uq.load(dense[0], rate=0.25)


def test_rate_zero_without_table_entry_is_full_rank(tmp_path, dense):
    _, params = dense
    table = {r: b for r, b in DENSE_TABLE.items() if r > 0}
    ck.save(tmp_path / "c", CFG, params, table=table)
    cfg, loaded = uq.load(tmp_path / "c", rate=0)
    assert cfg == CFG
    assert_trees_identical(loaded, params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(table={0.5: CFG.blocks[:2]}), "do not match the config"),
    (dict(table={1.5: CFG.blocks}), r"outside \[0, 1\)"),
    (dict(table={0.1: (AttentionBlock(0, 9, 0, 16),) + CFG.blocks[1:]}), "does not fit the params"),
    (dict(meta={"seed": object()}), "JSON-serializable"),
])
def test_save_rejects_bad_inputs(tmp_path, dense, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ck.save(tmp_path / "c", CFG, dense[1], **kwargs)
    assert not (tmp_path / "c" / ck.MANIFEST).exists()


@pytest.mark.parametrize("width", [64, 256])  # narrower than cfg: cannot be sliced; wider: would be silently cut
def test_save_rejects_params_of_another_config(tmp_path, width):
    other = CFG.with_blocks((AttentionBlock(0, 8, 0, 16), MLPBlock(0, width)) + CFG.blocks[2:])
    with pytest.raises(ValueError, match="params do not have the (structure|full-rank shapes) of cfg"):
        ck.save(tmp_path / "c", CFG, random_params(other, 0))


# ---------------------------------------------------------------------------
# Atomic save
# ---------------------------------------------------------------------------


def test_interrupted_save_keeps_previous_checkpoint(dense_copy, dense, monkeypatch):
    new_params = random_params(CFG, seed=5)

    def interrupted(path, body):
        raise KeyboardInterrupt  # everything written, nothing committed

    monkeypatch.setattr(ck_io, "_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save(dense_copy, CFG, new_params, table=DENSE_TABLE)
    _, loaded = uq.load(dense_copy)
    assert_trees_identical(loaded, dense[1])
    assert len(list(dense_copy.glob(DATA_PREFIX + "*"))) == 2  # the orphan, until the next save
    monkeypatch.undo()
    ck.save(dense_copy, CFG, new_params, table=DENSE_TABLE)
    assert_trees_identical(uq.load(dense_copy)[1], new_params)
    assert len(list(dense_copy.glob(DATA_PREFIX + "*"))) == 1


def test_killed_save_keeps_previous_checkpoint(dense_copy, dense):
    """A process killed (no cleanup, no exception handlers) just before its commit."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import uniql_jax as uq
        from uniql_jax import checkpoint as ck
        from uniql_jax.checkpoint import io as ck_io
        from tests.helpers import random_params
        from tests.test_checkpoint import CFG, DENSE_TABLE
        ck_io._commit = lambda path, body: os._exit(17)
        ck.save({str(dense_copy)!r}, CFG, random_params(CFG, seed=9), table=DENSE_TABLE)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    _, loaded = uq.load(dense_copy)
    assert_trees_identical(loaded, dense[1])


def test_interrupted_first_save_does_not_load(tmp_path, dense, monkeypatch):
    monkeypatch.setattr(ck_io, "_commit", lambda path, body: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path / "c", CFG, dense[1])
    with pytest.raises(ck.CheckpointError, match="missing"):
        uq.load(tmp_path / "c")
