"""GGUF files (llama.cpp) -> an HF-style config dict and HF-named float tensors, for ``hf.load``.

Read with the ``gguf`` package (numpy only; no torch): metadata keys become the attributes of
the HF config.json transformers' GGUF loader would write, every tensor is dequantized to
float32 and renamed to its HF name, after which the arch's ordinary mapping table converts it.

llama.cpp's converter permutes the rows of each Llama q/k head from HF's rotate-half layout
``[half 0 | half 1]`` to the interleaved pair layout ``[(0, P), (1, P + 1), ...]``
(``convert_hf_to_gguf.py`` ``LlamaModel.permute``); ``unpermute`` undoes it, as transformers'
GGUF loader does. Qwen2 files keep HF's layout (llama.cpp does not permute them).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from converters.errors import CheckpointError

# general.architecture -> our arch (the HF model_type)
ARCHS = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_QK = {"llama"}  # archs whose q/k rows llama.cpp permutes

# GGUF metadata key (after '<arch>.') -> HF config attribute
CONFIG_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings", "vocab_size": "vocab_size",
}
TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id"}
# metadata that does not describe the network (provenance, tokenizer, quantization bookkeeping)
INERT_PREFIXES = ("general.", "tokenizer.", "GGUF.", "split.", "quantize.")

# GGUF tensor names -> HF names (per layer: blk.{i}.X -> model.layers.{i}.Y)
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def _reader(path):
    f = Path(path)
    if not f.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        import gguf
    except ModuleNotFoundError as e:
        raise CheckpointError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from e
    try:
        return gguf.GGUFReader(str(f))
    except Exception as e:  # not GGUF, truncated, unknown version: one line, cause chained
        raise CheckpointError(f"{path}: unreadable GGUF ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from e


def _metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or
            k.endswith("_id")}


def arch_of(path) -> str:
    meta = _metadata(_reader(path))
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")
    return ARCHS[arch]


def config_from_gguf(meta: dict, source: str, tied: bool) -> dict:
    """The HF config.json attributes a GGUF's metadata states; unknown '<arch>.*' keys raise."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")
    raw = {"model_type": ARCHS[arch], "tie_word_embeddings": tied, "hidden_act": "silu"}
    prefix = arch + "."
    unknown, rope_dim = [], None
    for key, value in meta.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name in CONFIG_KEYS:
                raw[CONFIG_KEYS[name]] = value
            elif name == "rope.dimension_count":
                rope_dim = value
            else:
                unknown.append(f"{key}={value!r}")
        elif key.startswith("tokenizer.ggml.") and key[len("tokenizer.ggml."):] in TOKEN_KEYS:
            raw[TOKEN_KEYS[key[len("tokenizer.ggml."):]]] = value
        elif not key.startswith(INERT_PREFIXES):
            unknown.append(f"{key}={value!r}")
    if unknown:  # e.g. rope scaling, sliding windows, logit soft-capping: not read, so refused
        raise CheckpointError(f"{source}: unsupported GGUF metadata {', '.join(sorted(unknown))}")
    heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
    if heads and hidden:
        raw["head_dim"] = hidden // heads
        if rope_dim is not None and rope_dim != raw["head_dim"]:
            raise CheckpointError(f"{source}: {prefix}rope.dimension_count={rope_dim} but head_dim={raw['head_dim']}: "
                                  f"partial rotary is not supported")
    return raw


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows of each head go from pair-interleaved back to
    rotate-half order. w: [n_heads * head_dim, ...] (a weight or a bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path) -> tuple[dict, dict[str, np.ndarray], str]:
    """(HF config dict, {HF tensor name: float32 array}, source name) of a GGUF file."""
    import gguf

    reader = _reader(path)
    source = str(path)
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    raw = config_from_gguf(meta, source, tied="output.weight" not in names)
    if "vocab_size" not in raw and "tokenizer.ggml.tokens" in reader.fields:
        raw["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    permute = meta["general.architecture"] in PERMUTED_QK
    tensors = {}
    for t in reader.tensors:
        m = LAYER_NAME.fullmatch(t.name)
        if t.name in TOP_TENSORS:
            name = TOP_TENSORS[t.name]
        elif m and m.group(2) in LAYER_TENSORS:
            name = f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"
        else:
            raise CheckpointError(f"{source}: unexpected GGUF tensor {t.name!r}")
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError as e:
            raise CheckpointError(f"{source}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from e
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGML lists the fastest axis first
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute(w, raw["num_attention_heads"])
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute(w, raw.get("num_key_value_heads") or raw["num_attention_heads"])
        tensors[name] = w
    return raw, tensors, source
