"""The `nas` command line: train, search, export, report, analyze, dashboard."""

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
    from .console import front_table
    from .search import SearchError, run_search
    from .spec import load_spec

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
    from .spec import load_spec
    from .study import open_existing

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
    from .spec import load_spec
    from .study import open_existing
    from .summary import summary_markdown
    from .trials import completed

    spec = load_spec(args.study)
    study = open_existing(spec, args.storage)
    figures = write_report(study, args.out, source=spec.path, image=args.image)
    print(summary_markdown(completed(study)))
    print(f"\nwrote {args.out}: {', '.join(figures)}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Per-layer attention entropy, value similarity and coefficients of one trained model:
    a `nas train` output folder, a run config (trained first), or a study trial."""
    import json

    from .analysis import analysis_table
    from .config import read_yaml

    target = Path(args.target)
    if not target.exists():
        raise ConfigError(f"{target}: no such file or folder")
    if target.is_dir():
        result = _analyze_run_folder(target)
    elif isinstance(raw := read_yaml(target), dict) and "space" in raw:  # a study spec
        result = _analyze_trial(target, args.trial, args.storage)
    else:
        from .train import train

        cfg = load_config(target)
        out = Path(args.out) if args.out else Path("runs") / "train" / target.stem
        metrics = train(cfg, out)
        print(f"trained {target} -> {out} (val_loss {metrics['val_loss']:.4f})")
        result = {k: metrics[k] for k in ("analysis", "coefficients", "receiving_layers")}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(analysis_table(result["analysis"], result["coefficients"],
                             result["receiving_layers"]))
    return 0


def _analyze_run_folder(folder: Path) -> dict:
    import torch

    from .data import TokenDataModule
    from .model import build_model
    from .train import analyze_windows

    for name in ("config.yaml", "model.pt"):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name}; expected a `nas train --out` folder")
    cfg = load_config(folder / "config.yaml")
    model = build_model(cfg)
    try:
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True,
                                         map_location="cpu"))
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder / 'model.pt'}: does not fit config.yaml: {first}") from None
    return {"analysis": analyze_windows(model, TokenDataModule.for_run(cfg)),
            "coefficients": model.residual.coefficients(),
            "receiving_layers": cfg.value_residual.receiving(cfg.model.n_layer)}


def _analyze_trial(study_path: Path, number: int | None, storage: str | None) -> dict:
    from .spec import load_spec
    from .study import open_existing

    if number is None:
        raise ConfigError(f"{study_path}: a study spec; pass --trial N to analyze its trial N")
    study = open_existing(load_spec(study_path), storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"--trial: no trial {number} in study {study.study_name!r} "
                          f"(trials 0..{len(trials) - 1})")
    attrs = trials[number].user_attrs
    if "analysis" not in attrs:
        raise ConfigError(f"--trial: trial {number} has no analysis ({trials[number].state.name}"
                          "; only trials that completed carry one)")
    return {k: attrs.get(k, {} if k == "coefficients" else []) for k in
            ("analysis", "coefficients", "receiving_layers")}


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import serve
    from .spec import load_spec

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

    p = sub.add_parser("analyze", help="per-layer attention entropy, value similarity to "
                       "layer 0 and coefficients of one trained model")
    p.add_argument("target", help="a `nas train --out` folder, a run config YAML (trained "
                   "first) or a study spec YAML with --trial")
    p.add_argument("--trial", type=int, help="with a study spec: the trial number")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--out", help="with a run config: the training output folder (default: "
                   "runs/train/<config name>)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_analyze)

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
