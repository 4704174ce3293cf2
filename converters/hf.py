"""Hugging Face checkpoints <-> (ModelConfig, params): strict, declarative, no code execution.

``load`` reads config.json and the weights (safetensors, sharded safetensors with an
index, or PyTorch .bin through a weights-only unpickler) - or a single ``.gguf`` file,
dequantized to float (``converters.gguf``) - picks the arch's mapping table in
``converters.mappings`` and converts. Strict: a config attribute that changes the math
and is not handled, a missing tensor, an unexpected tensor or a shape mismatch raises
``CheckpointError`` naming it. ``save`` writes the inverse, which ``transformers`` loads.

The config rule (``ConfigReader``), one rule for every arch. Each attribute of config.json is

1. *mapped*: read by the arch's mapping (``get`` / ``require``) into the ModelConfig;
2. *checked*: accepted only at a value whose math we implement (``expect``, or an explicit
   consistency check in the mapping); any other value raises naming attribute and value;
3. *inert*: declared not to change a forward pass, globally (``INERT``: names, versions,
   dtypes, ``auto_map``, token ids, cache and generation flags, dropout, init ranges) or
   per arch (``ConfigReader.inert``: e.g. ``time_step_*`` initialization knobs); or
4. *not defined by transformers*: an attribute that transformers' own config class for the
   ``model_type`` does not define and its modelling code does not read (``transformers_attributes``:
   the class's fields, ``__init__`` parameters, ``attribute_map`` aliases, the legacy names it
   converts, and every ``config.X`` its modelling source reads) is carried as an unused extra by
   transformers, so it cannot change transformers' forward: we accept it too and log it once at
   INFO (e.g. ``is_llama_config``, ``norm_before_gate``, ``use_mamba_kernels`` for Bamba).

A leftover that transformers *does* define but the mapping did not consume raises
``CheckpointError`` naming attribute and value: the installed transformers is the reference
for which attributes exist, so a new attribute in a future transformers fails loudly until a
mapping decides about it. Where an attribute transformers ignores is known to describe the
math of the original training code (``rope_interleaved``, ``use_mrope``, ``rms_norm``,
``attention_head_dim``, ...), the mapping checks it like case 2 instead: a value that the
stored weights would need and that neither transformers nor we compute is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import logging
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters.errors import CheckpointError  # noqa: F401  (re-exported: callers catch hf.CheckpointError)
from uniql_jax.config import ModelConfig
from uniql_jax.quant.formats.packed import is_packed

log = logging.getLogger(__name__)


# model_type in config.json -> module in converters.mappings (the module's arch names are the same)
MODEL_TYPES = {"llama": "llama", "qwen2": "llama", "mamba2": "mamba2", "nemotron_h": "nemotron_h", "bamba": "bamba"}
ARCH_MODULES = MODEL_TYPES

# Attributes that never change the math of a forward pass, whatever the arch: bookkeeping and
# names (incl. the remote-code pointer auto_map and the GGUF loader's _model_name_or_path),
# storage dtype, task heads we do not build, token ids (read where ModelConfig keeps them),
# cache / generation flags, dropout (identity at inference) and initialization ranges.
INERT = {
    "transformers_version", "architectures", "_name_or_path", "_model_name_or_path", "model_type", "auto_map",
    "_attn_implementation_autoset", "_commit_hash", "tokenizer_class", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
    "use_cache", "num_logits_to_keep", "attention_dropout", "hidden_dropout", "initializer_range",
    "max_position_embeddings",
}
# legacy spellings transformers' RoPE utilities convert into rope_parameters for every model that has it
ROPE_LEGACY = {"rope_theta", "rope_scaling", "partial_rotary_factor"}


@functools.cache
def transformers_attributes(model_type: str) -> tuple[str, frozenset[str]]:
    """(class name, every attribute name) of the installed transformers' config class for
    `model_type`: dataclass fields, ``__init__`` parameters, the keys of a default instance's
    ``to_dict()``, ``attribute_map`` aliases, every ``config.X`` / ``getattr(config, "X", ...)`` its
    modelling source reads (Qwen2 and Bamba read ``head_dim`` that their classes do not define), the
    legacy names the mapping module declares transformers converts (``TRANSFORMERS_LEGACY``) and
    the RoPE legacy keys."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError as e:
        raise CheckpointError(f"the installed transformers has no config class for model_type {model_type!r}") from e
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    try:
        names |= set(cls().to_dict())
    except (ValueError, TypeError):  # a default instance that fails the class's own validation
        pass
    names |= set(getattr(cls, "attribute_map", {}))
    names |= modelling_reads(model_type)
    names |= set(getattr(mapping_for(model_type), "TRANSFORMERS_LEGACY", ()))
    if "rope_parameters" in names:
        names |= ROPE_LEGACY
    return cls.__name__, frozenset(names)


