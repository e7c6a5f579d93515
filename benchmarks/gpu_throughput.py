"""Training throughput and model FLOP utilisation (MFU) on this machine's accelerator, eager
against torch.compile, in the precision the GPU study trains in (`bf16-mixed`).

Per size, benchmarks/compile.py's `compare`: a fresh eager and a fresh compiled copy of one
model (the same weights, LitDecoder's optimizer and schedule, forward and loss under autocast
as Lightning runs them, a cold compile) stepped in turn on the same batches, each step timed
to the end of its kernels. Reported: each copy's tokens/s at its median step, the speed ratio
(median over back-to-back pairs), MFU, the compile seconds and the break-even steps.

MFU = 6 N x tokens/s / peak FLOP/s, with N the non-embedding parameters (the untied head
included: the 6 N D of nas.training.compiling, what `train.compile: auto` counts) and the peak from
`--peak-tflops` (dense bf16: 989 for an H100 or H200 SXM). Attention's own FLOPs are left out,
so MFU reads low at long sequences. On the CPU it is n/a.

The sizes are model presets at the GPU study's sequence length, vocabulary and batch
(studies/resformer_scaling_gpu.yaml), unless `--seq-len`, `--vocab-size` or `--batch-size`
say otherwise; by default the study's smallest and largest.

    python benchmarks/gpu_throughput.py --peak-tflops 989     # an H100 or H200, minutes
    python benchmarks/gpu_throughput.py --device cpu --sizes pico --seq-len 64 \\
        --vocab-size 256 --batch-size 4 --steps 4 --warmup 1  # a check on the CPU (32-true)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from compile import BreakEven, cold_compile_cache, compare, compiler_startup, run_config

from nas.config import MODEL_PRESETS
from nas.model.decoder import count_params
from nas.search.spec import load_spec

GPU_STUDY = Path(__file__).resolve().parents[1] / "studies" / "resformer_scaling_gpu.yaml"
PRECISIONS = ("bf16-mixed", "32-true")


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float | None,
        device: torch.device) -> str:
    """Model FLOP utilisation as a percentage, or n/a (no peak given, or the CPU)."""
    if peak_tflops is None or device.type == "cpu":
        return "n/a"
    return f"{100 * flops_per_step / step_seconds / (peak_tflops * 1e12):.1f}%"


def format_table(rows: Sequence[tuple[BreakEven, int, int]], precision: str,
                 peak_tflops: float | None, device: torch.device) -> str:
    """One row per size: (measurement, non-embedding parameters, tokens per step)."""
    lines = ["| size | non-embedding params | precision | eager tokens/s | compiled tokens/s "
             "| compiled / eager | eager MFU | compiled MFU | compile s | break-even steps |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r, n_params, tokens_per_step in rows:
        eager, compiled = statistics.median(r.eager), statistics.median(r.compiled)
        lines.append(
            f"| {r.size} | {n_params:,} | {precision} | {tokens_per_step / eager:,.0f} "
            f"| {tokens_per_step / compiled:,.0f} | {r.ratio:.2f}x "
            f"| {mfu(r.flops_per_step, eager, peak_tflops, device)} "
            f"| {mfu(r.flops_per_step, compiled, peak_tflops, device)} "
            f"| {r.compile_s:.1f} | {r.steps:,.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    spec = load_spec(GPU_STUDY)
    presets = spec.space["model"]["preset"]
    study_model, study_train = spec.base["model"], spec.base["train"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda where there is one)")
    parser.add_argument("--sizes", default=f"{presets[0]},{presets[-1]}",
                        help=f"comma-separated presets from {', '.join(MODEL_PRESETS)} "
                             f"(default: the GPU study's smallest and largest, "
                             f"{presets[0]},{presets[-1]})")
    parser.add_argument("--seq-len", type=int, default=study_model["seq_len"],
                        help=f"(default: the GPU study's, {study_model['seq_len']})")
    parser.add_argument("--vocab-size", type=int, default=study_model["vocab_size"],
                        help=f"(default: the GPU study's, {study_model['vocab_size']})")
    parser.add_argument("--batch-size", type=int, default=study_train["batch_size"],
                        help=f"(default: the GPU study's, {study_train['batch_size']})")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="train.precision (default: bf16-mixed on a GPU, 32-true on the CPU)")
    parser.add_argument("--mode", default="resformer", help="value_residual.mode (default "
                        "resformer, as benchmarks/compile.py)")
    parser.add_argument("--steps", type=int, default=30, help="timed pairs per size (default 30)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps after the first (default 3)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense TFLOP/s in the precision, for MFU "
                             "(989 for an H100 or H200 in bf16; default: MFU n/a)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in MODEL_PRESETS]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; allowed: {', '.join(MODEL_PRESETS)}")
    if args.precision is None:
        args.precision = "32-true" if args.device.type == "cpu" else "bf16-mixed"
    if min(args.steps, args.batch_size, args.seq_len, args.vocab_size) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size, --seq-len and --vocab-size must be >= 1, "
                     "--warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(f"# {text}", flush=True)

    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    log(f"torch {torch.__version__}, {where}")
    started = time.perf_counter()
    rows = []
    with cold_compile_cache():
        startup = compiler_startup(args.device)
        log(f"compiler start-up (nas.training.compiling.compiler_problem) {startup:.1f} s")
        for size in args.sizes:
            model = {**MODEL_PRESETS[size], "seq_len": args.seq_len,
                     "vocab_size": args.vocab_size}
            cfg = run_config(model, args.batch_size, 1 + args.warmup + args.steps, args.mode,
                             precision=args.precision)
            measured = compare(size, cfg, args.warmup, args.steps, startup, log, args.device)
            rows.append((measured, count_params(cfg)["n_params_non_embedding"],
                         cfg.tokens_per_step))
    print()
    print(format_table(rows, args.precision, args.peak_tflops, args.device))
    peak = f"peak {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "no peak given"
    print(f"\nmode {args.mode}, seq {args.seq_len}, vocab {args.vocab_size}, batch "
          f"{args.batch_size}; {args.steps} timed pairs after {args.warmup} untimed steps; MFU: "
          f"6N x tokens/s / {peak}, attention excluded; compiler start-up {startup:.1f} s "
          f"(in the break-even); {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
