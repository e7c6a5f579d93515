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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas", description="Architecture search over value-residual patterns (ResFormer).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run config and write metrics.json")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--out", help="output folder (default: runs/train/<config name>)")
    p.add_argument("--data", help="override data.source: builtin, a text file or a .bin glob")
    p.set_defaults(func=cmd_train)
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
