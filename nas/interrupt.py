"""Ctrl+C, in one place: the worker's SIGINT handler (`CTRL_C`, used by the search loop and the
trial objective), and `lightning_interrupts`, which turns Lightning's own exit on Ctrl+C (and
SIGTERM) during training back into the KeyboardInterrupt that handler expects. Knows nothing
of torch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class CtrlC:
    """The SIGINT handler of a worker. It raises KeyboardInterrupt at once, as Python's does,
    and remembers the press: a KeyboardInterrupt raised inside a finalizer (the garbage
    collector runs them during training) is swallowed by Python, which prints it as an ignored
    exception; instead, `check()` raises it again at the trial's next validation or end. The
    trial then ends FAIL, `interrupted`."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None
        self.unraisable: Any = None

    def __enter__(self) -> CtrlC:
        self.pressed = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            sys.unraisablehook = self.unraisable
            self.previous = None

    def _unraisable(self, info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self.unraisable(info)

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


CTRL_C = CtrlC()


@contextlib.contextmanager
def lightning_interrupts() -> Iterator[None]:
    """Lightning turns Ctrl+C (and SIGTERM) into sys.exit(1) and ignores SIGINT from then on:
    give the caller the KeyboardInterrupt it expects and its Ctrl+C handler back."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        signal.signal(signal.SIGINT, sigint)
        raise KeyboardInterrupt from None
