"""CPU runtime settings that must be decided before torch loads: the OpenMP wait policy, and the thread count.

Why: torch's CPU kernels run on an OpenMP team (libgomp in the pip wheels). By default a libgomp thread that
reaches the end of a parallel region *spins* (GOMP_SPINCOUNT = 300000 iterations) waiting for the others.
On a machine where another process holds some cores (a laptop, a shared server, a CI runner), a team member
that is not running keeps everyone else spinning, and the spinning threads take the CPU from the very thread
they wait for. Every element-wise op of a small image then pays a scheduler time slice. Measured on the
2-core machine with one core held by a busy loop (ViT-S/16 forward at 448x592, bf16; 6 voc-mini images
through the mean-field refiner; masks and features byte-identical in every case):

    ====================  ==========  ===========
    setting               forward     refine x6
    ====================  ==========  ===========
    2 threads, spinning   3.1-3.5 s   11.9-42.9 s
    2 threads, passive    0.94-1.0 s  1.07-1.19 s
    1 thread              0.6-1.5 s   1.4-1.6 s
    ====================  ==========  ===========

With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread sleeps at once, so a busy machine costs the CPU it took and
little more (see ``benchmarks/bench_load.py`` for the interleaved idle / one-busy-core measurement and
``docs/incoming/issue21.md``). libgomp (and Intel's libiomp) read the variable once, when torch loads them,
so :func:`apply_wait_policy` runs when :mod:`segcli` is imported, before any torch import of segcli's own.
A user's own ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` wins: segcli then changes nothing.

Thread counts do not change results: with the eager torch backbone (fp32 or bf16) the features, refined masks
and label PNGs are byte-identical for 1 and 2 threads and when the count changes from batch to batch
(tests/test_runtime_threads.py, end to end). ``--compile`` and ``--openvino`` are not covered by that test.
"""

from __future__ import annotations

import os
import sys

# Variables by which a user (or a launcher such as torchrun / mpirun) already chose how idle OpenMP threads wait.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
DEFAULT_WAIT_POLICY = "PASSIVE"


def apply_wait_policy(environ: dict | None = None, torch_loaded: bool | None = None) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a wait policy or torch is already loaded.

    Returns what segcli set (None when it left the environment alone). ``environ``/``torch_loaded`` are for
    tests; by default the process environment and whether ``torch`` is in :data:`sys.modules` (once torch has
    loaded its OpenMP runtime, changing the variable would only mislead child processes' reports, so then the
    policy is left as it is: an embedding program that imports torch first keeps its own choice).
    """
    env = os.environ if environ is None else environ
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    if loaded or any(env.get(v) not in (None, "") for v in WAIT_VARIABLES):
        return None
    env["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    return DEFAULT_WAIT_POLICY


def wait_policy(environ: dict | None = None) -> str:
    """The wait policy in force, in words (for run reports and benchmark JSON)."""
    env = os.environ if environ is None else environ
    chosen = [f"{v}={env[v]}" for v in WAIT_VARIABLES if env.get(v) not in (None, "")]
    return ", ".join(chosen) if chosen else "OpenMP default (spin, then sleep)"


# ------------------------------------------------------------------------------------ load-aware threads
#
# Passive waiting removes the spinning, but an OpenMP team still waits at every barrier for its slowest member:
# when other processes keep the cores busy, a 2-thread team runs at the pace of the thread the scheduler left
# out. Measured at load average 10-17 on the 2-core machine (benchmarks/bench_load.py), the whole voc-mini run
# took 3.3x longer with 2 threads than with 1. So unless the thread count is fixed (``--threads N``, or
# OMP_NUM_THREADS), the forward takes only the cores no other process is running on, re-read before every
# backbone batch. Since no result depends on the thread count, this changes speed only.

_fixed_threads: int | None = None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _procs_running() -> int | None:
    """Runnable tasks on the whole machine right now (/proc/stat), or None where the file does not exist."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _own_running() -> int:
    """Threads of this process that are runnable now (state R in /proc/self/task/*/stat)."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] == b"R":
            n += 1
    return max(1, n)


def busy_elsewhere(samples: int = 5, interval_s: float = 0.002) -> float | None:
    """How many cores other processes are running on now: the median over a few samples of the machine's
    runnable tasks minus this process's own runnable threads. None where /proc is not available."""
    import time

    seen = []
    for i in range(samples):
        total = _procs_running()
        if total is None:
            return None
        seen.append(max(0, total - _own_running()))
        if i + 1 < samples:
            time.sleep(interval_s)
    seen.sort()
    return float(seen[len(seen) // 2])


def choose_threads(cores: int, machine_cpus: int, busy: float | None) -> int:
    """Threads for the next batch: the cores this process may use that no other process is running on, at
    least 1. ``machine_cpus`` is every CPU of the machine (what /proc/stat counts); in a container pinned to a
    few of many CPUs the other tasks mostly run elsewhere, so only the machine's spare CPUs limit us."""
    if busy is None:
        return cores
    spare = machine_cpus - busy
    return int(max(1, min(cores, round(spare))))


def thread_policy() -> str:
    """``fixed N`` or ``auto`` (see :func:`adapt_threads`), for reports."""
    return f"fixed {_fixed_threads}" if _fixed_threads else "auto (cores no other process is running on)"


def set_threads(threads: int | None) -> int:
    """``--threads N``: torch's intra-op threads for this process, fixed for the whole run. None: automatic
    (:func:`adapt_threads`), unless OMP_NUM_THREADS fixes it. Returns the count in force now. Results do not
    depend on it; only speed does."""
    global _fixed_threads
    import torch

    if threads:
        _fixed_threads = int(threads)
        torch.set_num_threads(_fixed_threads)
    else:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        _fixed_threads = int(env) if env.isdigit() and int(env) > 0 else None
        if _fixed_threads is None:
            adapt_threads()
    return int(torch.get_num_threads())


def adapt_threads() -> int:
    """Before a backbone batch: set torch's threads to :func:`choose_threads` unless they are fixed. Costs ~10 ms
    (five /proc samples), nothing next to a batch's forward."""
    import torch

    if _fixed_threads is None and not os.environ.get("OMP_NUM_THREADS", "").strip():
        want = choose_threads(_cpu_count(), os.cpu_count() or 1, busy_elsewhere())
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
    return int(torch.get_num_threads())
