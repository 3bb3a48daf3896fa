"""The Typer application, its error table and the console entry point."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from aspire.cli.render import err
from aspire.errors import AspireError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, name, prove and repair the spurious features an image classifier relies on.")
data_app = typer.Typer(no_args_is_help=True, help="Build the toy benchmarks.")
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from aspire import __version__

        print(f"aspire {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print aspire's version and exit")) -> None:
    """Find, name, prove and repair the spurious features an image classifier relies on."""


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
        app()  # standalone: typer/click handle usage errors (exit 2) and Ctrl-C
    except SystemExit:
        raise
    except BaseException as e:  # the CLI boundary: known errors as one line, others re-raised
        message = _one_line(e)
        if os.environ.get("ASPIRE_DEBUG") == "1" or message is None:
            raise
        if isinstance(e, KeyboardInterrupt):
            err.print("interrupted: what was recorded is kept; run the same command again to resume "
                      "(aspire audit: --resume RUN_DIR)", highlight=False, soft_wrap=True)
            sys.exit(130)
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(1)


# Commands live below, each a thin wrapper over the package.