def modelling_reads(model_type: str) -> set[str]:
    """Attribute names transformers' modelling source for `model_type` reads from its config (read as
    text: importing it would import torch)."""
    import transformers

    f = Path(transformers.__file__).parent / "models" / model_type / f"modeling_{model_type}.py"
    if not f.is_file():
        return set()
    src = f.read_text()
    return (set(re.findall(r"\bconfig\.([A-Za-z_][A-Za-z_0-9]*)", src))
            | set(re.findall(r"getattr\(\s*(?:self\.)?config\s*,\s*[\"']([A-Za-z_][A-Za-z_0-9]*)", src)))


_logged_ignored: set[tuple[str, str]] = set()


class ConfigReader:
    """Consumes a config.json dict attribute by attribute; ``finish`` applies the config rule
    (module docstring) to whatever the mapping did not consume."""

    def __init__(self, raw: dict, source: str = "config.json", model_type: str | None = None):
        self.raw, self.source, self.used = dict(raw), source, set()
        self.ignored: list[str] = []  # set by finish: attributes accepted because transformers does not define them
        self.model_type = model_type if model_type is not None else raw.get("model_type")

    def get(self, key, default=None):
        self.used.add(key)
        return self.raw.get(key, default)

    def require(self, key):
        if key not in self.raw:
            raise CheckpointError(f"{self.source}: missing required attribute {key!r}")
        return self.get(key)

    def expect(self, key, *allowed):
        """An attribute we do not implement: accept it only at a value that leaves the math as handled
        (absent = the first allowed value)."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{self.source}: unsupported {key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        return value

    def agree(self, key, expected, meaning: str):
        """An attribute that restates a value we derive elsewhere: absent, or equal to it."""
        value = self.get(key)
        if value is not None and value != expected:
            raise CheckpointError(f"{self.source}: unsupported {key}={value!r}: {meaning} is {expected!r}")
        return value

    def inert(self, *keys):
        """Attributes declared not to change a forward pass (initialization, kernels, training only)."""
        self.used.update(keys)

    def finish(self):
        left = sorted(set(self.raw) - self.used - INERT)
        if not left:
            return
        cls_name, defined = transformers_attributes(self.model_type)
        refused = [k for k in left if k in defined]
        if refused:
            what = ", ".join(f"{k}={self.raw[k]!r}" for k in refused)
            raise CheckpointError(f"{self.source}: unsupported attribute(s) {what} "
                                  f"(transformers' {cls_name} defines them; this converter does not implement them)")
        self.ignored = [k for k in left if k not in defined]
        new = [k for k in self.ignored if (self.model_type, k) not in _logged_ignored]
        if new:
            _logged_ignored.update((self.model_type, k) for k in new)
            log.info("%s: ignoring attribute(s) %s: transformers' %s does not define them, so its modelling code "
                     "ignores them too", self.source, ", ".join(f"{k}={self.raw[k]!r}" for k in new), cls_name)


def mapping_for(model_type_or_arch: str):
    name = MODEL_TYPES.get(model_type_or_arch) or ARCH_MODULES.get(model_type_or_arch)
    if name is None:
        raise CheckpointError(f"unsupported model_type {model_type_or_arch!r}; supported: {', '.join(MODEL_TYPES)}")
    try:
        return importlib.import_module(f"converters.mappings.{name}")
    except ModuleNotFoundError as e:
        raise CheckpointError(f"no converter for {model_type_or_arch!r} yet ({e})") from e


# ----------------------------------------------------------------------------- files


def resolve(path) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (offline: fails at once)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    name = str(path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(name, local_files_only=offline, etag_timeout=5,
                                  allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
    except Exception as e:  # network, auth, missing repo: one clear line
        how = "HF_HUB_OFFLINE is set and it is not cached" if offline else type(e).__name__
        raise CheckpointError(f"{path}: not a local directory and cannot be fetched from the Hub ({how})") from e
    return Path(local)


def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint)")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from e


def _weight_files(folder: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from e
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: missing shard(s) {', '.join(missing)}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights (model.safetensors, a sharded index, or pytorch_model.bin)")


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays (bfloat16 kept via ml_dtypes)."""
    tensors = {}
    for f in _weight_files(folder):
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="flax") as sf:
                    for k in sf.keys():
                        tensors[k] = np.asarray(sf.get_tensor(k))
            else:
                import torch  # only for .bin checkpoints; weights_only never runs pickled code

                state = torch.load(str(f), map_location="cpu", weights_only=True)
                for k, v in state.items():
                    v = v.detach()
                    tensors[k] = (np.asarray(jnp.asarray(v.float().numpy(), jnp.bfloat16))
                                  if v.dtype == torch.bfloat16 else v.numpy())
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"{f}: unreadable weights ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from e
    return tensors


