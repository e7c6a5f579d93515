"""`benchmarks/study_cost.py` sizes every shipped study, as the docs tell a user to run it
first: a grid exactly, a sampled space (or a grid that leaves the plan open) by its n_trials
draws."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env_for_cli

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted(p.name for p in (ROOT / "studies").glob("*.yaml"))

pytestmark = pytest.mark.slow  # a process per shipped study


@pytest.mark.parametrize("study", STUDIES)
def test_study_cost_sizes_every_shipped_study(study):
    proc = subprocess.run([sys.executable, "benchmarks/study_cost.py", f"studies/{study}",
                           "--peak-tflops", "0.0136", "--mfu", "1"], cwd=ROOT,
                          env=env_for_cli(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trials = int(re.search(r": (\d+) trials;", proc.stdout).group(1))
    total = re.search(r"\| \*\*total\*\* \| (\d+) \|", proc.stdout)
    assert total and int(total.group(1)) == trials > 0, proc.stdout
