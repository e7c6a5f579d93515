"""Training throughput of every value-residual mode, and of the Lightning path.

Prints one Markdown table of tokens/s and ratios, then a verdict line per target of the issue:

- every zero-parameter mode (resformer, neutreno, svformer) trains at >= 0.97x vanilla;
- the Lightning path (`nas.training.train.train`) trains at >= 0.95x a bare loop of the same model;
- with `--compile`, torch.compile trains at >= 1.15x eager at the 6-layer d128 size (`base`).

Every measurement trains fresh models (`torch.manual_seed`) on the same batches: those
`nas.training.train.train` draws for the run config (`nas.training.data.RandomWindows` on the
builtin corpus). Only step time counts (forward, cross-entropy, backward, grad clipping, AdamW,
schedule), as `nas.training.train.StepTimer` counts it for the Lightning path. Shared machines are
noisy, so:

- the modes are compared step by step: each round trains one fresh model per mode, and every
  step of the round steps all of them in turn (a rotating order), so a slow patch on the
  machine hits every mode alike; a mode's tokens/s in a round is at its median step time, so
  one step stalled by another process does not count;
- Lightning cannot be stepped that way, so each round also runs a bare vanilla loop alone and
  `nas.training.train.train` on the same config, back to back, in alternating order; both count all
  steps, as `nas.training.train.train` reports them;
- one untimed warm-up round comes first; the table quotes the median tokens/s over the rounds
  and the median of the per-round ratios to the baseline of the same round.

`--compile` adds, per size, a compiled row and a break-even row, measured by
benchmarks/compile.py's `compare`: a fresh eager and a fresh compiled resformer model (the same
weights, cold compile) stepped in turn on the same batches, a round of untimed steps after the
compilation, then `rounds` rounds of `steps` timed pairs. The compiled row's ratio is to the
eager copy stepped beside it; the break-even row gives the training steps after which the
median saving per step has repaid the compiler's start-up and the compilation (what one
`nas train` pays), as steps, training FLOPs (6ND, what `train.compile: auto` compares) and
seconds of eager training.

    python benchmarks/throughput.py                          # nano and base, ~4 min on 2 cores
    python benchmarks/throughput.py --sizes nano --rounds 3  # a quick look
    python benchmarks/throughput.py --compile                # and torch.compile, ~3 min more
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compile import BreakEven, cold_compile_cache, compare, compiler_startup
from compile import run_config as compile_run_config
from torch import Tensor

from nas.config import MODEL_PRESETS, RunConfig, from_dict
from nas.model.decoder import count_params
from nas.modes import MODES
from nas.training.data import RandomWindows, TokenDataModule
from nas.training.lit import LitDecoder
from nas.training.train import train

# The presets plus "base", a size between micro and tiny whose step is a few times nano's.
SIZES: dict[str, dict[str, int]] = {
    **MODEL_PRESETS,
    "base": {"n_layer": 6, "d_model": 128, "n_head": 4, "seq_len": 128},
}
ZERO_PARAM_MODES = ("resformer", "neutreno", "svformer")
MODE_TARGET = 0.97
LIGHTNING_TARGET = 0.95
COMPILE_TARGET = 1.15
COMPILE_TARGET_SIZE = "base"  # the 6-layer d128 configuration

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Variant:
    label: str
    mode: str = "vanilla"
    source: str = "first_layer"


MODE_VARIANTS: tuple[Variant, ...] = (
    *(Variant(mode, mode) for mode in MODES),
    Variant("resformer (value_embedding)", "resformer", "value_embedding"),
)
VANILLA = MODE_VARIANTS[0]
ALONE = Variant("bare loop alone (vanilla)")
LIGHTNING = Variant("Lightning: nas.training.train.train (vanilla)")
COMPILE_MODE = "resformer"  # what benchmarks/compile.py measures
EAGER = Variant(f"eager, in turn with torch.compile ({COMPILE_MODE})", COMPILE_MODE)
COMPILED = Variant(f"torch.compile ({COMPILE_MODE})", COMPILE_MODE)
# The variant each one's ratio is taken against.
BASELINES: dict[Variant, Variant] = {
    **{v: VANILLA for v in MODE_VARIANTS}, ALONE: ALONE, LIGHTNING: ALONE,
    EAGER: EAGER, COMPILED: EAGER,
}

Round = dict[Variant, float]  # tokens/s of each variant in one round


@dataclass
class Result:
    """One variant at one size: tokens/s and ratio to its baseline, one entry per round."""

    size: str
    variant: Variant
    n_params: int
    tokens_per_s: list[float]
    ratios: list[float]


def run_config(size: str, variant: Variant, steps: int, batch_size: int, seed: int) -> RunConfig:
    """The run config of one measurement; one validation batch at the end keeps train() short."""
    return from_dict({
        "model": dict(SIZES[size]),
        "value_residual": {"mode": variant.mode, "source": variant.source},
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed,
                  "eval_every": steps, "eval_batches": 1},
        "data": {"source": "builtin"},
    }, where=f"benchmark {size}/{variant.label}")


def training_batches(cfg: RunConfig) -> list[Batch]:
    """The batches nas.training.train.train draws for cfg: RandomWindows 0..steps-1 on the train
    split."""
    m, t = cfg.model, cfg.train
    data = TokenDataModule(cfg.data, m.seq_len, m.vocab_size, t.batch_size, t.steps, t.seed,
                           eval_batches=t.eval_batches)
    windows = RandomWindows(data.train_arrays, m.seq_len, t.batch_size, count=t.steps,
                            seed=t.seed)
    return [windows[i] for i in range(len(windows))]


class BareLoop:
    """A fresh model trained with plain PyTorch, one step at a time; counts its step time.

    LitDecoder is only a container here: it builds the model, optimizer and schedule exactly
    as the Lightning path does. The step is what Lightning's automatic optimization runs.
    """

    def __init__(self, cfg: RunConfig):
        torch.manual_seed(cfg.train.seed)
        lit = LitDecoder(cfg)
        configured = lit.configure_optimizers()
        self.model = lit.model.train()
        self.optimizer = configured["optimizer"]
        self.schedule = configured["lr_scheduler"]["scheduler"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_clip = cfg.train.grad_clip
        self.step_seconds: list[float] = []
        self.tokens_per_step = 0

    def step(self, batch: Batch) -> None:
        idx, targets = batch
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step_seconds.append(time.perf_counter() - start)
        self.tokens_per_step = idx.numel()

    def tokens_per_s(self) -> float:
        """Over all steps, as nas.training.train.StepTimer counts: for the comparison with
        Lightning."""
        return self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)

    def typical_tokens_per_s(self) -> float:
        """At the median step time: one step stalled by another process does not count."""
        return self.tokens_per_step / statistics.median(self.step_seconds)


def interleaved(configs: Sequence[RunConfig], batches: Sequence[Batch]) -> list[float]:
    """Typical tokens/s of one fresh bare loop per config, stepped in turn on each batch.

    The order rotates every step, so no loop always runs right after another.
    """
    loops = [BareLoop(cfg) for cfg in configs]
    for i, batch in enumerate(batches):
        for k in range(len(loops)):
            loops[(i + k) % len(loops)].step(batch)
    return [loop.typical_tokens_per_s() for loop in loops]


def bare_tokens_per_s(cfg: RunConfig, batches: Sequence[Batch]) -> float:
    """Tokens/s over all steps of one fresh bare loop, run alone."""
    loop = BareLoop(cfg)
    for batch in batches:
        loop.step(batch)
    return loop.tokens_per_s()


def lightning_tokens_per_s(cfg: RunConfig) -> float:
    """nas.training.train.train's own figure, which counts training-step time only."""
    return float(train(cfg, progress=False)["tokens_per_s"])


