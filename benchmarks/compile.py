"""torch.compile against eager for the training step: speed-up, compile time, the break-even
run length that `train.compile: auto` uses (nas.training.compiling), and recompiles across trials.

Per size, a fresh model trained eagerly and a fresh copy trained through the compiled forward
`LitDecoder.compile_model` sets up (the same weights, optimizer and schedule), stepped in turn
on the same batches, so that a slow patch of a shared machine hits both. The compiled copy's
first step includes the compilation of the forward and the backward, cold (a fresh Inductor
cache). Before the sizes, the process compiles what `nas.training.train` compiles first, a probe,
which pays the compiler's start-up. Reported: the median step times; the speed ratio, the median
over pairs of back-to-back steps (one pair runs under one load); the compile seconds (the first
compiled step less a typical one); and the break-even: the steps after which the median saving
per step has repaid the start-up and the compilation (what one `nas train` pays), as training
FLOPs (6 N D, what `auto` compares) and as seconds of eager training.

The measurement (`compare`) takes a device and the config's `train.precision` (`bf16-mixed`
steps under bf16 autocast, as Lightning does): benchmarks/throughput.py (`--compile`) and
benchmarks/gpu_throughput.py reuse it.

Recompiles: trials of one structure that differ only in a fixed coefficient (as a search tries
lambdas), each a fresh model compiled as `nas.training.train` compiles it, counted with
torch._dynamo's counters: with the coefficients as tensors (nas.model.residual) and, for
comparison, as the Python floats they were before, which Dynamo bakes into the graph as constants.

    python benchmarks/compile.py --threads 2      # about 3 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nas.config import RunConfig, from_dict
from nas.model.decoder import precision_dtype
from nas.model.residual import LinearMix
from nas.training.compiling import compiler_problem, training_flops
from nas.training.data import RandomWindows, TokenDataModule
from nas.training.lit import LitDecoder

Batch = tuple[Tensor, Tensor]

# name -> model section; "base" is the 6-layer d128 configuration (batch 16, seq 128).
SIZES: dict[str, dict[str, int]] = {
    "nano": {"n_layer": 4, "d_model": 64, "n_head": 4, "seq_len": 64},
    "base": {"n_layer": 6, "d_model": 128, "n_head": 4, "seq_len": 128},
}
CPU = torch.device("cpu")
RECOMPILE_MODEL = {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 32}
LAMBDAS = (0.25, 0.5, 1.0, 2.0)


def run_config(model: dict[str, int], batch_size: int, steps: int, mode: str = "resformer",
               lambda1: float = 0.5, precision: str = "32-true") -> RunConfig:
    return from_dict({"model": model,
                      "value_residual": {"mode": mode, "lambda1": lambda1},
                      "train": {"steps": steps, "batch_size": batch_size, "seed": 0,
                                "precision": precision},
                      "data": {"source": "builtin"}}, where="benchmark")


def training_batches(cfg: RunConfig, count: int) -> list[Batch]:
    """The first `count` batches nas.training.train.train draws for cfg."""
    m, t = cfg.model, cfg.train
    data = TokenDataModule.for_run(cfg)
    windows = RandomWindows(data.train_arrays, m.seq_len, t.batch_size, t.steps, t.seed)
    return [windows[i] for i in range(count)]


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device`: CUDA runs them asynchronously, so a step's time
    is only complete once they have run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Loop:
    """A fresh model with LitDecoder's optimizer and schedule on `device`, stepped as
    Lightning's automatic optimization steps it (forward and loss under autocast for a
    `-mixed` train.precision), through the compiled forward where `compiled`."""

    def __init__(self, cfg: RunConfig, compiled: bool, device: torch.device = CPU):
        torch.manual_seed(cfg.train.seed)
        self.lit = LitDecoder(cfg).to(device)
        if compiled:
            self.lit.compile_model()
        configured = self.lit.configure_optimizers()
        self.optimizer = configured["optimizer"]
        self.schedule = configured["lr_scheduler"]["scheduler"]
        self.grad_clip = cfg.train.grad_clip
        self.device = device
        precision = cfg.train.precision
        self.autocast = torch.autocast(device.type, dtype=precision_dtype(precision),
                                       enabled=precision.endswith("-mixed"))
        self.seconds: list[float] = []

    def step(self, batch: Batch) -> None:
        idx, targets = batch
        forward = self.lit.compiled_forward or self.lit.model
        start = time.perf_counter()
        with self.autocast:
            loss = F.cross_entropy(forward(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lit.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)


@dataclass
class BreakEven:
    """One size: step times paired step by step (the two steps of a pair ran back to back,
    under the same load), so the ratio and the saving are medians over the pairs."""

    size: str
    eager: list[float]  # seconds of each timed step
    compiled: list[float]
    first: float  # seconds of the first compiled step: the compilation and a step
    startup: float  # seconds of the compiler's start-up, paid once by each process
    flops_per_step: float  # training FLOPs (6 N D) of one step, what `auto` counts

    @property
    def ratio(self) -> float:
        return statistics.median(e / c for e, c in zip(self.eager, self.compiled, strict=True))

    @property
    def saved(self) -> float:
        return statistics.median(e - c for e, c in zip(self.eager, self.compiled, strict=True))

    @property
    def compile_s(self) -> float:
        return self.first - statistics.median(self.compiled)

    @property
    def steps(self) -> float:
        """A run in a process of its own (`nas train`) pays the start-up and the compilation."""
        cost = self.startup + self.compile_s
        return cost / self.saved if self.saved > 0 else float("inf")

    @property
    def flops(self) -> float:
        """The break-even as training FLOPs, what `train.compile: auto` compares."""
        return self.steps * self.flops_per_step

    @property
    def eager_seconds(self) -> float:
        """The break-even as seconds of eager training."""
        return self.steps * statistics.median(self.eager)


@contextlib.contextmanager
def cold_compile_cache() -> Iterator[None]:
    """A cold compile, as on a fresh machine: Inductor otherwise reuses the kernels an earlier
    process left in its on-disk cache, and the compile time drops several times over."""
    with tempfile.TemporaryDirectory(prefix="nas-bench-inductor-") as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def compiler_startup(device: torch.device) -> float:
    """Seconds of what `nas.training.train` compiles first, the first compilation of the process:
    Dynamo's and Inductor's start-up, which would otherwise count against whichever
    measurement came first. Call it once per process, before `compare`."""
    start = time.perf_counter()
    problem = compiler_problem(device.type)
    assert problem is None, f"torch.compile cannot run on {device.type} here: {problem}"
    return time.perf_counter() - start


def compare(size: str, cfg: RunConfig, warmup: int, steps: int, startup: float,
            log: Callable[[str], None], device: torch.device = CPU) -> BreakEven:
    """An eager and a compiled copy of cfg's model stepped in turn on the same batches: the
    first step (the compilation), `warmup` untimed steps, then `steps` timed pairs
    (cfg.train.steps: at least that many, 1 + warmup + steps)."""
    torch._dynamo.reset()  # a cold compile, whatever this process compiled before
    count = 1 + warmup + steps
    batches = [(idx.to(device), targets.to(device))
               for idx, targets in training_batches(cfg, count)]
    eager, compiled = Loop(cfg, False, device), Loop(cfg, True, device)
    start = time.perf_counter()
    compiled.step(batches[0])
    first = time.perf_counter() - start
    eager.step(batches[0])
    log(f"{size}: first compiled step {first:.1f} s")
    for i, batch in enumerate(batches[1:]):
        # alternate which goes first, so neither always follows the other
        for loop in (eager, compiled) if i % 2 else (compiled, eager):
            loop.step(batch)
    return BreakEven(size, eager.seconds[1 + warmup:], compiled.seconds[1 + warmup:], first,
                     startup, training_flops(cfg) / cfg.train.steps)


def float_coefficients(lit: LitDecoder) -> None:
    """Make the fixed-lambda mixes of `lit` read Python floats, as they did before: what
    Dynamo then does with a new value is the comparison row."""
    def before(self, v, sources, x, shared=None):
        return torch.add(v * self.floats[1], sources[0], alpha=self.floats[0])

    for mix in lit.model.residual.mixes.values():
        assert isinstance(mix, LinearMix)
        mix.floats = tuple(mix.coefficients().values())
        mix.before = types.MethodType(before, mix)


def count_compiles(floats: bool, log: Callable[[str], None]) -> list[tuple[float, int, float]]:
    """(lambda1, graphs compiled, seconds) of one trial per lambda, in one process."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    rows = []
    for lam in LAMBDAS:
        cfg = run_config(RECOMPILE_MODEL, batch_size=8, steps=2, lambda1=lam)
        loop = Loop(cfg, compiled=True)
        if floats:
            float_coefficients(loop.lit)
        batch = training_batches(cfg, 1)[0]
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        loop.step(batch)
        rows.append((lam, counters["stats"]["unique_graphs"] - before,
                     time.perf_counter() - start))
    log(f"recompiles with {'floats' if floats else 'tensors'} done")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with cold_compile_cache():
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Print both tables (see the module docstring)."""
    def log(text: str) -> None:
        print(f"# {text}", flush=True)

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    startup = compiler_startup(CPU)
    log(f"compiler start-up (nas.training.compiling.compiler_problem) {startup:.1f} s")
    count = 1 + args.warmup + args.steps
    results = [compare(size, run_config(SIZES[size], args.batch_size, count), args.warmup,
                       args.steps, startup, log)
               for size in args.sizes]
    print("\n| size | eager ms/step | compiled ms/step | compiled / eager speed | compile s "
          "| break-even steps (with the start-up) | break-even FLOPs (6ND) "
          "| break-even eager s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.size} | {statistics.median(r.eager) * 1e3:.1f} "
              f"| {statistics.median(r.compiled) * 1e3:.1f} "
              f"| {r.ratio:.2f}x | {r.compile_s:.1f} | {r.steps:,.0f} "
              f"| {r.flops:.2e} | {r.eager_seconds:.0f} |")
    print("\n| fixed coefficients | " + " | ".join(f"lambda1 {lam}" for lam in LAMBDAS) + " |")
    print("|---|" + "---:|" * len(LAMBDAS))
    for floats in (True, False):
        rows = count_compiles(floats, log)
        label = "Python floats (before)" if floats else "tensors (nas.model.residual)"
        print(f"| {label}: graphs compiled, seconds | "
              + " | ".join(f"{n}, {s:.1f} s" for _, n, s in rows) + " |")


if __name__ == "__main__":
    main()
