"""Fast, quiet commands: `nas --help`, every `nas <command> --help` and `nas prepare` import
neither torch nor Lightning (read from Python's own import log, `-X importtime`), the help not
even pydantic, and `nas train` draws no progress bar into a pipe or with --no-progress, and one
on a terminal."""

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import termios

import pytest

from nas.cli import build_parser
from tests.helpers import env_for_cli, nas_cmd

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

HEAVY = ("torch", "lightning")
COMMANDS = next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def imported(*args: str, cwd=None) -> set[str]:
    """The modules `nas ARGS` imports, from its `-X importtime` log."""
    proc = subprocess.run([*nas_cmd(*args)[:1], "-X", "importtime", *nas_cmd(*args)[1:]],
                          capture_output=True, text=True, env=env_for_cli(), timeout=300,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def heavy(modules: set[str], names: tuple[str, ...] = HEAVY) -> set[str]:
    return {m for m in modules if m.split(".")[0] in names}


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)],
                         ids=["nas", *COMMANDS])
def test_help_imports_neither_torch_nor_lightning_nor_pydantic(args):
    modules = imported(*args)
    assert "nas.cli" in modules  # the log is read right
    assert not heavy(modules, (*HEAVY, "pydantic"))


def test_nas_prepare_imports_neither_torch_nor_lightning(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    modules = imported("prepare", str(text), "--out", str(tmp_path / "out"), "--vocab-size",
                       "300", "--no-progress")
    assert "nas.training.prepare" in modules and not heavy(modules)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


RUN = """model: {n_layer: 2, d_model: 32, n_head: 2, seq_len: 16}
train: {steps: 6, batch_size: 2, eval_batches: 1, compile: false}
"""


def train_output(tmp_path, *flags: str, terminal: bool) -> str:
    """What `nas train` writes to its stdout and stderr, a pipe or (`terminal`) a
    pseudo-terminal, as a user sees it."""
    config = tmp_path / "run.yaml"
    config.write_text(RUN)
    cmd = nas_cmd("train", str(config), "--out", str(tmp_path / "out"), "--overwrite", *flags)
    env = {**env_for_cli(), "OMP_NUM_THREADS": "1"}
    if not terminal:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:]
        return proc.stdout
    leader, follower = pty.openpty()
    # 24 rows of 100 columns: a new pseudo-terminal has none, and a bar fits in none
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_nas_train_draws_a_progress_bar_only_on_a_terminal_without_no_progress(tmp_path):
    piped = train_output(tmp_path, terminal=False)
    lines = piped.splitlines()
    assert "\r" not in piped and len(lines) == 2, piped  # what it trains, then its result
    assert lines[0].startswith("training ") and lines[1].startswith("val_loss ")
    assert "Training" not in train_output(tmp_path, "--no-progress", terminal=True)
    assert "Training" in train_output(tmp_path, terminal=True)  # the bar, where one watches
