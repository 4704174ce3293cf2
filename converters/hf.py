"""Hugging Face checkpoints <-> (ModelConfig, params): strict, declarative, no code execution.

``load`` reads config.json and the weights (safetensors, sharded safetensors with an
index, or PyTorch .bin through a weights-only unpickler), picks the arch's mapping
table in ``converters.mappings`` and converts. Strict: a config attribute that
changes the math and is not handled, a missing tensor, an unexpected tensor or a
shape mismatch raises ``CheckpointError`` naming it. ``save`` writes the inverse,
which ``transformers`` loads.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from uniql_jax.config import ModelConfig
from uniql_jax.quant.qarray import is_qarray


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted (message names the problem)."""


# model_type in config.json -> module in converters.mappings
MODEL_TYPES = {"llama": "llama", "qwen2": "llama", "mamba2": "mamba2", "nemotron_h": "nemotron_h", "bamba": "bamba"}
ARCH_MODULES = {"llama": "llama", "qwen2": "llama", "mamba2": "mamba2", "nemotron_h": "nemotron_h", "bamba": "bamba"}

# config.json attributes that never change the math of a forward pass
INFORMATIONAL = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "initializer_range", "use_cache", "_name_or_path", "model_type", "output_attentions",
    "attention_dropout", "tokenizer_class", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "tie_word_embeddings", "_attn_implementation_autoset", "use_return_dict",
}


class ConfigReader:
    """Consumes a config.json dict attribute by attribute; ``finish`` rejects leftovers."""

    def __init__(self, raw: dict, source: str = "config.json"):
        self.raw, self.source, self.used = dict(raw), source, set()

    def get(self, key, default=None):
        self.used.add(key)
        return self.raw.get(key, default)

    def require(self, key):
        if key not in self.raw:
            raise CheckpointError(f"{self.source}: missing required attribute {key!r}")
        return self.get(key)

    def expect(self, key, *allowed):
        """An attribute we do not implement: accept it only at a value that leaves the math as handled."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{self.source}: unsupported {key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        return value

    def finish(self):
        unknown = sorted(set(self.raw) - self.used - INFORMATIONAL)
        if unknown:
            raise CheckpointError(f"{self.source}: unsupported attribute(s) {', '.join(unknown)}")


def mapping_for(model_type_or_arch: str):
    name = MODEL_TYPES.get(model_type_or_arch) or ARCH_MODULES.get(model_type_or_arch)
    if name is None:
        raise CheckpointError(f"unsupported model_type {model_type_or_arch!r}; supported: {', '.join(MODEL_TYPES)}")
    try:
        return importlib.import_module(f"converters.mappings.{name}")
    except ModuleNotFoundError as e:
        raise CheckpointError(f"no converter for {model_type_or_arch!r} yet ({e})") from None


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
        raise CheckpointError(f"{path}: not a local directory and cannot be fetched from the Hub ({how})") from None
    return Path(local)


def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint)")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def _weight_files(folder: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
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
            raise CheckpointError(f"{f}: unreadable weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return tensors


class TensorTaker:
    """Hands out checkpoint tensors by name, checking shapes; ``finish`` rejects leftovers."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = dict(tensors)

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
    reader = ConfigReader(raw, source)
    cfg = mapping_for(model_type).config_from_hf(reader, model_type)
    reader.finish()
    return cfg


def load(path, dtype=None) -> tuple[ModelConfig, dict]:
    """HF checkpoint folder or Hub id -> (ModelConfig, params). `dtype` casts floating weights."""
    folder = resolve(path)
    cfg = config_from_hf(read_config(folder), str(folder / "config.json"))
    take = TensorTaker(read_tensors(folder))
    params = mapping_for(cfg.arch).params_from_hf(cfg, take)
    take.finish()
    params = _to_jax(params, dtype)
    return cfg, params


def _to_jax(params, dtype):
    import jax

    def conv(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(conv, params)


def save(cfg: ModelConfig, params: dict, out_dir) -> None:
    """Write an HF checkpoint (config.json + model.safetensors) that transformers loads."""
    import jax
    from safetensors.numpy import save_file

    if any(is_qarray(x) or hasattr(x, "dequantize") for x in jax.tree.leaves(params, is_leaf=lambda x: is_qarray(x) or hasattr(x, "dequantize"))):
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
    """The checkpoint's tokenizer through transformers (never remote code)."""
    from transformers import AutoTokenizer

    folder = resolve(path)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{folder}: no usable tokenizer ({type(e).__name__})") from None
