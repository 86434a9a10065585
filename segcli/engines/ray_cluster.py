"""Connecting to Ray for ``--engine ray``: start a private local cluster (loopback only) or join one, and stop
what was started at the end of the run.

Imported only when ``--engine ray`` is chosen: Ray is an optional extra (``segcli[ray]``) and costs ~0.6 s to
import and seconds to start, so the local engine and ``segcli --help`` never import it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from segcli.errors import InputError, UsageError

# The versions tests/test_engine_ray.py ran on (pyproject's ``ray`` extra declares the same range).
RAY_MIN_VERSION = (2, 60)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and what each backbone worker (actor) asks of it.

    ``address``: ``ray.init``'s address (``auto``, ``ray://head:10001``, ``head:6379``); None starts a local
    cluster for the run on the loopback interface and stops it at the end. ``workers``: backbone actors (None:
    one per GPU of the cluster when the run uses GPUs, else 1). ``gpus_per_worker`` (None: 1 when the cluster has
    GPUs and ``--device`` allows them, else 0) and ``cpus_per_worker``: what each actor reserves.
    ``num_cpus``: CPUs of a local cluster (None: all of this machine's).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    num_cpus: int | None = None


def import_ray(address: str | None = None):
    """Import ray (one clear error without the extra). For a local cluster, first make Ray bind every process to
    127.0.0.1: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray 2.60 keeps a loopback node address instead of
    replacing it with the machine's interface address, which some set-ups do otherwise."""
    if address is None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--engine ray needs Ray Data: pip install 'segcli[ray]' ({exc})") from None
    try:
        version = tuple(int(v) for v in ray.__version__.split(".")[:2])
    except ValueError:
        version = RAY_MIN_VERSION
    if version < RAY_MIN_VERSION:
        raise UsageError(f"--engine ray needs ray >= {'.'.join(map(str, RAY_MIN_VERSION))}, found {ray.__version__}: "
                         "pip install 'segcli[ray]'")
    return ray


def _quiet_ray_data(ray) -> None:
    """segcli reports progress itself: no Ray Data progress bars or per-dataset INFO lines on the terminal."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    for name in ("ray.data", "ray"):  # Ray's own notices (token set-up, progress bars off); errors still show
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def ray_session(options: RayOptions) -> Iterator[object]:
    """The ``ray`` module, connected: to ``options.address``, to the session already initialised in this process
    (a Python caller's or a test's; left running), else to a private local cluster started now, on 127.0.0.1,
    without a dashboard, and shut down when the block ends (also on errors and Ctrl-C)."""
    ray = import_ray(options.address)
    _quiet_ray_data(ray)
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if options.address is None:
            ray.init(address="local", num_cpus=options.num_cpus, _node_ip_address=LOOPBACK, **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local cluster"
        raise InputError(f"--engine ray: cannot connect to {where}: {' '.join(str(exc).split())[:300]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_addresses(ray) -> dict[str, list[str]]:
    """The addresses the connected cluster's nodes and GCS use (for the loopback checks of the tests)."""
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    gcs = ray.get_runtime_context().gcs_address
    return {"nodes": nodes, "gcs": [gcs.rsplit(":", 1)[0]]}