def lightning_pair(cfg: RunConfig, batches: Sequence[Batch], lightning_first: bool) -> Round:
    """A bare loop alone and nas.training.train.train on the same config and batches, back to
    back."""
    runs: list[tuple[Variant, Callable[[], float]]] = [
        (ALONE, lambda: bare_tokens_per_s(cfg, batches)),
        (LIGHTNING, lambda: lightning_tokens_per_s(cfg)),
    ]
    if lightning_first:
        runs.reverse()
    return {variant: measure() for variant, measure in runs}


def measure_size(size: str, rounds: int, steps: int, batch_size: int, seed: int,
                 log: Callable[[str], None]) -> list[Result]:
    """Round 0 warms up and is dropped; each later round measures every variant once."""
    configs = {v: run_config(size, v, steps, batch_size, seed) for v in (*MODE_VARIANTS, ALONE)}
    configs[LIGHTNING] = configs[ALONE]
    batches = training_batches(configs[VANILLA])  # the same for every variant of this size
    mode_configs = [configs[v] for v in MODE_VARIANTS]
    timed: list[Round] = []
    for r in range(rounds + 1):
        measured = dict(zip(MODE_VARIANTS, interleaved(mode_configs, batches), strict=True))
        measured |= lightning_pair(configs[ALONE], batches, lightning_first=r % 2 == 1)
        log(f"{size}: " + ("warm-up round done" if r == 0 else f"round {r}/{rounds} done"))
        if r > 0:
            timed.append(measured)
    return [summarize(size, v, count_params(cfg)["n_params"], timed)
            for v, cfg in configs.items()]


def measure_compile(size: str, rounds: int, steps: int, batch_size: int, startup: float,
                    log: Callable[[str], None]) -> tuple[list[Result], BreakEven]:
    """The compiled and eager rows of one size and its break-even (see the module docstring):
    a round here is `steps` consecutive pairs, a copy's tokens/s in it at its median step."""
    cfg = compile_run_config(SIZES[size], batch_size, 1 + steps * (rounds + 1), COMPILE_MODE)
    measured = compare(size, cfg, warmup=steps, steps=rounds * steps, startup=startup, log=log)
    timed = [{EAGER: cfg.tokens_per_step / statistics.median(measured.eager[i:i + steps]),
              COMPILED: cfg.tokens_per_step / statistics.median(measured.compiled[i:i + steps])}
             for i in range(0, rounds * steps, steps)]
    log(f"{size}: torch.compile done")
    n_params = count_params(cfg)["n_params"]
    return [summarize(size, v, n_params, timed) for v in (EAGER, COMPILED)], measured


