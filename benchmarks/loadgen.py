"""A bounded background load for the benchmarks: one busy-looping process pinned to one core.

Why a separate process with its own deadline: the benchmark must never leave a busy loop behind, even when it
is killed with SIGKILL (where no ``finally`` runs). The loop checks its deadline itself, asks the kernel to
kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``), and :class:`BusyCore` stops it in ``__exit__``
(the benchmarks also turn SIGTERM / SIGHUP into an exception so that ``finally`` blocks run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_LOOP = r"""
import ctypes, os, signal, sys, time
try:  # die with the benchmark even if it is SIGKILLed
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except OSError:
    pass
if os.getppid() != int(sys.argv[3]):
    sys.exit(0)  # the parent is already gone
try:
    os.sched_setaffinity(0, {int(sys.argv[2])})
except (AttributeError, OSError):
    pass
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    for _ in range(100000):
        pass
"""


class BusyCore:
    """``with BusyCore(core=0, limit_s=600):`` one process spinning on ``core`` for at most ``limit_s`` seconds."""

    def __init__(self, core: int = 0, limit_s: float = 600.0) -> None:
        self.core = int(core)
        self.limit_s = float(limit_s)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(self.limit_s), str(self.core), str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        time.sleep(0.3)  # let it start and take its core before the timed work begins
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=10)


def raise_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit in the main thread, so ``finally`` blocks (and BusyCore.__exit__) run."""

    def handler(signum, _frame):  # noqa: ANN001
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
