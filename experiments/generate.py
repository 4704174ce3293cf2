"""Generate text from a compressed checkpoint at a chosen pruning rate.

    python -m experiments.generate --ckpt runs/llama-.../ --rate 0.25 --prompt "Once upon a time"
"""

from __future__ import annotations

import sys

from experiments import common


def build_parser():
    p = common.Parser(prog="python -m experiments.generate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="output folder of experiments.compress")
    p.add_argument("--rate", type=float, default=0.0, help="stored pruning rate to load (default 0)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--impl", choices=("xla", "pallas"), default="xla", help="kernels: xla (default) or pallas")
    return p


def run(argv=None) -> str:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise common.UsageError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise common.UsageError("--temperature must be >= 0")
    from uniql_jax import pipeline

    run_dir, ckpt = pipeline.checkpoint_dir(args.ckpt)
    text = pipeline.generate_text(run_dir, ckpt, args.rate, args.prompt, args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed, impl=args.impl)
    print(text)
    return text


def main(argv=None):
    common.main_guard(lambda: run(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
