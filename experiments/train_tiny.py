"""Train a tiny model of any arch from scratch on a text file; write a standard HF checkpoint.

    python -m experiments.train_tiny --arch llama --out experiments/defaults/llama
    python -m experiments.train_tiny --arch nemotron_h --pattern "M-M*-M-" --steps 600 --out /tmp/nh
    python -m experiments.train_tiny --table          # the results table of the embedded defaults

Parses the flags and calls ``uniql_jax.tiny.train_tiny`` (the steps: its docstring); writes
config.json + model.safetensors, the tokenizer and results.json into --out.
"""

from __future__ import annotations

from uniql_jax.paths import DEFAULTS, TINYSTORIES
from uniql_jax.tiny import PRESETS, TinyConfig, table, train_tiny


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=tuple(PRESETS))
    p.add_argument("--out", help="output folder (default: experiments/defaults/<arch>)")
    p.add_argument("--text", default=str(TINYSTORIES), help="training text file (default: the shared TinyStories)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of documents held out (the last ones)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    for name in ("hidden", "layers", "heads", "kv-heads", "head-dim", "mlp", "ssm-heads", "ssm-head-dim", "d-state",
                 "groups"):
        p.add_argument(f"--{name}", type=int, help="override of the arch preset")
    p.add_argument("--pattern", help="hybrid layout, letters M (Mamba2), * (attention), - (MLP; nemotron_h only)")
    p.add_argument("--table", action="store_true", help="print the results table of the embedded defaults and exit")
    args = p.parse_args(argv)
    if not args.table and not args.arch:
        p.error("--arch is required (or --table)")
    if args.arch and not args.out:
        args.out = str(DEFAULTS / args.arch)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table())
        return
    train_tiny(TinyConfig(**{k: v for k, v in vars(args).items() if k != "table"}))


if __name__ == "__main__":
    main()
