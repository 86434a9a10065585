"""How a run talks to its caller: progress, skipped images, notes, and per-stage timings.

The pipeline only calls this small interface; the CLI passes a rich-backed reporter, Python users get a
silent one (or their own subclass).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
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


class Timings:
    """Seconds accumulated per pipeline stage (wall-clock, or the CPU time of the thread running it)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        # clock: wall-clock by default; time.thread_time gives CPU seconds of the thread that ran each stage
        # (what the schedule benchmark uses, so that a loaded machine does not inflate the stages' costs).
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        # Stages also run in background threads (decode workers, cache writes): add under a lock.
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - t0
            with self._lock:
                self.seconds[stage] += dt

    def add(self, seconds: dict[str, float]) -> None:
        """Add stage seconds measured elsewhere (a worker process's share of the run)."""
        with self._lock:
            for stage, dt in seconds.items():
                self.seconds[stage] += dt

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)
