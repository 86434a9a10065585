"""The local engine: runs the per-image host steps of :mod:`segcli.method.steps` on this machine.

The device stages (backbone and crop forwards) stay with the caller, batched across images; the engine maps a
per-image step over the images as their features arrive and gives the results back in input order, so what
follows (the crop groups, the cache writes, the fits) never depends on how the steps were scheduled.

With ``workers`` > 0 the steps run in a pool of worker processes (:class:`segcli.engines.pool.WorkerPool`,
``--workers N``): the settings shared by every task of a map (the fitted model, output folders, the
refiner's device) reach each worker once, through the pool's initializer; each task carries one image's
features (or region bundle) and gives back its result and the seconds its stages took, which are added to the
run's timings. At most a few tasks per worker are in flight, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator

from segcli.errors import BadImageError
from segcli.timings import Timings


def _run_step(contexts: dict[str, dict], key: str, step: Callable[..., Any], task: tuple,
              clock: Callable[[], float]) -> tuple[Any, dict[str, float]]:
    """A step in a worker process: its shared settings come from the pool's context, its timings (on the
    run's clock) go back."""
    timings = Timings(clock)
    result = step(*task, **contexts[key], timings=timings)
    return result, timings.as_dict()


def _tag(task: tuple) -> str:
    """The image key of a task (its first element is the ImageItem), for reports and the test hook."""
    return str(getattr(task[0], "key", "")) if task else ""


class LocalEngine:
    """Map per-image steps over tasks, in input order, in this process or in ``workers`` worker processes.

    A step is a plain function of :mod:`segcli.method.steps`; ``imap(step, tasks, **shared)`` calls
    ``step(*task, **shared, timings=...)`` for every task and yields ``(task, result)``. A
    :class:`BadImageError` raised by a step is given back in place of its result (the image is reported and
    skipped; the run goes on), and so is a :class:`segcli.engines.pool.WorkerDied` when the worker process running
    a step dies; any other error stops the run.
    """

    def __init__(self, timings: Timings | None = None, workers: int = 0) -> None:
        self.timings = timings or Timings()
        self.workers = max(0, int(workers))
        self._pool = None
        self._contexts: dict[str, dict] = {}  # the shared settings the pool's workers hold, by digest
        self._active: Counter[str] = Counter()  # maps running now, per context digest

    def imap(self, step: Callable[..., Any], tasks: Iterable[tuple], **shared: Any) -> Iterator[tuple[tuple, Any]]:
        if self.workers == 0:
            for task in tasks:
                try:
                    result = step(*task, **shared, timings=self.timings)
                except BadImageError as exc:
                    result = exc
                yield task, result
            return
        key = hashlib.sha256(pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
        pool = self._pool_with(key, shared)
        self._active[key] += 1
        held: deque[tuple] = deque()

        def feed():
            for task in tasks:
                held.append(task)
                yield _tag(task), (key, step, task, self.timings.clock)

        try:
            for _, outcome in pool.map(_run_step, feed()):
                task = held.popleft()
                if isinstance(outcome, BadImageError):
                    yield task, outcome
                    continue
                result, seconds = outcome
                self.timings.add(seconds)
                yield task, result
        finally:
            self._active[key] -= 1

    def _pool_with(self, key: str, shared: dict):
        """The worker pool, its workers holding ``shared`` (restarted with it when they do not yet: the
        contexts of the maps still running are kept)."""
        from segcli.engines.pool import WorkerPool

        if key not in self._contexts:
            self._contexts = {k: v for k, v in self._contexts.items() if self._active[k] > 0}
            self._contexts[key] = shared
            if self._pool is None:
                self._pool = WorkerPool(self.workers, self._contexts)
            else:
                self._pool.update(self._contexts)
        return self._pool

    def close(self) -> None:
        """Release the engine's workers (they are started again when needed)."""
        if self._pool is not None:
            self._pool.close()
        self._contexts = {}
