"""Rich progress bars on stderr for long steps: `with step_progress("editing", n) as advance: advance(1)`."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

_stderr = Console(stderr=True)


def progress_bars(*columns: ProgressColumn | str, console: Optional[Console] = None, enabled: bool = True,
                  transient: bool = False) -> Progress:
    """Rich progress bars on stderr, drawn only on a terminal: a log gets the command's own lines, not bar frames
    (rich ends a bar in a file with its last frame and a blank line, also above an error message)."""
    console = console or _stderr
    return Progress(*columns, console=console, disable=not enabled or not console.is_interactive, transient=transient)


@contextlib.contextmanager
def step_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bars(*columns, enabled=enabled and total > 0) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