class TensorTaker:
    """Hands out checkpoint tensors by name, checking shapes; ``finish`` rejects leftovers.

    It takes over the caller's dict and empties it as it hands tensors out, so a tensor lives
    only as long as the mapping's layout of it needs."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"missing tensor {name!r}")
        t = self.tensors.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {tuple(shape)}")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    def finish(self):
        if self.tensors:
            names = sorted(self.tensors)
            raise CheckpointError(f"unexpected tensor(s) {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")


# ----------------------------------------------------------------------------- public API


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{source}: no model_type")
    reader = ConfigReader(raw, source, model_type)
    cfg = mapping_for(model_type).config_from_hf(reader, model_type)
    reader.finish()
    return cfg


def is_gguf(path) -> bool:
    return str(path).endswith(".gguf")


def arch_of(path) -> str:
    """Our arch name ('llama', 'qwen2', 'mamba2', 'nemotron_h', 'bamba') of an HF checkpoint folder
    or Hub id (config.json's model_type) or a .gguf file (its general.architecture)."""
    if is_gguf(path):
        from converters import gguf

        return gguf.arch_of(path)
    folder = resolve(path)
    model_type = read_config(folder).get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{folder / 'config.json'}: unsupported model_type {model_type!r}; "
                              f"supported: {', '.join(MODEL_TYPES)}")
    return model_type


def load(path, dtype=None) -> tuple[ModelConfig, dict]:
    """HF checkpoint folder, Hub id or .gguf file -> (ModelConfig, params). `dtype` casts floating weights
    (GGUF weights are dequantized to float32)."""
    if is_gguf(path):
        from converters import gguf

        raw, tensors, source = gguf.read(path)
    else:
        folder = resolve(path)
        raw, source = read_config(folder), str(folder / "config.json")
        tensors = None
    cfg = config_from_hf(raw, source)
    # The taker holds the only reference to each tensor, so a tensor is freed as soon as the
    # mapping has made its own layout of it, and _to_jax_consuming frees each host array as it
    # becomes a jax one: the load peaks near one float copy of the model, not three.
    take = TensorTaker(tensors if tensors is not None else read_tensors(folder))
    del tensors
    params = mapping_for(cfg.arch).params_from_hf(cfg, take)
    take.finish()
    _to_jax_consuming(params, dtype)
    return cfg, params


def _to_jax_consuming(tree, dtype) -> None:
    """Replace every array leaf of a tree of dicts and lists by a jax array, in place, dropping the
    host array before the next leaf is converted."""
    for key in list(tree) if isinstance(tree, dict) else range(len(tree)):
        if isinstance(tree[key], (dict, list)):
            _to_jax_consuming(tree[key], dtype)
        elif tree[key] is not None:
            y = jnp.asarray(tree[key])
            tree[key] = y.astype(dtype) if dtype is not None and jnp.issubdtype(y.dtype, jnp.floating) else y


def save(cfg: ModelConfig, params: dict, out_dir) -> None:
    """Write an HF checkpoint (config.json + model.safetensors) that transformers loads."""
    import jax
    from safetensors.numpy import save_file

    if any(is_packed(x) for x in jax.tree.leaves(params, is_leaf=is_packed)):
        raise CheckpointError("hf.save takes dense weights; dequantize the params first")
    mapping = mapping_for(cfg.arch)
    raw = mapping.config_to_hf(cfg)
    tensors = mapping.params_to_hf(cfg, jax.tree.map(np.asarray, params))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def load_tokenizer(path):
    """The checkpoint's tokenizer through transformers (never remote code); for a .gguf file, the
    tokenizer stored in the file."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        f = Path(path)
        if not f.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        folder, kwargs = f.parent, {"gguf_file": f.name}
    else:
        folder, kwargs = resolve(path), {}
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except Exception as e:  # any failure of transformers' tokenizer loading: one line, cause chained
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from e
