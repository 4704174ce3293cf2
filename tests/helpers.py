"""Helpers shared by several test files (tests never import other test files)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def hf_logits(model, tokens):
    """float32 logits of a transformers model on int tokens [B, T]."""
    import torch  # only the converter tests need it

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def max_rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize_extras_(model, seed=0):
    """Give a freshly initialized transformers model random norms, biases, D, dt_bias and A_log
    (their initial values are constants a wrong mapping would not be caught on)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.copy_(1.0 + 0.3 * randn(p))
            elif leaf == "dt_bias":
                p.copy_(torch.rand(p.shape, generator=gen) * 4.5 - 4.0)
            elif leaf == "A_log":
                p.copy_(torch.rand(p.shape, generator=gen) * 2.5 - 1.0)
            elif leaf in ("bias", "D"):
                p.copy_(0.5 * randn(p))
    return model


def edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# ----------------------------------------------------------------------------- random models, checkpoints
def random_params(cfg, seed: int):
    """Gaussian weights, unit norms, identity pair indices of `cfg` (numpy: no per-shape XLA compiles)."""
    from uniql_jax.compress.prune import abstract_params

    rng = np.random.default_rng(seed)

    def leaf(path, sds):
        if jnp.issubdtype(sds.dtype, jnp.integer):
            return jnp.asarray(np.broadcast_to(np.arange(sds.shape[-1], dtype=sds.dtype), sds.shape))
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(sds.shape, sds.dtype)
        return jnp.asarray((0.05 * rng.standard_normal(sds.shape)).astype(sds.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def data_dir(path: Path) -> Path:
    """The data folder of the checkpoint at `path`, as its manifest names it."""
    from uniql_jax import checkpoint as ck

    return path / json.loads((path / ck.MANIFEST).read_text())["body"]["data"]


def largest_data_file(path: Path) -> Path:
    """The largest array data file of the checkpoint at `path`."""
    from uniql_jax.checkpoint.manifest import is_data_file

    files = [p for p in data_dir(path).rglob("*") if p.is_file() and is_data_file(p.relative_to(data_dir(path)).as_posix())]
    return max(files, key=lambda p: p.stat().st_size)
