"""Run the console script's real path, main() with its error table and exit codes, inside a test."""

from __future__ import annotations

import sys

from aspire import cli


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `aspire ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["aspire", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
