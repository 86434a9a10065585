"""The local engine: runs the per-image host steps of :mod:`segcli.steps` on this machine.

The device stages (backbone and crop forwards) stay with the caller, batched across images; the engine maps a
per-image step over the images as their features arrive and gives the results back in input order, so what
follows (the crop groups, the cache writes, the fits) never depends on how the steps were scheduled.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from segcli.errors import BadImageError
from segcli.report import Timings


class LocalEngine:
    """Map per-image steps over tasks, in input order, in this process.

    A step is a plain function of :mod:`segcli.steps`; ``imap(step, tasks, **shared)`` calls
    ``step(*task, **shared, timings=...)`` for every task and yields ``(task, result)``. A
    :class:`BadImageError` raised by a step is given back in place of its result (the image is reported and skipped; the run goes on); any other error stops
    the run.
    """

    def __init__(self, timings: Timings | None = None) -> None:
        self.timings = timings or Timings()

    def imap(self, step: Callable[..., Any], tasks: Iterable[tuple], **shared: Any) -> Iterator[tuple[tuple, Any]]:
        for task in tasks:
            try:
                result = step(*task, **shared, timings=self.timings)
            except BadImageError as exc:
                result = exc
            yield task, result

    def close(self) -> None:
        """Release the engine's workers (none in this process)."""
