"""The `nas` command line: train, search, confirm, export, report, analyze, generate,
dashboard, prepare. Each command is a small function that parses, calls the module that owns
the work and prints; the parser is one piece (about 500 lines with it) so `nas --help` and every
option's help text live in one place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.errors import ConfigError, shorten
from nas.flags import Parser, integer, number, text
from nas.interrupt import CTRL_C, Interrupted

if TYPE_CHECKING:
    from nas.search.spec import StudySpec


def cmd_train(args: argparse.Namespace) -> int:
    from nas.overrides import load_config as load_with_overrides
    from nas.paths import first_process
    from nas.run_folder import METRICS_FILE

    cfg = load_with_overrides(args.config, args.set, args.data)
    out = Path(args.out) if args.out is not None else Path("runs") / "train" / Path(
        args.config).stem
    size, plan = cfg.model, cfg.value_residual
    # at once, before the seconds torch and Lightning take to import; once, by DDP's rank 0
    # (Lightning's DDP runs this command again for each other process)
    if first_process():
        print(f"training {args.config} into {out}: {plan.mode}, {size.n_layer} layers, d_model "
              f"{size.d_model}, {cfg.train.steps:,} steps of {cfg.tokens_per_step:,} tokens",
              flush=True)
    from nas.training.lit import DivergenceError
    from nas.training.train import TimeLimitError, check_memory, train

    if not args.force:
        check_memory(cfg, args.config)
    try:
        m = train(cfg, out, overwrite=args.overwrite, resume=args.resume,
                  progress=show_progress(args))
    except (DivergenceError, TimeLimitError) as exc:
        print(f"nas train: {exc}", file=sys.stderr)
        return 1
    if not first_process():
        return 0  # another DDP process of the run: rank 0 says how it ended
    print(f"val_loss {m['val_loss']:.4f}  n_params {m['n_params']:,}  "
          f"tokens {m['tokens']:,}  {m['tokens_per_s']:,.0f} tokens/s  -> {out / METRICS_FILE}")
    return 0


def study_spec(args: argparse.Namespace, path: str | Path, **given: Any) -> StudySpec:
    """The study spec at `path` with the `--set` overrides its study stored (see
    `nas.search.stored_overrides`), saying in one line on stderr which it applies."""
    from nas.search.stored_overrides import load_study_spec

    return load_study_spec(path, args.storage, note=lambda line: print(
        f"nas {args.command}: {line}", file=sys.stderr, flush=True), **given)


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only where someone watches it: not with --no-progress, and not where
    output goes to a file or a pipe (a log would get every redraw of the bar)."""
    return not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()


