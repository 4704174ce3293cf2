"""Importance matters: on real trained models, pruning UniQL's sorted order loses less than pruning a
random channel order or a weight-magnitude order under the same allocation (docs/method.md, "Stage 1: MLP").

The comparison is `compress.sort.importance_comparison` (what benchmarks/bench_sorting.py importance, the
README table, runs): calibration windows from the TinyStories training documents, perplexity on the held-out ones.
"""

import numpy as np
import pytest

from uniql_jax.compress.sort import importance_comparison
from uniql_jax.pipeline import load_named_model


def check_uniql_wins(name, rates, **budget):
    cfg, params, tok, _ = load_named_model(name)  # every default ships: a missing one fails here
    row = importance_comparison(cfg, params, tok, rates, **budget)
    ppl = row["ppl"]
    for i, r in enumerate(rates):
        assert row["params"][i] < row["dense_params"], r  # the rate really prunes...
        assert row["dense_ppl"] < ppl["uniql"][i], r  # ...pruning costs something...
        assert ppl["uniql"][i] < ppl["random"][i] and ppl["uniql"][i] < ppl["magnitude"][i], (r, ppl)  # ...least
    return row


# Default tier: the real stories260K and one trained default, at one rate with a small budget (~15-30 s each).
@pytest.mark.parametrize("model", ["stories260K", "llama"])
def test_uniql_order_beats_baselines_at_25_percent(model, shared_data):
    check_uniql_wins(model, [0.25], calib_samples=8, seq_len=128, eval_tokens=4096)


# The README table (python -m benchmarks.bench_sorting importance): same budget as the benchmark's defaults.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["stories260K", "llama", "mamba2", "nemotron_h", "bamba", "qwen2"])
def test_uniql_order_beats_baselines_at_15_25_35_percent(model, shared_data):
    row = check_uniql_wins(model, [0.15, 0.25, 0.35], calib_samples=32, seq_len=256)
    print(model, f"dense {row['dense_ppl']:.3f}", {k: np.round(v, 3).tolist() for k, v in row["ppl"].items()},
          f"{row['wall_s']:.0f} s")
