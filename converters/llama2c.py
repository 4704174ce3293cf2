"""llama2.c v0 checkpoints (e.g. stories260K) and their tokenizer.bin.

The weights are rearranged into Hugging Face Llama tensor names and go through the
same strict Llama mapping as any HF checkpoint, so both paths share one source of
truth. llama2.c rotates interleaved pairs (2i, 2i+1); HF Llama rotates halves
(i, i + head_dim/2): the rows of wq and wk are permuted within each head.
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

import numpy as np

from converters.errors import CheckpointError
from converters.hf import TensorTaker
from converters.mappings import llama as llama_mapping
from uniql_jax.config import AttentionBlock, MLPBlock, ModelConfig

HEADER = struct.Struct("<7i")


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows [n_heads * hd, in] from (2i, 2i+1) pair order to (i, i + hd/2) order per head."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def load(path) -> tuple[ModelConfig, dict]:
    """A llama2.c v0 .bin -> (ModelConfig, params) of the equivalent HF Llama (float32)."""
    import jax.numpy as jnp

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such llama2.c checkpoint")
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise CheckpointError(f"{path}: too short for a llama2.c header")
    dim, hidden, L, H, K, vocab, seq_len = HEADER.unpack_from(data)
    shared = vocab > 0
    V = abs(vocab)
    if min(dim, hidden, L, H, K, V, seq_len) <= 0 or dim % H or H % K:
        raise CheckpointError(f"{path}: implausible llama2.c header {dim, hidden, L, H, K, vocab, seq_len}")
    hd = dim // H
    shapes = [("embed", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, H * hd, dim)), ("wk", (L, K * hd, dim)),
              ("wv", (L, K * hd, dim)), ("wo", (L, dim, H * hd)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("freq_real", (seq_len, hd // 2)), ("freq_imag", (seq_len, hd // 2))]
    if not shared:
        shapes.append(("wcls", (V, dim)))
    need = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(data) != need:
        raise CheckpointError(f"{path}: {len(data)} bytes, the header implies {need} (truncated or not v0)")
    flat = np.frombuffer(data, np.float32, offset=HEADER.size)
    arrays, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = flat[at:at + n].reshape(shape)
        at += n
    tensors = {"model.embed_tokens.weight": arrays["embed"], "model.norm.weight": arrays["rms_final"]}
    if not shared:
        tensors["lm_head.weight"] = arrays["wcls"]
    for i in range(L):
        pre = f"model.layers.{i}."
        tensors.update({
            pre + "input_layernorm.weight": arrays["rms_att"][i],
            pre + "self_attn.q_proj.weight": interleaved_to_halves(arrays["wq"][i], H),
            pre + "self_attn.k_proj.weight": interleaved_to_halves(arrays["wk"][i], K),
            pre + "self_attn.v_proj.weight": arrays["wv"][i],
            pre + "self_attn.o_proj.weight": arrays["wo"][i],
            pre + "post_attention_layernorm.weight": arrays["rms_ffn"][i],
            pre + "mlp.gate_proj.weight": arrays["w1"][i],
            pre + "mlp.down_proj.weight": arrays["w2"][i],
            pre + "mlp.up_proj.weight": arrays["w3"][i],
        })
    blocks = tuple(b for i in range(L) for b in (AttentionBlock(i, hd // 2, 0, hd), MLPBlock(i, hidden)))
    cfg = ModelConfig(arch="llama", vocab_size=V, hidden_size=dim, blocks=blocks, rms_norm_eps=1e-5,
                      tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2, max_position_embeddings=seq_len,
                      num_heads=H, num_kv_heads=K, head_dim=hd, rotary_dim=hd, rope_theta=10000.0,
                      intermediate_size=hidden, mlp_activation="silu_gated")
    take = TensorTaker(tensors)
    params = llama_mapping.params_from_hf(cfg, take)
    take.finish()
    import jax

    return cfg, jax.tree.map(lambda x: jnp.asarray(np.array(x)), params)


class Llama2cTokenizer:
    """The llama2.c BPE tokenizer: scored merges over UTF-8 pieces with <0xXX> byte fallback.

    ``encode`` follows llama2.c's ``encode``: a dummy-prefix space, per-character
    lookup (bytes +3 when unknown), then repeatedly merge the adjacent pair whose
    merged piece has the highest score.
    """

    BOS, EOS = 1, 2

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self.index = {p: i for i, p in enumerate(pieces)}
        self.vocab_size = len(pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.BOS] if bos else []
        if not text:
            return ids + ([self.EOS] if eos else [])
        toks = []
        for ch in (" " + text):
            b = ch.encode("utf-8")
            if b in self.index:
                toks.append(self.index[b])
            else:
                toks.extend(byte + 3 for byte in b)
        toks = self._merge(toks)
        return ids + toks + ([self.EOS] if eos else [])

    def _merge(self, toks: list[int]) -> list[int]:
        """llama2.c's merge rule (best score first, leftmost on ties) in O(n log n):
        a heap of candidate pairs over a linked list, stale entries skipped when popped."""
        n = len(toks)
        tok, nxt, prev = list(toks), list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap = []

        def push(i):
            j = nxt[i]
            if j != -1:
                merged = self.index.get(self.pieces[tok[i]] + self.pieces[tok[j]])
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], i, tok[i], tok[j], merged))

        for i in range(n - 1):
            push(i)
        alive = [True] * n
        while heap:
            _, i, a, b, merged = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j == -1 or tok[i] != a or tok[j] != b:
                continue  # stale: one side has merged since
            tok[i], alive[j], nxt[i] = merged, False, nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            if prev[i] != -1:
                push(prev[i])
            push(i)
        return [t for t, keep in zip(tok, alive) if keep]

    def decode(self, ids) -> str:
        out = bytearray()
        prev = None
        for t in (int(i) for i in ids):
            if t in (self.BOS, self.EOS):
                prev = t
                continue
            piece = self.pieces[t]
            if prev in (None, self.BOS) and piece.startswith(b" "):
                piece = piece[1:]  # the dummy prefix space
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            prev = t
        return out.decode("utf-8", errors="replace")


def load_tokenizer(path) -> Llama2cTokenizer:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such llama2.c tokenizer")
    data = path.read_bytes()
    pieces, scores, at = [], [], 4
    try:
        while at < len(data):
            score, n = struct.unpack_from("<fi", data, at)
            at += 8
            if n < 0 or at + n > len(data):
                raise struct.error("bad length")
            pieces.append(data[at:at + n])
            scores.append(score)
            at += n
    except struct.error as e:
        raise CheckpointError(f"{path}: malformed llama2.c tokenizer") from e
    return Llama2cTokenizer(pieces, scores)
