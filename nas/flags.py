"""The command line's value types and its parser: every number flag within the range the code
behind it accepts (nan and inf refused wherever a float is read), no empty text where a path,
URL or name is wanted, and argparse's own errors, like every refusal, as one line with exit
status 2. Knows nothing of torch.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from nas.errors import INT_LIMIT, shorten

Parse = Callable[[str], object]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `nas COMMAND: error: ...; see nas COMMAND
    --help`, instead of a usage block: the shape every other refusal has."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        print(f"{self.prog}: error: {one_line}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    """`must be ...` for a finite number in a range: `> 0 and finite`, `in [0, 1] and finite`."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}] and finite"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g} and finite"
    return f"<= {high:g} and finite" if high is not None else "finite"


def integer(low: int | None = None, high: int = INT_LIMIT - 1) -> Parse:
    """An int flag's type: a whole number in low..high (at most 64 bits, what the libraries
    behind every flag hold)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {shorten(text)!r}"
                                             ) from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {shorten(text)}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {shorten(text)}")
        return value
    return parse


def number(low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Parse:
    """A float flag's type: finite (never nan or inf), in [low, high] (`low_open`: above low)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {shorten(text)!r}"
                                             ) from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            bounds = _range_text(low, high, low_open)
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def text(value: str) -> str:
    """A path, URL or name flag's type: not empty (an empty --out would fall back to the
    default without a word)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must be non-empty")
    return value
