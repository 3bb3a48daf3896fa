"""User-facing errors: one line that names the bad file, column or value; the CLI maps them to exit 1."""


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


def describe(error: BaseException, limit: int = 200) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    msg = lines[0] if lines else ""
    return f"{type(error).__name__}: {msg[:limit]}" if msg else type(error).__name__
