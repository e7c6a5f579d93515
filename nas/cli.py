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
    from .study import SearchError, front_table, load_spec, run_search

    for flag, zero_ok in (("n_trials", False), ("timeout", False), ("worker_id", True),
                          ("threads", False)):
        value = getattr(args, flag)
        if value is not None and (value < 0 if zero_ok else value <= 0):
            raise ConfigError(f"--{flag.replace('_', '-')}: must be "
                              f"{'>= 0' if zero_ok else '> 0'}, got {value}")
    spec = load_spec(args.study, data=args.data)
    try:
        study = run_search(spec, args.storage, n_trials=args.n_trials, timeout=args.timeout,
                           worker_id=args.worker_id, progress=not args.no_progress,
                           threads=args.threads)
    except SearchError as exc:
        print(f"nas search: {exc}", file=sys.stderr)
        return 1
    print(front_table(study))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_choice, choose_trials, export_trials
    from .study import load_spec, open_existing

    check_choice(args.pareto, args.best)
    study = open_existing(load_spec(args.study), args.storage)
    rows = export_trials(study, choose_trials(study, args.pareto, args.best), args.out)
    for r in rows:
        print(f"{args.out}/{r['file']}  trial {r['trial']:>3}  {r['plan']:<30} "
              f"{r['n_params']:>10,} params  val_loss {r['val_loss']:.4f}")
    print(f"exported {len(rows)} run config(s) to {args.out} (summary.csv, summary.json); "
          f"train one again with: nas train {args.out}/{rows[0]['file']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .study import load_spec, open_existing

    spec = load_spec(args.study)
    figures = write_report(open_existing(spec, args.storage), args.out, source=spec.path,
                           image=args.image)
    print(f"wrote {args.out}: {', '.join(figures)}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import serve
    from .study import load_spec

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in 0..65535, got {args.port}")
    serve(load_spec(args.study), args.storage, host=args.host, port=args.port,
          artifacts=args.artifacts, refresh=args.refresh)
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
    p.add_argument("--storage", help="sqlite:///PATH (one machine), postgresql://USER@HOST/DB "
                   "(many machines), journal:PATH or a plain file path (default: the spec's, "
                   "else sqlite:///runs/<name>.db)")
    p.add_argument("--n-trials", type=int, help="this worker starts this many trials, whatever "
                   "their outcome (default: run until the study holds the spec's n_trials "
                   "finished trials, with every other worker on it)")
    p.add_argument("--timeout", type=float, help="stop starting trials after S seconds")
    p.add_argument("--data", help="override data.source for every trial")
    p.add_argument("--worker-id", type=int, help="0, 1, 2, ... distinct per worker sharing the "
                   "study: the sampler seed is the spec's seed plus this")
    p.add_argument("--threads", type=int, help="CPU threads for training (torch); set it to "
                   "cores / workers when several workers share one machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=cmd_search)

    storage_help = "the study's storage (default: the spec's, else sqlite:///runs/<name>.db)"
    p = sub.add_parser("export", help="write the chosen trials as run configs for nas train")
    p.add_argument("study", help="study spec YAML")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--pareto", action="store_true", help="export the Pareto front")
    p.add_argument("--best", type=int, metavar="K", help="export the K lowest-loss trials")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write the interactive HTML report of a study")
    p.add_argument("study", help="study spec YAML")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--image", help="also write X-<figure>.png or .svg per figure (needs kaleido)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study")
    p.add_argument("study", help="study spec YAML")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free)")
    p.add_argument("--artifacts", help="artifact folder (default: the spec's, else next to the "
                   "storage: runs/<name>-artifacts)")
    p.add_argument("--refresh", type=float, default=60.0, help="seconds between checks for "
                   "new trials to refresh the note and figures (0: never)")
    p.set_defaults(func=cmd_dashboard)
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
