"""How a run talks to its caller: progress, skipped images and notes (stage timings: :mod:`segcli.timings`).

The pipeline only calls this small interface; the CLI passes a rich-backed reporter, Python users get a
silent one (or their own subclass).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Reporter:
    """Silent reporter; subclass to show progress."""

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def skip(self, name: str, reason: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        """Something went wrong and was repaired (e.g. a damaged cache entry recomputed); shown even when quiet."""


class RichReporter(Reporter):
    """Progress bars and messages on stderr, so stdout stays clean for machine-readable output."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet or total == 0:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def skip(self, name: str, reason: str) -> None:
        self.console.print(f"[yellow]skipped[/] {reason}", markup=True, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"segcli: warning: {message}", markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)
