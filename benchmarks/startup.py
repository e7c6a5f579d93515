"""Each `nas` command's time to its first line of output, and to its exit, as a user starts it:
a fresh `python -m nas` process per run, its output into a pipe (so no progress bar), the
median of --repeat runs after one that is not counted (it warms the file cache). Prints a
Markdown table.

`--before DIR` also runs the `nas` of another checkout with this interpreter (its `python -m
nas` finds DIR's package first), alternating run by run with this checkout's, so that both see
the same load on a shared machine:

    git worktree add /tmp/nas-before COMMIT
    python benchmarks/startup.py --before /tmp/nas-before

The times are wall-clock seconds, and grow with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "search", "export", "report", "analyze", "generate", "dashboard",
            "prepare")
TRAIN_STEPS = 20
TINY_RUN = f"""model: {{n_layer: 2, d_model: 32, n_head: 2, seq_len: 32}}
train: {{steps: {TRAIN_STEPS}, batch_size: 4, eval_batches: 1, compile: false}}
"""


def timed(argv: list[str], root: Path) -> tuple[float, float]:
    """Seconds to the first line (ended by a newline or a carriage return) of the command's
    stdout and stderr together, and to its exit; a command that fails stops the benchmark."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nas", *argv], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = None
    while (byte := proc.stdout.read(1)) and first is None:
        if byte in (b"\n", b"\r"):
            first = time.perf_counter() - start
    rest = proc.stdout.read()
    if proc.wait() != 0:
        sys.exit(f"nas {' '.join(argv)} failed in {root}:\n{rest.decode(errors='replace')}")
    end = time.perf_counter() - start
    return (end if first is None else first), end


def cases(work: Path) -> list[tuple[str, list[str], Path | None]]:
    """(what, argv, a path to remove before each run) for every command measured."""
    text = work / "small.txt"
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    text.write_text("\n".join(lines * 40), encoding="utf-8")  # about 100 KB
    run = work / "tiny.yaml"
    run.write_text(TINY_RUN)
    return [("nas --help", ["--help"], None),
            *((f"nas {c} --help", [c, "--help"], None) for c in COMMANDS),
            (f"nas prepare ({text.stat().st_size // 1000} KB of text, vocab 300)",
             ["prepare", str(text), "--out", str(work / "prepared"), "--vocab-size", "300",
              "--no-progress"], work / "prepared"),
            (f"nas train (2 layers, d_model 32, {TRAIN_STEPS} steps)",
             ["train", str(run), "--out", str(work / "run")], work / "run")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="another checkout to time beside this one")
    parser.add_argument("--repeat", type=int, default=3, help="counted runs per command")
    args = parser.parse_args()
    roots = [Path(args.before).resolve()] if args.before else []
    roots.append(ROOT)
    head = " | ".join(f"{what}{f' ({n})' if len(roots) > 1 else ''}"
                      for what in ("to first line", "to exit")
                      for n in ("before", "after")[-len(roots):])
    with tempfile.TemporaryDirectory(prefix="nas-startup-") as tmp:
        print(f"median of {args.repeat} runs, seconds; "
              + ", ".join(f"{n}: {r}" for n, r in zip(("before", "after")[-len(roots):], roots,
                                                      strict=True)) + "\n")
        print(f"| command | {head} |")
        print("|---|" + "---:|" * 2 * len(roots))
        for what, argv, output in cases(Path(tmp)):
            runs: dict[Path, list[tuple[float, float]]] = {root: [] for root in roots}
            for _ in range(args.repeat + 1):
                for root in roots:
                    if output is not None:
                        shutil.rmtree(output, ignore_errors=True)
                    runs[root].append(timed(argv, root))
            cells = [statistics.median(r[i] for r in runs[root][1:])
                     for i in (0, 1) for root in roots]
            print(f"| `{what}` | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
