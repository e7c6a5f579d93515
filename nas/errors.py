"""What bad input raises, and how any error is shown in one line: a value quoted in one is cut
short. Plain Python (the command line's flags read it before any heavy import)."""

from __future__ import annotations

from typing import Any

INT_LIMIT = 2**63  # the integers every library behind a number accepts: 64 bits


class ConfigError(ValueError):
    """Bad user input; the CLI prints the message as one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of a library's (often multi-line) message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to about `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def excerpt(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters: what a one-line error quotes of a value
    that may be a 30,000-element list or a 23-digit number."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of more than {limit} digits"  # repr would refuse past 4,300 digits
    return shorten(repr(value), limit)
