"""User-facing errors: one line that names the bad file, column or value; the CLI maps them to exit 1."""

from __future__ import annotations

from typing import Optional


class AspireError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class DataError(AspireError):
    """A dataset, metadata file, image or annotation is missing, malformed or inconsistent."""


class CheckpointError(AspireError):
    """A classifier checkpoint cannot be read or does not match what it is used with."""


class ModelLoadError(AspireError):
    """A model id or weights file cannot be loaded."""


class ConfigError(AspireError):
    """A setting has an invalid value."""


def one_line(text: object, limit: Optional[int] = None) -> str:
    """Text on one line (whitespace collapsed), cut to `limit` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def describe(error: BaseException, limit: int = 200) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    msg = lines[0] if lines else ""
    return f"{type(error).__name__}: {msg[:limit]}" if msg else type(error).__name__


def error_line(error: BaseException, limit: int = 300) -> str:
    """What to tell a user of a failure, on one line: an AspireError's own message, else the type and message."""
    text = str(error).strip().splitlines()[0] if isinstance(error, AspireError) and str(error).strip() else None
    return one_line(text or describe(error, limit), limit)