def cmd_search(args: argparse.Namespace) -> int:
    from nas.search.console import front_table
    from nas.search.worker import SearchError, run_search

    spec = study_spec(args, args.study, data=args.data, sets=args.set,
                      warm_start=args.warm_start, write=True)
    try:
        study = run_search(spec, args.storage, n_trials=args.n_trials, timeout=args.timeout,
                           worker_id=args.worker_id, progress=show_progress(args),
                           threads=args.threads, force=args.force)
    except SearchError as exc:
        print(f"nas search: {exc}", file=sys.stderr)
        return 1
    print(front_table(study))
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from nas.confirm import prepare, run_confirm
    from nas.reading.confirmation import CONFIRM_ATTR, read
    from nas.reading.summary import confirmation_sections, sections_markdown
    from nas.search.trials import completed
    from nas.search.worker import SearchError

    if args.threads is not None and args.threads <= 0:
        raise ConfigError(f"--threads: must be > 0, got {args.threads}")
    derived = prepare(study_spec(args, args.study), args.storage, top=args.top, pareto=args.pareto,
                      trials=args.trials, seeds=args.seeds, first_seed=args.first_seed,
                      name=args.name, rates=args.rates, variants=args.variants)
    try:
        study = run_confirm(derived, threads=args.threads, progress=show_progress(args))
    except SearchError as exc:
        print(f"nas confirm: {exc}", file=sys.stderr)
        return 1
    confirmation = read(study.study_name, study.user_attrs[CONFIRM_ATTR], completed(study))
    print(sections_markdown(confirmation_sections(confirmation)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nas.paths import check_output
    from nas.reading.export import (
        check_choice,
        choose_trials,
        export_trials,
        summary_files,
        trial_file,
    )
    from nas.search.study import open_existing

    if args.hf:
        return _export_hf(args)
    if Path(args.study).is_dir():
        raise ConfigError(f"{args.study}: a folder; to export a `nas train` run as a Hugging "
                          "Face model pass --hf")
    check_choice(args.pareto, args.best)
    spec = study_spec(args, args.study)
    check_output(args.out, "--out", folder=True, inside=[
        trial_file(spec.name, 9999), *summary_files(spec.name)])
    study = open_existing(spec, args.storage)
    rows = export_trials(study, choose_trials(study, args.pareto, args.best), args.out)
    for r in rows:
        print(f"{args.out}/{r['file']}  trial {r['trial']:>3}  {r['plan']:<30} "
              f"{r['n_params']:>10,} params  val_loss {r['val_loss']:.4f}")
    print(f"exported {len(rows)} run config(s) to {args.out} "
          f"({', '.join(summary_files(study.study_name))}); "
          f"train one again with: nas train {args.out}/{rows[0]['file']}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    """`nas export RUN_DIR --hf`: the run as a Hugging Face model folder."""
    from nas.hf.export import export_hf
    from nas.paths import check_output
    from nas.training.trained_run import load_run

    chosen = [flag for flag, value in (("--pareto", args.pareto), ("--best", args.best),
                                       ("--storage", args.storage)) if value]
    if chosen:
        raise ConfigError(f"--hf exports one `nas train` run folder; {', '.join(chosen)} "
                          "choose(s) trials of a study")
    check_output(args.out, "--out", folder=True)
    run, out = Path(args.study), Path(args.out)
    cfg, model = load_run(run)
    carried = export_hf(cfg, model, out, run)  # what tokenizer the folder carries
    print(f"wrote {out}: with {carried}; use it with pipeline('text-generation', "
          f"model={str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nas.extras import require

    require("report", "nas report")
    from nas.paths import check_output
    from nas.reading.confirmation import load_confirmations
    from nas.reading.report import write_report
    from nas.reading.summary import summary_markdown
    from nas.search.lr_sweep import stored_protocol
    from nas.search.study import open_existing
    from nas.search.trials import completed

    check_output(args.out, "--out", folder=False)
    spec = study_spec(args, args.study)
    study = open_existing(spec, args.storage)
    figures, left_out = write_report(study, args.out, source=spec.path, image=args.image)
    print(summary_markdown(completed(study), stored_protocol(study), load_confirmations(study)))
    print(f"\nwrote {args.out}: {', '.join(figures)}")
    for key, why in left_out.items():
        print(f"left out {key}: {why}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Per-layer attention entropy, value similarity and coefficients of one trained model:
    a `nas train` output folder, a run config (trained first), or a study trial."""
    import json

    from nas.config import load_config
    from nas.model.analysis import analysis_table
    from nas.parsing import read_yaml

    target = Path(args.target)
    if not target.exists():
        raise ConfigError(f"{target}: no such file or folder")
    if target.is_dir():
        result = _analyze_run_folder(target)
    elif isinstance(raw := read_yaml(target), dict) and "space" in raw:  # a study spec
        result = _analyze_trial(args, target)
    else:
        from nas.training.train import train

        cfg = load_config(target)
        out = Path(args.out) if args.out is not None else Path("runs") / "train" / target.stem
        metrics = train(cfg, out, overwrite=args.overwrite, progress=show_progress(args))
        print(f"trained {target} -> {out} (val_loss {metrics['val_loss']:.4f})")
        result = {k: metrics[k] for k in ("analysis", "coefficients", "receiving_layers")}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(analysis_table(result["analysis"], result["coefficients"],
                             result["receiving_layers"]))
    return 0


def _analyze_run_folder(folder: Path) -> dict:
    from nas.training.data import TokenDataModule
    from nas.training.train import analyze_windows
    from nas.training.trained_run import load_run

    cfg, model = load_run(folder)
    return {"analysis": analyze_windows(model, TokenDataModule.for_run(cfg)),
            "coefficients": model.residual.coefficients(),
            "receiving_layers": cfg.value_residual.receiving(cfg.model.n_layer)}


def _analyze_trial(args: argparse.Namespace, study_path: Path) -> dict:
    from nas.search.study import open_existing
    from nas.search.trials import TrialRecord

    number = args.trial
    if number is None:
        raise ConfigError(f"{study_path}: a study spec; pass --trial N to analyze its trial N")
    study = open_existing(study_spec(args, study_path), args.storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"--trial: no trial {number} in study {study.study_name!r} "
                          f"(trials 0..{len(trials) - 1})")
    record = TrialRecord.from_trial(trials[number])
    if not record.analysis:
        raise ConfigError(f"--trial: trial {number} has no analysis ({trials[number].state.name}"
                          "; only trials that completed carry one)")
    return {"analysis": record.analysis, "coefficients": record.coefficients,
            "receiving_layers": record.receiving_layers}


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue --prompt with text sampled from a trained run, through the model's KV cache."""
    import torch

    from nas.training.trained_run import codec, load_run

    folder = Path(args.run_dir)
    cfg, model = load_run(folder)
    encode, decode = codec(folder, cfg.model.vocab_size)
    ids = encode(args.prompt)
    if not ids:
        raise ConfigError(f"--prompt: {args.prompt!r} encodes to no tokens")
    if args.seed is None:
        torch.seed()  # a fresh seed: torch's default one is the same in every process
    else:
        torch.manual_seed(args.seed)
    out = model.eval().generate(torch.tensor([ids]), args.max_new_tokens, args.temperature,
                                args.top_k)
    print(decode(out[0].tolist()))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from nas.extras import require

    require("dashboard", "nas dashboard")
    from nas.reading.dashboard import serve

    serve(study_spec(args, args.study), args.storage, host=args.host, port=args.port,
          artifacts=args.artifacts, refresh=args.refresh, allow_remote=args.allow_remote)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize text files into the shards and tokenizer.json a run config trains on."""
    from nas.training.prepare import prepare

    done = prepare(args.files, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                   shard_tokens=args.shard_tokens, progress=show_progress(args))
    counts = ", ".join(f"{name} {n:,} tokens ({done.shards[name]} shard(s))"
                       for name, n in done.tokens.items() if n)
    print(f"wrote {done.out}: vocab {done.vocab_size:,}; {counts}; train on it with "
          f"data.source: {done.out} (model.vocab_size comes from its tokenizer.json)")
    return 0


NO_PROGRESS_HELP = ("no progress bar (there is none anyway where the output is not a "
                    "terminal)")
# The bounds of flags whose code would take any number: generation is one forward per token,
# with nothing printed until the end; torch's thread pool; a thread's wait.
MAX_NEW_TOKENS = 100_000
MAX_THREADS = 4096
MAX_REFRESH = 10.0**6

SET_HELP = ("override one key, validated as the file is (repeat it; dotted keys; the value "
            "read as YAML)")
FORCE_HELP = ("train even where the estimated training memory exceeds the free memory (the "
              "estimate is rough)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nas", description="Architecture search over value-residual patterns (ResFormer).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run config and write metrics.json")
    p.add_argument("config", type=text, help="run config YAML")
    p.add_argument("--out", type=text,
                   help="output folder, written at once when the run ends (default: "
                   "runs/train/<config name>; an exported config's name holds its study and "
                   "trial)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not empty")
    p.add_argument("--resume", action="store_true", help="continue a run that did not finish "
                   "from its last checkpoint in <out>.checkpoints (train.checkpoint_every)")
    p.add_argument("--data", type=text,
                   help="override data.source: builtin, a text file, a .bin glob or "
                   "a `nas prepare` folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=SET_HELP + " of the run config, e.g. --set train.lr=1e-3")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="create or resume a study and run its trials")
    p.add_argument("study", type=text, help="study spec YAML")
    p.add_argument("--storage", type=text,
                   help="sqlite:///PATH (one machine), postgresql://USER@HOST/DB "
                   "(many machines), journal:PATH or a plain file path (default: the spec's, "
                   "else sqlite:///runs/<name>.db)")
    p.add_argument("--n-trials", type=integer(1),
                   help="this worker starts this many trials, whatever "
                   "their outcome (default: run until the study holds the spec's n_trials "
                   "finished trials, with every other worker on it)")
    p.add_argument("--timeout", type=number(0, low_open=True),
                   help="stop starting trials after S seconds")
    p.add_argument("--data", type=text, help="override data.source for every trial")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=SET_HELP + " of the space (fixing a key it searched), e.g. --set "
                   "train.steps=2000; a resumed study must be given the same")
    p.add_argument("--warm-start", type=text, metavar="STUDY[@STORAGE]",
                   help="seed a new study with the "
                   "finished trials of an earlier one whose space shares its keys (storage: "
                   "default this study's); overrides the spec's warm_start")
    # below 2**31: added to the spec's seed (below 2**31), it seeds numpy (below 2**32)
    p.add_argument("--worker-id", type=integer(0, 2**31 - 1),
                   help="0, 1, 2, ... distinct per worker sharing the "
                   "study: the sampler seed is the spec's seed plus this")
    p.add_argument("--threads", type=integer(1, MAX_THREADS),
                   help="CPU threads for training (torch) (default: "
                   "OMP_NUM_THREADS if set, else this machine's cores / its nas search "
                   "workers, recounted before each trial)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_search)

    storage_help = "the study's storage (default: the spec's, else sqlite:///runs/<name>.db)"
    p = sub.add_parser("confirm", help="train a study's chosen plans, and vanilla at their "
                       "shapes and budgets, again on fresh seeds, and report what they are worth")
    p.add_argument("study", help="study spec YAML")
    p.add_argument("--top", type=int, metavar="K", help="the K plans (vanilla aside) with the "
                   "lowest validation loss in the study")
    p.add_argument("--pareto", action="store_true", help="the plans of the study's front")
    p.add_argument("--trials", metavar="N,M,...", help="the plans of these trials")
    p.add_argument("--seeds", type=int, required=True, metavar="S", help="fresh seeds per "
                   "plan (at least 2)")
    p.add_argument("--first-seed", type=int, metavar="F", help="the seeds F..F+S-1 (default: "
                   "the S smallest above every seed the study declares or ran; an overlap with "
                   "those is refused)")
    p.add_argument("--rates", metavar="R1,R2,...", help="every plan and vanilla sweep these "
                   "learning rates on the fresh seeds and each reports its best on them "
                   "(all_seeds), instead of the study's own rate rule: the same tuning for the "
                   "baseline as for the plans (at most sqrt(2) apart)")
    p.add_argument("--variants", metavar="FILE", help="also the named variants of this space "
                   "file (its `variants`, e.g. search_spaces/paper_variants.yaml) at every "
                   "chosen plan's shape, budget and vanilla's rates, each against vanilla and "
                   "each searched plan against the best of them")
    p.add_argument("--name", help="the confirmation study (default: <study>-confirm); a new "
                   "name for other plans or seeds than an existing confirmation's")
    p.add_argument("--storage", help=storage_help + "; the confirmation is stored there too")
    p.add_argument("--threads", type=int, help="CPU threads for training (as nas search)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("export", help="write the chosen trials as run configs for nas train, "
                       "or (--hf) a trained run as a Hugging Face model")
    p.add_argument("study", type=text, metavar="STUDY.yaml|RUN_DIR",
                   help="study spec YAML; with --hf, a "
                   "`nas train --out` folder (config.yaml, model.pt)")
    p.add_argument("--hf", action="store_true", help="write RUN_DIR as a Hugging Face model "
                   "folder that AutoModelForCausalLM loads (trust_remote_code=True); needs "
                   "resformer-nas[hf]")
    p.add_argument("--storage", type=text, help=storage_help)
    p.add_argument("--pareto", action="store_true", help="export the Pareto front")
    p.add_argument("--best", type=integer(1), metavar="K",
                   help="export the K lowest-loss trials")
    p.add_argument("--out", type=text, required=True,
                   help="output folder (with --hf: new or empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write the interactive HTML report of a study")
    p.add_argument("study", type=text, help="study spec YAML")
    p.add_argument("--storage", type=text, help=storage_help)
    p.add_argument("--out", type=text, required=True, help="the HTML file to write")
    p.add_argument("--image", type=text,
                   help="also write X-<figure>.png or .svg per figure (needs kaleido)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze", help="per-layer attention entropy, value similarity to "
                       "layer 0 and coefficients of one trained model")
    p.add_argument("target", type=text,
                   help="a `nas train --out` folder, a run config YAML (trained "
                   "first) or a study spec YAML with --trial")
    p.add_argument("--trial", type=integer(0), help="with a study spec: the trial number")
    p.add_argument("--storage", type=text, help=storage_help)
    p.add_argument("--out", type=text,
                   help="with a run config: the training output folder (default: "
                   "runs/train/<config name>)")
    p.add_argument("--overwrite", action="store_true", help="with a run config: replace an "
                   "--out that is not empty")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP + "; with a "
                   "run config")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("generate", help="continue a prompt with text sampled from a trained "
                       "model (through its KV cache)")
    p.add_argument("run_dir", type=text,
                   help="a `nas train --out` folder (config.yaml, model.pt; a "
                   "tokenizer.json where the vocabulary is not bytes)")
    p.add_argument("--prompt", type=text, required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=integer(1, MAX_NEW_TOKENS), default=200,
                   help=f"tokens to sample (default: 200; at most {MAX_NEW_TOKENS:,})")
    p.add_argument("--temperature", type=number(0), default=1.0, help="divides the logits "
                   "before the softmax: below 1 sharper, above 1 flatter, 0 the most likely "
                   "token each time (greedy: the same text as --top-k 1) (default: 1)")
    p.add_argument("--top-k", type=integer(1), help="sample among the K most likely tokens only "
                   "(default: all)")
    p.add_argument("--seed", type=integer(0, 2**32 - 1),
                   help="seed the sampling: the same seed gives the same "
                   "text (default: a fresh seed)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study")
    p.add_argument("study", type=text, help="study spec YAML")
    p.add_argument("--storage", type=text, help=storage_help)
    p.add_argument("--host", type=text, default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; "
                   "any other than a loopback address needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="serve on a --host other machines "
                   "reach: optuna-dashboard has no authentication and can delete studies; "
                   "prefer an SSH tunnel to 127.0.0.1")
    p.add_argument("--port", type=integer(0, 65535), default=8080,
                   help="port (default: 8080; 0: any free)")
    p.add_argument("--artifacts", type=text,
                   help="artifact folder (default: the spec's, else next to the "
                   "storage: runs/<name>-artifacts)")
    p.add_argument("--refresh", type=number(0, MAX_REFRESH), default=60.0,
                   help="seconds between checks for "
                   "new trials to refresh the note and figures (0: never)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("prepare", help="train a byte-level BPE tokenizer on text files and "
                       "write train/val/test .bin shards for data.source")
    p.add_argument("files", type=text, nargs="+", metavar="TEXT_FILE",
                   help="UTF-8 text files, read as "
                   "one stream in this order (the held-out splits are its end)")
    p.add_argument("--out", type=text, required=True, help="the folder to write (new or empty): "
                   "tokenizer.json, train_*.bin, val_*.bin, test_*.bin")
    p.add_argument("--vocab-size", type=integer(), help="train a tokenizer of this many tokens "
                   "(256..65535, the bytes and <|endoftext|> included)")
    p.add_argument("--tokenizer", type=text, help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=number(), default=0.1, help="share of the text that "
                   "validates (default: 0.1)")
    p.add_argument("--test-fraction", type=number(), default=0.05, help="share of the text that "
                   "tests, at its end (default: 0.05; 0: no test set)")
    p.add_argument("--shard-tokens", type=integer(), help="tokens per shard (default: 100M, as "
                   "modded-nanogpt's)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_prepare)
    return parser


# The most of a refusal's line that is printed: its parts quote excerpts of what they refuse
# (`parsing.excerpt`); this bounds what they did not foresee (a 100,000-character key).
MAX_ERROR_LINE = 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and argparse's refusals, one line (2): `Parser`
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with CTRL_C:  # Ctrl+C, SIGTERM and a preemption notice, whatever the command is doing
            return args.func(args)
    except ConfigError as exc:
        line = " ".join(str(exc).split())  # one line, whatever a library's text held
        print(f"nas {args.command}: error: {shorten(line, MAX_ERROR_LINE)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"nas {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return exc.exit_status if isinstance(exc, Interrupted) else 130
