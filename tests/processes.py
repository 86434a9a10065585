"""segcli run as a separate process, for the tests that interrupt or kill a run: start it in a session of its
own, wait for a sign of progress, signal it, and never leave it running whatever the test's outcome."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def segcli_process(args: list) -> Iterator[subprocess.Popen]:
    """``python -m segcli ARGS`` in a new session (its own process group, as a terminal job), stderr piped;
    at exit the whole group is killed if it still runs, and stderr is closed."""
    proc = subprocess.Popen([sys.executable, "-m", "segcli", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], what: str, limit_s: float = 300) -> None:
    """Poll ``done`` until it holds; fail if the run ends first or ``limit_s`` passes."""
    t0 = time.time()
    while not done():
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted: " + proc.stderr.read().decode())
        if time.time() - t0 > limit_s:
            pytest.fail(f"no {what} appeared")
        time.sleep(0.005)


def interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT, group: bool = True,
              timeout: float = 30) -> tuple[int, str, float]:
    """Send ``sig`` to the run's process group (what Ctrl-C in a terminal does) or, with ``group=False``, to its
    main process only; wait for it to end. Returns (exit code, stderr, seconds from the signal to the exit)."""
    t0 = time.time()
    (os.killpg if group else os.kill)(proc.pid, sig)
    proc.wait(timeout=timeout)
    return proc.returncode, proc.stderr.read().decode(), time.time() - t0
