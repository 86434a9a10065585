"""Streaming a function over batches of work in a process pool, with a bounded number of batches in flight.

Memory stays independent of the number of images: only ``2 x workers`` batches are submitted at a time and
each returns a small summary (a confusion matrix), which the caller folds into its running total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def batched(items: Sequence[T], workers: int, max_batch: int = 64) -> list[list[T]]:
    """Split items into batches: about 8 per worker, at most ``max_batch`` items each."""
    n = len(items)
    if n == 0:
        return []
    size = max(1, min(max_batch, -(-n // (workers * 8))))
    return [list(items[i : i + size]) for i in range(0, n, size)]


def _worker_init() -> None:
    """Workers leave Ctrl-C to the main process, which cancels the pool and reports the interruption once."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_batches(
    func: Callable[..., R],
    batches: Iterable[Any],
    args: tuple = (),
    workers: int = 1,
    on_result: Callable[[R], None] = lambda r: None,
) -> None:
    """Call ``func(batch, *args)`` for every batch (in ``workers`` processes) and hand each result to ``on_result``.

    Results arrive in completion order. The first exception cancels the rest and is raised as is.
    """
    batches = list(batches)
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            on_result(func(batch, *args))
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(batches))
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    try:
        todo = iter(batches)
        pending = {pool.submit(func, b, *args) for b in islice(todo, 2 * workers)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                on_result(fut.result())
                nxt = next(todo, None)
                if nxt is not None:
                    pending.add(pool.submit(func, nxt, *args))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
