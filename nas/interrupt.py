"""Ctrl+C and its equivalents, in one place: the worker's handler (`CTRL_C`, used by the CLI,
the search loop and the trial objective) for SIGINT, SIGTERM (what a scheduler, a container
runtime or `kill` sends) and SIGUSR1 (a preemption notice: SLURM's `--signal=USR1@SECONDS`,
Lightning's requeue signal), and `lightning_interrupts`, which turns Lightning's own exit on
them during training back into the exception that handler raised. Knows nothing of torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

# What each signal is called in messages and the exit status it ends a command with: 128 + the
# signal's number, as a shell reports a process killed by it; a preemption notice ends the
# worker as SIGTERM would, so a scheduler sees the same status for both.
SIGNALS = {signal.SIGINT: ("Ctrl+C", 130), signal.SIGTERM: ("SIGTERM", 143),
           signal.SIGUSR1: ("SIGUSR1, a preemption notice", 143)}
AGAIN_SECONDS = 0.05  # how soon a signal that came inside a storage call is handled again


def _in_storage_call(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an Optuna storage call. An exception raised there may break
    the storage's own cleanup: a journal file's lock is then left held, or released under
    another worker that holds it."""
    while frame is not None:
        if f"{os.sep}optuna{os.sep}storages{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


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
    next validation or end. The trial then ends FAIL, `interrupted`. A signal that comes inside
    a storage call is handled again every AGAIN_SECONDS until the call has returned, and one
    that comes once Interrupted was raised is ignored (the command is stopping: raising again
    would break its cleanup).

    Re-entrant: the CLI holds it for a whole command and `run_search` for its trials; only the
    outermost `with` installs the handlers and puts the previous ones back."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the last signal received, None before one
        self.raised = False  # whether Interrupted was raised for it
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
            self.signum, self.raised = None, False  # the exception on its way out carries it
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            if self.previous:
                sys.unraisablehook = self.unraisable
            self.previous = {}

    def _unraisable(self, info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self.unraisable(info)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:
            return
        self.signum = signum
        if _in_storage_call(frame):
            again = threading.Timer(AGAIN_SECONDS, self._again)
            again.daemon = True
            again.start()
            return
        self.raised = True
        raise Interrupted(signum)

    def _again(self) -> None:
        if not self.raised and self.signum is not None:
            os.kill(os.getpid(), self.signum)

    def check(self) -> None:
        if self.signum is not None:
            self.raised = True
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
