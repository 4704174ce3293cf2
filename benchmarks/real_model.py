"""What the real-model benchmarks share: the shared data's paths and their command-line options.

SmolLM2-135M-Instruct (a tied-embedding Llama, GGUF) with WikiText-2: the test split for
evaluation, the validation split for calibration (``../shared/data``, never copied here).
"""

from __future__ import annotations

from uniql_jax.paths import REPO, SHARED_DATA as SHARED

__all__ = ["REPO", "SHARED", "SMOLLM2", "WIKITEXT2_TEST", "WIKITEXT2_VALID", "add_model_and_data_args"]
SMOLLM2 = SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT2_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT2_VALID = SHARED / "wikitext-2" / "valid.txt"


def add_model_and_data_args(p, *, windows: int = 20, seq_len: int = 512) -> None:
    """--model, --eval, --calib, --windows, --seq-len with the shared real model and text as defaults."""
    p.add_argument("--model", default=str(SMOLLM2), help="HF folder or .gguf file (default: the shared SmolLM2-135M-Instruct)")
    p.add_argument("--eval", default=str(WIKITEXT2_TEST), help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--calib", default=str(WIKITEXT2_VALID), help="calibration text (default: WikiText-2 valid)")
    p.add_argument("--windows", type=int, default=windows, help=f"evaluation windows (default {windows})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")
