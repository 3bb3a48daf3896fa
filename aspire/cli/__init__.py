"""The `aspire` command line. Thin: parse, call, render. Results on stdout, everything else on stderr.

    app.py      the Typer application, known errors as one line, main()
    options.py  the options the commands share (declared once) and their parsing
    render.py   tables, JSON and the --fail-on gate
    models.py   train, eval, reliance, data toy-*        runs.py   probe, reprobe, report, augment
    agent.py    audit, chat, demo                       batch.py  batch

Exit codes: 0 success, 1 a user error (one line naming what is wrong), 2 a usage error, 3 a confirmed spurious
finding remains (--fail-on), 4 an audit paused for approval (no --yes, no terminal), 130 interrupted.
Tracebacks only with ASPIRE_DEBUG=1.
"""

from aspire.cli import models, runs, agent, batch  # noqa: F401 - each registers its commands on `app`, in this order
from aspire.cli.app import app, main

__all__ = ["app", "main"]
