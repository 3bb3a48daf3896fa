"""The `aspire` command line. Thin: parse, call, render. Results on stdout, everything else on stderr.

Exit codes: 0 success, 1 a user error (one line naming what is wrong), 2 a usage error.
Tracebacks only with ASPIRE_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from aspire.errors import AspireError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, name, prove and repair the spurious features an image classifier relies on.")
data_app = typer.Typer(no_args_is_help=True, help="Build the toy benchmarks.")
app.add_typer(data_app, name="data")

out = Console()                 # results
err = Console(stderr=True)      # logs, progress, errors


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


# Known exceptions → one-line messages (huggingface_hub's `hf` style).
def _one_line(e: BaseException) -> Optional[str]:
    if isinstance(e, AspireError):
        return str(e)
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}"
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return f"no space left on device while writing {e.filename or ''}".strip()
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or e}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return None


def main() -> None:
    try:
        app(standalone_mode=False)
    except SystemExit as e:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI boundary
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            err.print("aborted")
            sys.exit(1)
        message = _one_line(e)
        if os.environ.get("ASPIRE_DEBUG") == "1" or message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


# Commands live below, each a thin wrapper over the package.
