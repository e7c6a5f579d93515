"""Ctrl+C and its equivalents, in one place: the worker's handler (`CTRL_C`, used by the CLI,
the search loop and the trial objective) for SIGINT, SIGTERM (what a scheduler, a container
runtime or `kill` sends) and SIGUSR1 (a preemption notice: SLURM's `--signal=USR1@SECONDS`,
Lightning's requeue signal), and `lightning_interrupts`, which turns Lightning's own exit on
them during training back into the exception that handler raised. Knows nothing of torch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# What each signal is called in messages and the exit status it ends a command with: 128 + the
# signal's number, as a shell reports a process killed by it; a preemption notice ends the
# worker as SIGTERM would, so a scheduler sees the same status for both.
SIGNALS = {signal.SIGINT: ("Ctrl+C", 130), signal.SIGTERM: ("SIGTERM", 143),
           signal.SIGUSR1: ("SIGUSR1, a preemption notice", 143)}


class Interrupted(KeyboardInterrupt):
    """Raised by `CTRL_C` on one of SIGNALS. A KeyboardInterrupt, so that every layer between
    the handler and the CLI (Lightning, Optuna, the trial objective) treats SIGTERM and a
    preemption notice as it treats Ctrl+C: the running trial ends FAIL and the worker stops."""

    def __init__(self, signum: int):
        name, self.exit_status = SIGNALS[signal.Signals(signum)]
        super().__init__(f"interrupted ({name})")
        self.signum = signum


class CtrlC:
    """The handler of SIGNALS in a command. It raises Interrupted at once, as Python's own
    SIGINT handler raises KeyboardInterrupt, and remembers the signal: an exception raised
    inside a finalizer (the garbage collector runs them during training) is swallowed by Python,
    which prints it as an ignored exception; instead, `check()` raises it again at the trial's
    next validation or end. The trial then ends FAIL, `interrupted`.

    Re-entrant: the CLI holds it for a whole command and `run_search` for its trials; only the
    outermost `with` installs the handlers and puts the previous ones back."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the last signal received, None before one
        self.depth = 0
        self.previous: dict[int, Any] = {}
        self.unraisable: Any = None

    def __enter__(self) -> CtrlC:
        self.depth += 1
        if self.depth == 1 and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.signum = None  # the exception on its way out carries it
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            if self.previous:
                sys.unraisablehook = self.unraisable
            self.previous = {}

    def _unraisable(self, info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self.unraisable(info)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        raise Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


CTRL_C = CtrlC()


@contextlib.contextmanager
def lightning_interrupts() -> Iterator[None]:
    """Lightning turns Ctrl+C into sys.exit(1) and ignores SIGINT from then on, and SIGTERM
    (when no handler of ours raised at once) into its own SystemExit: give the caller the
    exception `CTRL_C` raised (a plain KeyboardInterrupt where it is not installed) and its
    SIGINT handler back."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        signal.signal(signal.SIGINT, sigint)
        if CTRL_C.signum is not None:
            raise Interrupted(CTRL_C.signum) from None
        raise KeyboardInterrupt from None
