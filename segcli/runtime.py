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

Thread counts never change results here: the features, refined masks and label PNGs are byte-identical for
every ``--threads`` value (tests/test_runtime_threads.py checks it end to end).
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


def set_threads(threads: int | None) -> int:
    """``--threads N``: torch's intra-op threads for this process (None: leave torch's choice, one per
    physical core). Returns the count in force. Results do not depend on it; only speed does."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())
