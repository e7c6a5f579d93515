"""What bad input raises, and how any error is shown in one line. Knows nothing of torch."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input; the CLI prints the message as one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of a library's (often multi-line) message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
