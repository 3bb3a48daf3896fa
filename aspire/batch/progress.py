"""The batch's progress on stderr: one bar of finished classes with counts of done, running and failed,
the names of the running ones, and a line per finished, retried or failed class."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from aspire.progress import progress_bars


class BatchProgress:
    def __init__(self, total: int, *, console: Optional[Console] = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.running: dict[str, str] = {}     # unit -> label
        self.done = self.failed = 0
        self._bar = progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                  console=self.console, enabled=enabled)
        self._task = self._bar.add_task("batch", total=total, status="")

    def __enter__(self) -> "BatchProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def _refresh(self) -> None:
        names = ", ".join(self.running.values())
        status = f"{self.done} done · {len(self.running)} running · {self.failed} failed"
        if names:
            status += f" ({names[:60]}{'…' if len(names) > 60 else ''})"
        self._bar.update(self._task, completed=self.done + self.failed, status=status)

    def say(self, text: str) -> None:
        if self.enabled:
            self._bar.console.print(text, highlight=False, soft_wrap=True)

    def skip(self, n: int) -> None:
        """Units finished by an earlier invocation."""
        self.done += n
        if n:
            self.say(f"{n} class run(s) already done: skipped")
        self._refresh()

    def start(self, unit: str, label: str, attempt: int) -> None:
        self.running[unit] = label + (f" (attempt {attempt})" if attempt > 1 else "")
        self._refresh()

    def finish(self, unit: str, label: str, seconds: float, findings: int, spurious: int) -> None:
        self.running.pop(unit, None)
        self.done += 1
        self.say(f"[green]done[/green]    {escape(label)}: {spurious} spurious of {findings} findings ({seconds:.1f} s)")
        self._refresh()

    def retry(self, unit: str, label: str, error: str, attempt: int, of: int) -> None:
        self.running.pop(unit, None)
        self.say(f"[yellow]retry[/yellow]   {escape(label)} (attempt {attempt} of {of} failed): {escape(error)}")
        self._refresh()

    def fail(self, unit: str, label: str, error: str, attempts: int) -> None:
        self.running.pop(unit, None)
        self.failed += 1
        self.say(f"[red]failed[/red]  {escape(label)} after {attempts} attempt(s): {escape(error)}")
        self._refresh()
