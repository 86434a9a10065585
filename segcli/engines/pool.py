"""A pool of worker processes for the host's per-image work (``--workers N``), results in input order.

Why processes: the per-image steps after the features (fusion, k-means of the image level, refinement,
regions, label maps, PNG encoding) are numpy/torch/PIL code that holds the GIL for much of its time, so
threads would not scale; the device stage (backbone and crop forwards) stays in the main process.

Guarantees (docs/performance.md, "The worker pool"):

* **Same results as in-process.** A task is a plain module-level function ``fn(context, *args)``; the
  context (the fitted model and the settings) is pickled once and handed to every worker by the pool's
  initializer. Workers run torch with one thread (and numpy's BLAS is single-threaded in the steps), and
  results are yielded in submission order, so nothing downstream depends on which worker ran what.
* **Bounded.** :meth:`WorkerPool.map` keeps at most ``depth`` tasks in flight, pulling its input lazily.
* **A worker that dies** (segfault, ``os._exit``, out-of-memory kill) breaks the executor; the pool is
  rebuilt and the unfinished tasks are re-run one at a time, so the task that kills its worker again is
  identified: it is reported as a :class:`WorkerDied` (a :class:`BadImageError`: that image is skipped,
  exit code 4) and every other task completes.
* **Ctrl-C** (SIGINT to the process group) is ignored by the workers and handled by the main process, which
  terminates them: no orphans. A worker also exits by itself when the main process disappears (``kill -9``).
* **Test hook**: with the environment variable ``SEGCLI_TEST_CRASH_ON=<tag>``, a worker process that starts
  a task tagged ``<tag>`` (the image key) dies at once with ``os._exit(70)``. Only workers check it (never
  the in-process path), so tests can make one worker die on one image.

``workers=0`` runs the same tasks in the calling process, lazily and in order, through the same interface.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from segcli.errors import BadImageError

CRASH_HOOK = "SEGCLI_TEST_CRASH_ON"
# What a worker dies with under the test hook (an exit code no library uses for itself).
CRASH_EXIT_CODE = 70


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def max_workers() -> int:
    """The largest ``--workers`` of the local engine: the available cores (at least 2). Every worker is a
    process with its own copy of the model and torch (~300 MB); beyond one per core they only add memory and
    time (measured: 16 workers on 2 cores, 4.6 GB and 5x slower than 1)."""
    return max(2, available_cores())


def default_workers() -> int:
    """``--workers`` by default: the available cores minus one (the main process feeds the device), at least 0."""
    return max(0, available_cores() - 1)


def default_depth(workers: int) -> int:
    """Tasks in flight per :meth:`WorkerPool.map`: enough to keep every worker busy while the main process
    waits on the oldest result, few enough to bound memory (each task holds one image's features or masks)."""
    return max(2, 2 * workers + 2)


class WorkerDied(BadImageError):
    """The worker process running this image's task died (its exit status says how); the image is skipped."""


# ------------------------------------------------------------------------------------------ worker side
_CONTEXT: Any = None


def _watch_parent() -> None:
    """Exit when the main process is gone (``kill -9``): a worker blocked on its task queue would wait forever."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - not started by multiprocessing
        return
    parent.join()  # returns when the parent's sentinel closes, i.e. when it exited
    os._exit(1)


def _init_worker(context: bytes) -> None:
    """Pool initializer: ignore Ctrl-C (the main process stops the pool), watch the parent, one torch thread,
    and unpickle the context once."""
    global _CONTEXT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, name="segcli-parent-watch", daemon=True).start()
    import torch

    torch.set_num_threads(1)
    _CONTEXT = pickle.loads(context)


def _run_task(fn: Callable, tag: str, args: tuple) -> Any:
    if tag and os.environ.get(CRASH_HOOK) == tag:
        os._exit(CRASH_EXIT_CODE)
    return fn(_CONTEXT, *args)


# ------------------------------------------------------------------------------------------ main side
class _Task:
    __slots__ = ("tag", "args", "future", "generation", "outcome", "done")

    def __init__(self, tag: str, args: tuple) -> None:
        self.tag, self.args = tag, args
        self.future: Future | None = None
        self.generation = -1  # which executor the future belongs to
        self.outcome: Any = None
        self.done = False


class WorkerPool:
    """``workers`` processes (spawned: torch with fork is unsafe) sharing one pickled context.

    >>> with WorkerPool(2, context) as pool:                                # doctest: +SKIP
    ...     for tag, result in pool.map(step, ((item.key, (item,)) for item in items)):
    ...         ...

    Several maps may use one pool at once (a pass whose input is another map's output): a map whose tasks were
    lost with an executor that another map rebuilt re-runs them the careful way (alone), so a worker death
    is always charged to the task that caused it.
    """

    def __init__(self, workers: int, context: Any, *, depth: int | None = None) -> None:
        self.workers = max(0, int(workers))
        self.context = context
        self.depth = max(1, depth) if depth is not None else default_depth(self.workers)
        self._blob = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL) if self.workers else b""
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0
        self.deaths: list[str] = []  # tags of the tasks whose worker died (statistics, tests)

    def update(self, context: Any) -> None:
        """Hand the workers another context: the running workers finish their tasks and exit (their results
        are kept), and the next task starts workers with the new one. Same context: nothing happens."""
        blob = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL) if self.workers else b""
        self.context = context
        if blob != self._blob:
            self._blob = blob
            self.close()

    # -- lifecycle
    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.terminate()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing

            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self._blob,))
            self._generation += 1
        return self._executor

    def _submit(self, fn: Callable, task: _Task) -> None:
        task.future = self._pool().submit(_run_task, fn, task.tag, task.args)
        task.generation = self._generation

    def close(self) -> None:
        """Wait for the workers to finish the tasks given to them (their results stay with the maps) and exit."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def terminate(self) -> None:
        """Stop every worker now (Ctrl-C, an error, or a consumer that stopped early): queued tasks are
        dropped, running ones killed (their files are written atomically, so nothing half-written remains)."""
        ex, self._executor = self._executor, None
        if ex is None:
            return
        processes = list((getattr(ex, "_processes", None) or {}).values())  # the executor's own handles (no public API)
        ex.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():  # pragma: no cover - a worker stuck in uninterruptible I/O
                p.kill()
                p.join(timeout=5)

    def _dead_status(self) -> str:
        """How the worker of a broken executor ended (its exit code or signal), for the report."""
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        for p in processes:  # the executor may not have reaped them yet: give them a moment
            if p.exitcode is None:
                p.join(timeout=1)
        codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        codes.sort(key=lambda c: c == -signal.SIGTERM)  # the others were terminated by the executor itself
        if not codes:
            return "it exited"
        code = codes[0]
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    # -- work
    def map(self, fn: Callable, tasks: Iterable[tuple[str, tuple]]) -> Iterator[tuple[str, Any]]:
        """``(tag, fn(context, *args))`` for every ``(tag, args)`` of ``tasks``, in order; a task that raised
        :class:`BadImageError`, or whose worker died (:class:`WorkerDied`), gives that exception instance.
        Any other exception of a task is raised here. At most ``depth`` tasks are in flight; results are
        yielded as soon as the oldest is ready, and the input is pulled only as far as needed."""
        if self.workers == 0:
            for tag, args in tasks:
                try:
                    yield tag, fn(self.context, *args)
                except BadImageError as exc:
                    yield tag, exc
            return
        pending: deque[_Task] = deque()
        try:
            for tag, args in tasks:
                task = _Task(tag, args)
                self._submit(fn, task)
                pending.append(task)
                while pending and (len(pending) >= self.depth or pending[0].future.done()):
                    yield self._take(fn, pending)
            while pending:
                yield self._take(fn, pending)
        except BaseException:
            # Ctrl-C, an error, or a consumer that stopped early: nothing of this map must keep running.
            for task in pending:
                if task.future is not None:
                    task.future.cancel()
            self.terminate()
            raise

    @staticmethod
    def _settle(task: _Task, block: bool) -> bool:
        """Take the task's result (or its BadImageError) when its future has one; False when the task was lost
        with its executor (a worker died, or the pool was stopped) or, without ``block``, is not finished."""
        fut = task.future
        if fut is None or fut.cancelled() or not (block or fut.done()):
            return False
        try:
            task.outcome = fut.result()
        except BadImageError as exc:
            task.outcome = exc
        except (BrokenProcessPool, CancelledError):
            return False
        task.done = True
        return True

    def _take(self, fn: Callable, pending: deque[_Task]) -> tuple[str, Any]:
        task = pending[0]
        # Block only on a future of the live executor: one of an executor that is gone may never finish.
        if not task.done and not self._settle(task, block=task.generation == self._generation and self._executor is not None):
            self._isolate(fn, pending)
        pending.popleft()
        return task.tag, task.outcome

    def _isolate(self, fn: Callable, pending: deque[_Task]) -> None:
        """Tasks were lost with their executor: stop the pool, then re-run every unfinished task of this map
        alone in a fresh pool, in order, so that a task that kills its worker again is known (and reported);
        the others get their results, then the pool runs on."""
        self.terminate()
        for task in pending:
            if task.done or self._settle(task, block=False):
                continue
            self._submit(fn, task)
            if not self._settle(task, block=True):
                status = self._dead_status()
                self.terminate()
                task.outcome = WorkerDied(f"{task.tag}: the worker process died while processing this image ({status})")
                task.done = True
                self.deaths.append(task.tag)
