"""Seconds spent per pipeline stage, accumulated across threads and worker processes.

Kept apart from :mod:`segcli.report` (the console face) because every layer below the face records its
stages here: the per-image steps, the engines and the feature source.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator


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
