"""The `nas` command line: train, search, export, report, dashboard."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, load_config


def cmd_train(args: argparse.Namespace) -> int:
    from .lit import DivergenceError
    from .train import train

    cfg = load_config(args.config)
    if args.data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=args.data))
    out = Path(args.out) if args.out else Path("runs") / "train" / Path(args.config).stem
    try:
        m = train(cfg, out)
    except DivergenceError as exc:
        print(f"nas train: {exc}", file=sys.stderr)
        return 1
    print(f"val_loss {m['val_loss']:.4f}  n_params {m['n_params']:,}  "
          f"tokens {m['tokens']:,}  {m['tokens_per_s']:,.0f} tokens/s  -> {out / 'metrics.json'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .study import front_table, load_spec, run_search

    for flag in ("n_trials", "timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be > 0, got {value}")
    spec = load_spec(args.study, data=args.data)
    study = run_search(spec, args.storage, n_trials=args.n_trials, timeout=args.timeout,
                       worker_id=args.worker_id, progress=not args.no_progress)
    print(front_table(study))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas", description="Architecture search over value-residual patterns (ResFormer).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run config and write metrics.json")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--out", help="output folder (default: runs/train/<config name>)")
    p.add_argument("--data", help="override data.source: builtin, a text file or a .bin glob")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="create or resume a study and run its trials")
    p.add_argument("study", help="study spec YAML")
    p.add_argument("--storage", help="sqlite:///PATH, postgresql+psycopg://..., journal:PATH "
                   "(default: the spec's, else sqlite:///runs/<name>.db)")
    p.add_argument("--n-trials", type=int, help="run this many new trials (default: until the "
                   "study holds the spec's n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after S seconds")
    p.add_argument("--data", help="override data.source for every trial")
    p.add_argument("--worker-id", type=int, help="distinct per worker: offsets the sampler seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"nas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nas {args.command}: interrupted", file=sys.stderr)
        return 130