def summarize(size: str, variant: Variant, n_params: int, rounds: Sequence[Round]) -> Result:
    baseline = BASELINES[variant]
    return Result(size, variant, n_params,
                  tokens_per_s=[r[variant] for r in rounds],
                  ratios=[r[variant] / r[baseline] for r in rounds])


def format_table(results: Sequence[Result], break_evens: Sequence[BreakEven],
                 batch_size: int) -> str:
    """One row per result, each size's break-even row (if measured) after its rows."""
    lines = [
        "| size | variant | params | tokens/s | ratio | ratio to | ratio min-max |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name in dict.fromkeys(r.size for r in results):
        shape = SIZES[name]
        size = (f"{name} ({shape['n_layer']}L d{shape['d_model']} "
                f"T{shape['seq_len']} B{batch_size})")
        for r in results:
            if r.size == name:
                lines.append(
                    f"| {size} | {r.variant.label} | {r.n_params:,} | "
                    f"{statistics.median(r.tokens_per_s):,.0f} | "
                    f"{statistics.median(r.ratios):.3f}x | {BASELINES[r.variant].label} | "
                    f"{min(r.ratios):.3f}-{max(r.ratios):.3f} |")
        for b in break_evens:
            if b.size == name:
                lines.append(
                    f"| {size} | break-even of torch.compile (start-up {b.startup:.1f} s + "
                    f"compile {b.compile_s:.1f} s) | | | {b.steps:,.0f} steps | "
                    f"= {b.flops:.2e} FLOPs (6ND) = {b.eager_seconds:.0f} s eager | |")
    return "\n".join(lines)


def verdict(subject: str, target: float, results: Sequence[Result]) -> str:
    """PASS if the median ratio meets the target at every size; notes where noise decides."""
    medians = [statistics.median(r.ratios) for r in results]
    passed = all(m >= target for m in medians)
    noisy = any(min(r.ratios) < target <= max(r.ratios) for r in results)
    detail = ", ".join(f"{r.size} {m:.4f}x" for r, m in zip(results, medians, strict=True))
    note = " (some per-round ratios fall on each side of the target)" if noisy else ""
    return f"{'PASS' if passed else 'FAIL'}: {subject} >= {target:.2f}x: {detail}{note}"


def verdicts(results: Sequence[Result]) -> list[str]:
    def of(variant: Variant) -> list[Result]:
        return [r for r in results if r.variant == variant]

    lines = [verdict(f"{mode} vs vanilla", MODE_TARGET, of(Variant(mode, mode)))
             for mode in ZERO_PARAM_MODES]
    lines.append(verdict("Lightning vs bare loop", LIGHTNING_TARGET, of(LIGHTNING)))
    compiled = [r for r in of(COMPILED) if r.size == COMPILE_TARGET_SIZE]
    if compiled:
        lines.append(verdict("torch.compile vs eager", COMPILE_TARGET, compiled))
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6,
                        help="timed rounds per size after one warm-up round (default 6)")
    parser.add_argument("--steps", type=int, default=12,
                        help="training steps per model per round (default 12)")
    parser.add_argument("--sizes", default="nano,base",
                        help=f"comma-separated sizes from {', '.join(SIZES)} (default nano,base)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default 16)")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also a compiled row and a break-even row per size "
                             "(benchmarks/compile.py; a cold compile and rounds x steps "
                             "eager and compiled steps more per size)")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; allowed: {', '.join(SIZES)}")
    if min(args.rounds, args.steps, args.batch_size) < 1:
        parser.error("--rounds, --steps and --batch-size must be >= 1")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Trainer(deterministic="warn") sets this process-wide; set it up front so every
    # variant runs under it, not only those measured after the first Lightning run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    with cold_compile_cache():
        startup = compiler_startup(torch.device("cpu")) if args.compile else 0.0
        results: list[Result] = []
        break_evens: list[BreakEven] = []
        for size in args.sizes:
            results += measure_size(size, args.rounds, args.steps, args.batch_size, args.seed,
                                    log)
            if args.compile:
                compiled, break_even = measure_compile(size, args.rounds, args.steps,
                                                       args.batch_size, startup, log)
                results += compiled
                break_evens.append(break_even)
    print(format_table(results, break_evens, args.batch_size))
    print()
    print("\n".join(verdicts(results)))
    print(f"\n{args.rounds} rounds x {args.steps} steps per model after a warm-up round; "
          "tokens/s: median over rounds (modes and the torch.compile pair at their median "
          "step time, the bare-alone and "
          "Lightning pair over all steps); ratio: median of the per-round ratios; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
