"""Soak: N `nas search` workers on one study, with random SIGKILLs (or SIGTERMs).

On `--storage postgresql` (the default) it starts a private PostgreSQL server (`tests/pg.py`,
Debian's binaries); `sqlite` and `journal` use a file in a temporary folder. It writes a tiny
study spec with fast leases and keeps `--workers` worker processes running on it. Every
`--kill-every` seconds (jittered) it sends `--signal` (KILL or TERM) to a random worker in the
middle of a trial and starts a replacement with the same worker id. Once the workers have all
exited, a worker is started again while the study is short of its count (the "restart finishes
the study" path).

It samples each worker's resident memory from /proc every 0.5 s and every finished trial it
sees in the storage, then prints:

- trials requested, finished (COMPLETE or PRUNED), failed as lost with a killed worker and
  retried, failed as interrupted by a SIGTERM, surplus;
- lost: trials seen finished that are no longer, plus the count the study is short of (must
  be 0), and extra finished trials beyond the count (must be 0);
- per worker id: processes started, trials it finished, peak RSS, and the RSS of its
  longest-lived process after its first trial and at its last sample (flat over a study).

    python benchmarks/soak.py                                   # 3 x 120, ~4 min on 2 cores
    python benchmarks/soak.py --workers 4 --trials 60 --kill-every 5 --steps 80
    python benchmarks/soak.py --storage journal --signal TERM
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from nas.search.storage import make_storage
from nas.search.study import FINISHED
from nas.search.trials import TrialRecord, records

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' PostgreSQL fixture
from tests.pg import PgCluster  # noqa: E402


@dataclass
class Slot:
    """One worker id; its processes come and go as they are killed and replaced."""

    worker_id: int
    proc: subprocess.Popen | None = None
    started: int = 0
    killed: int = 0
    trials: int = 0
    peak_kib: int = 0
    # per process: [RSS after its first trial, RSS at its last sample, trials it finished]
    memory: list[list[int]] = field(default_factory=list)
    log: Path | None = None


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, flags=re.M))
    return int(values.get("VmRSS", 0)), int(values.get("VmHWM", 0))


def write_spec(folder: Path, url: str, args: argparse.Namespace) -> Path:
    spec = {
        "name": "soak",
        "space": {"model": {"n_layer": [2, 3]},
                  "value_residual": {"mode": ["vanilla", "resformer", "learnable", "svformer"],
                                     "lambda1": {"low": 0.2, "high": 2.0}},
                  "train": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
        "objectives": ["val_loss", "n_params"],
        "n_trials": args.trials,
        "storage": url,
        "base": {"model": {"d_model": 32, "n_head": 2, "seq_len": 16},
                 "train": {"steps": args.steps, "batch_size": 4, "eval_every": args.steps // 4,
                           "eval_batches": 1}},
        "sampler": {"type": "tpe", "n_startup_trials": 4},
        "heartbeat": {"interval": 1, "grace_period": 3},  # the lease
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(slot: Slot, spec: Path, folder: Path) -> None:
    slot.started += 1
    slot.log = folder / f"worker{slot.worker_id}-{slot.started}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "nas", "search", str(spec), "--no-progress", "--threads", "1",
           "--worker-id", str(slot.worker_id)]
    slot.proc = subprocess.Popen(cmd, stdout=slot.log.open("w"), stderr=subprocess.STDOUT,
                                 env=env)
    slot.memory.append([0, 0, 0])


def count_trials(slot: Slot) -> int:
    text = slot.log.read_text() if slot.log and slot.log.exists() else ""
    return len(re.findall(r"^trial\s+\d+\s.*(val_loss|pruned)", text, flags=re.M))


def stop_workers(slots: list[Slot]) -> None:
    for slot in slots:
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.kill()
            slot.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="worker processes at a time")
    parser.add_argument("--trials", type=int, default=120, help="the study's n_trials")
    parser.add_argument("--kill-every", type=float, default=12.0,
                        help="mean seconds between SIGKILLs (0: none)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trial")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--storage", choices=("postgresql", "sqlite", "journal"),
                        default="postgresql", help="where the study lives")
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL",
                        help="what the workers are stopped with")
    parser.add_argument("--timeout", type=float, default=1200, help="give up after S seconds")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("$ python benchmarks/soak.py " + shlex.join(sys.argv[1:]), flush=True)

    signum = signal.Signals[f"SIG{args.signal}"]
    # Stopped itself (SIGTERM, Ctrl+C), it unwinds: its workers are killed, its server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nas-soak-")))
        url = {"postgresql": lambda: stack.enter_context(PgCluster()).url,
               "sqlite": lambda: f"sqlite:///{folder}/soak.db",
               "journal": lambda: f"journal:{folder}/soak.log"}[args.storage]()
        spec = write_spec(folder, url, args)
        slots = [Slot(i) for i in range(args.workers)]
        stack.callback(stop_workers, slots)
        for slot in slots:
            start(slot, spec, folder)
        storage = make_storage(url)
        seen_finished: set[int] = set()
        t0 = time.monotonic()
        next_kill = t0 + rng.expovariate(1 / args.kill_every) if args.kill_every else None
        restarts = failed_exits = 0

        def trials() -> list[optuna.trial.FrozenTrial]:
            try:
                return optuna.load_study(study_name="soak", storage=storage).get_trials()
            except KeyError:
                return []

        while time.monotonic() - t0 < args.timeout:
            for slot in slots:
                if slot.proc is not None and slot.proc.poll() is None:
                    rss, hwm = rss_kib(slot.proc.pid)
                    slot.peak_kib = max(slot.peak_kib, rss, hwm)
                    if rss:
                        mem = slot.memory[-1]
                        mem[1], mem[2] = rss, count_trials(slot)
                        if not mem[0] and mem[2]:
                            mem[0] = rss
            current = trials()
            seen_finished |= {t.number for t in current if t.state in FINISHED}
            n_finished = sum(t.state in FINISHED for t in current)
            live = [s for s in slots if s.proc is not None and s.proc.poll() is None]
            if next_kill is not None and time.monotonic() >= next_kill and live \
                    and n_finished < args.trials - 1:
                # kill only a worker that is in a trial: its trial must be failed and retried
                busy = {(r.worker or ":").rsplit(":", 1)[1] for r in records(current)
                        if r.state == TrialState.RUNNING}
                in_trial = [s for s in live if str(s.proc.pid) in busy]
                if in_trial:
                    victim = rng.choice(in_trial)
                    victim.proc.send_signal(signum)
                    victim.proc.wait()
                    victim.killed += 1
                    victim.trials += count_trials(victim)
                    start(victim, spec, folder)
                    next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
            if not live:
                for slot in slots:
                    if slot.proc is not None:
                        slot.trials += count_trials(slot)
                        failed_exits += slot.proc.returncode != 0  # stopped short, or crashed
                        slot.proc = None
                if n_finished >= args.trials:
                    break
                restarts += 1  # every worker gave up waiting: a restart finishes the study
                start(slots[0], spec, folder)
            time.sleep(0.5)
        else:
            print(f"gave up after {args.timeout} s", file=sys.stderr)
        stop_workers(slots)
        elapsed = time.monotonic() - t0

        final = trials()
        finished = {t.number for t in final if t.state in FINISHED}
        failed = [t for t in final if t.state == TrialState.FAIL]
        # A trial lost with its worker (SIGKILL) is failed by another worker's lease check,
        # which queues a copy of it (system attribute failed_trial); one stopped by a SIGTERM
        # is failed by its own worker as interrupted.
        reasons = {t.number: TrialRecord.from_trial(t).failure or "" for t in failed}
        stale = [t for t in failed if reasons[t.number].startswith("lost")]
        interrupted = [t for t in failed if reasons[t.number].startswith("interrupted")]
        retries = [t for t in final if "failed_trial" in t.system_attrs]
        surplus = [t for t in failed if reasons[t.number].startswith("surplus")]
        other_failed = [t for t in failed
                        if t not in surplus and t not in stale and t not in interrupted]
        lost = len(seen_finished - finished) + max(0, args.trials - len(finished))
        extra = max(0, len(finished) - args.trials)
        left = [t.number for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    mib = 1024
    print(f"\nsoak: {args.workers} workers x {args.trials} trials on {args.storage}, "
          f"{args.steps} steps per trial, a SIG{args.signal} every ~{args.kill_every:g} s; "
          f"{elapsed:.0f} s")
    print("\n| metric | value |\n|---|---|")
    for name, value in [
        ("trials requested", args.trials),
        ("trials finished (COMPLETE or PRUNED)", len(finished)),
        (f"workers stopped (SIG{args.signal} mid-trial)", sum(s.killed for s in slots)),
        ("trials failed as lost with their worker (lease)", len(stale)),
        ("trials failed as interrupted (SIGTERM)", len(interrupted)),
        ("retries queued / finished", f"{len(retries)} / "
                                      f"{sum(t.state in FINISHED for t in retries)}"),
        ("surplus trials (a race for the last slot)", len(surplus)),
        ("other failed trials (diverged, raised)", len(other_failed)),
        ("restarts after every worker exited", restarts),
        ("**workers that exited non-zero on their own (must be 0)**", failed_exits),
        ("trials left RUNNING or WAITING", len(left)),
        ("**lost (must be 0)**", lost),
        ("**extra beyond the count (must be 0)**", extra),
    ]:
        print(f"| {name} | {value} |")
    print("\n| worker id | processes | trials finished | peak RSS MiB | longest-lived process: "
          "RSS after its 1st trial -> at its last, MiB (trials) |\n|---|---|---|---|---|")
    for s in slots:
        first, last, n = max(s.memory, key=lambda m: m[2])
        flat = f"{first / mib:.0f} -> {last / mib:.0f} ({n})" if first else "-"
        print(f"| {s.worker_id} | {s.started} | {s.trials} | {s.peak_kib / mib:.0f} | {flat} |")
    ok = lost == 0 and extra == 0 and not left and not failed_exits
    print(f"\nverdict: {'PASS' if ok else 'FAIL'} (lost {lost}, extra {extra}, "
          f"left {len(left)}, non-zero exits {failed_exits})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
