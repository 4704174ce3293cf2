"""Helpers shared by several test files (tests never import other test files)."""

import json

import numpy as np
import torch


def hf_logits(model, tokens):
    """float32 logits of a transformers model on int tokens [B, T]."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def max_rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize_extras_(model, seed=0):
    """Give a freshly initialized transformers model random norms, biases, D, dt_bias and A_log
    (their initial values are constants a wrong mapping would not be caught on)."""
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
