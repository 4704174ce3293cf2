"""The MoDeGPT-style baseline (compress.modegpt, benchmarks/bench_sorting.py) is the least-squares rebuild it claims to be."""

import numpy as np

from uniql_jax.compress import lowrank
from uniql_jax.compress.modegpt import modegpt_rebuild, output_error, synthetic_mlp


def test_modegpt_rebuild_is_the_least_squares_fit_of_the_kept_channels():
    C, W = synthetic_mlp(64, 16, seed=0)
    order = lowrank.descending_order(np.asarray(lowrank.ridge_leverage(C, backend="numpy")))
    everything = modegpt_rebuild(C, W, order)  # all channels kept: W_d itself, reordered
    assert np.allclose(everything, W[order], atol=1e-6)
    for k in (56, 40, 24):
        kept = order[:k]
        rebuilt = modegpt_rebuild(C, W, kept)
        e_rebuilt, e_sliced = output_error(C, W, kept, rebuilt), output_error(C, W, kept, W[kept])
        assert 0 < e_rebuilt < e_sliced  # the reconstruction buys accuracy at every rate...
        nudged = rebuilt + 1e-3 * np.random.default_rng(k).standard_normal(rebuilt.shape)
        assert output_error(C, W, kept, nudged) > e_rebuilt  # ...and is the optimum for its channels
