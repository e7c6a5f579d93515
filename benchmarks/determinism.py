"""What CPU training's losses depend on: one config trained in a fresh process per setting
(thread count, and the instruction set ATen's kernels use, chosen with ATEN_CPU_CAPABILITY),
printing val_loss and a digest of every loss the run measured (the validation curve, the final
validation and test batches), so that equal digests mean bit-for-bit equal losses.

The config is the quickstart's trial 10 (svformer on layers 1-3 of the nano preset, 120 steps):
the one a fresh clone measured at 2.5114 against the README's 2.5109.

    python benchmarks/determinism.py             # 6 trainings of 120 steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"preset": "nano", "seq_len": 64},
          "value_residual": {"mode": "svformer", "layers": [1, 2, 3]},
          "train": {"steps": 120, "batch_size": 16, "lr": 3.0e-3, "seed": 0, "eval_every": 20,
                    "compile": False},
          "data": {"source": "builtin"}}
# (threads, ATEN_CPU_CAPABILITY or None for the CPU's best)
SETTINGS = [(1, None), (1, None), (2, None), (4, None), (1, "avx2"), (2, "avx2")]

CHILD = """
import hashlib, json, sys, torch
from nas.config import from_dict
from nas.training.train import train
torch.set_num_threads(int(sys.argv[1]))
m = train(from_dict(json.loads(sys.argv[2])), progress=False)
losses = [v for _, v in m["curve"]] + m["val_batch_losses"] + m["test_batch_losses"]
print(json.dumps({"val_loss": m["val_loss"], "numerics": m["numerics"],
                  "digest": hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:12]}))
"""


def measure(threads: int, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore",
               **({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(CONFIG)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print("| threads | ATEN_CPU_CAPABILITY | kernels | val_loss | digest of every loss |")
    print("|---:|---|---|---:|---|")
    for threads, capability in SETTINGS:
        r = measure(threads, capability)
        print(f"| {threads} | {capability or '(unset)'} | {r['numerics']['cpu_capability']} | "
              f"{r['val_loss']:.6f} | `{r['digest']}` |", flush=True)
    print(f"\ntorch {r['numerics']['torch']}, config {json.dumps(CONFIG)}")


if __name__ == "__main__":
    main()
