"""Ctrl+C in a worker: one handler, used by the search loop and the trial objective. Lightning
turns Ctrl+C (and SIGTERM) into its own exit during training; `nas.train` converts that back
into the KeyboardInterrupt handled here. Knows nothing of torch.
"""

from __future__ import annotations

import signal
import sys
import threading
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
