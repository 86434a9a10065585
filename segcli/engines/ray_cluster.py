"""Connecting to Ray for ``--engine ray``: start a private local cluster (loopback only) or join one, and stop
what was started at the end of the run.

Imported only when ``--engine ray`` is chosen: Ray is an optional extra (``segcli[ray]``) and costs ~0.6 s to
import and seconds to start, so the local engine and ``segcli --help`` never import it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
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


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``ray://HOST:PORT`` address; None for ``auto``/``local`` and the like."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def is_loopback_address(address: str | None) -> bool:
    """True for no address (a private local cluster) and for 127.x / ::1 / localhost ones."""
    if address is None:
        return True
    hp = _host_port(address)
    if hp is None:
        return False
    try:
        return ipaddress.ip_address(hp[0]).is_loopback
    except ValueError:
        return hp[0] == "localhost"


def import_ray(address: str | None = None):
    """Import ray (one clear error without the extra). For a local cluster (or a loopback address), first make
    Ray keep every process on 127.0.0.1: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray 2.60 keeps a loopback
    node address instead of replacing it with the machine's interface address, which it does otherwise (then
    ``--address 127.0.0.1:6379`` is dialled on the machine's network address)."""
    if is_loopback_address(address):
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
    # Ray's own notices (token set-up, progress bars off) and its tracebacks of a failed job: segcli reports a
    # failure itself, as one line (the traceback with --debug).
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


@contextmanager
def ray_session(options: RayOptions) -> Iterator[object]:
    """The ``ray`` module, connected: to ``options.address``, to the session already initialised in this process
    (a Python caller's or a test's; left running), else to a private local cluster started now, on 127.0.0.1,
    without a dashboard, and shut down when the block ends (also on errors and Ctrl-C)."""
    ray = import_ray(options.address)
    _quiet_ray_data(ray)
    if options.address is not None:
        _check_reachable(options.address)
    if ray.is_initialized():
        check_resources(ray, options)
        yield ray
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    with _native_stderr_aside():
        with _started(ray, options, kwargs):
            yield ray


@contextmanager
def _native_stderr_aside() -> Iterator[None]:
    """Ray's native code (the driver's core worker, and the processes of a local cluster, which inherit it)
    writes its own log lines to file descriptor 2: during the session that descriptor goes to a log file in the
    temporary folder, while Python's ``sys.stderr`` (segcli's messages and progress) keeps the terminal. The
    file is removed at the end; with ``--debug`` / ``SEGCLI_DEBUG`` nothing is redirected."""
    import sys
    import tempfile

    if os.environ.get("SEGCLI_DEBUG") or "--debug" in sys.argv[1:]:
        yield
        return
    try:
        sys.stderr.flush()
        keep = os.dup(2)
        log = tempfile.NamedTemporaryFile(prefix="segcli-ray-", suffix=".log", delete=False)
    except (OSError, ValueError, AttributeError):
        yield
        return
    previous = sys.stderr
    try:
        on_fd2 = previous.fileno() == 2
    except (AttributeError, OSError, ValueError):  # captured in memory (a test runner): leave it alone
        on_fd2 = False
    if on_fd2:
        sys.stderr = os.fdopen(os.dup(keep), "w", buffering=1, encoding=getattr(previous, "encoding", None) or "utf-8",
                               errors="backslashreplace")
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(keep, 2)
        os.close(keep)
        if on_fd2:
            sys.stderr.close()
            sys.stderr = previous
        log.close()
        try:
            os.unlink(log.name)
        except OSError:
            pass


@contextmanager
def _started(ray, options: RayOptions, kwargs: dict) -> Iterator[None]:
    """A Ray session started (a private local cluster) or joined, checked, and shut down at the end."""
    try:
        with _own_signal_handlers():
            if options.address is None:
                ray.init(address="local", num_cpus=options.num_cpus, _node_ip_address=LOOPBACK, **kwargs)
            else:
                ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local cluster"
        raise InputError(f"--engine ray: cannot connect to {where}: {' '.join(str(exc).split())[:300]}") from None
    watcher = _watch_driver() if options.address is None else None
    try:
        check_resources(ray, options)
        yield
    finally:
        with _own_signal_handlers():
            ray.shutdown()
        if watcher is not None:
            watcher.kill()
            watcher.wait()


@contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """Keep segcli's SIGINT/SIGTERM handling across Ray calls: starting Ray's core worker installs native
    handlers (SIGTERM printed a C++ stack dump and ended the driver with -6/-15 instead of exit 130 and one
    line). Python still lists its own handlers, so they are registered again afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def check_resources(ray, options: RayOptions) -> None:
    """Fail at once (exit 2, one line) when one backbone actor asks for more CPUs or GPUs than any node of the
    cluster has: Ray would wait forever for an actor it cannot place. (A request that fits a node but not its
    free resources is Ray's to schedule: it waits for running work to finish.)"""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        raise InputError("--engine ray: the cluster has no live node")
    for flag, key, want in (("--cpus-per-worker", "CPU", options.cpus_per_worker),
                            ("--gpus-per-worker", "GPU", options.gpus_per_worker or 0)):
        most = max(float(n.get(key, 0)) for n in nodes)
        if want > most:
            has = f"at most {most:g} {key}s per node" if most else f"no {key}"
            raise UsageError(f"{flag} {want:g}: no node of the Ray cluster can hold one backbone worker ({len(nodes)} "
                             f"node(s), {has}); Ray would wait forever: ask for at most {most:g}")


_WATCH = """
import os, sys, time
import psutil
driver = psutil.Process(int(sys.argv[1]))
keep = {int(p) for p in sys.argv[2:]}
procs = []
for pid in keep:
    try:
        procs.append(psutil.Process(pid))
    except psutil.Error:
        pass
while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
    time.sleep(0.5)
for p in procs:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _watch_driver():
    """A small process, in a session of its own, that kills the private cluster's processes (GCS, raylet,
    dashboard agent, workers) as soon as this driver is gone: ``kill -9`` of the driver used to leave them
    running for up to two minutes. Stopped at a normal end (``ray.shutdown`` stops the cluster itself)."""
    import subprocess
    import sys

    try:
        import psutil
    except ImportError:  # pragma: no cover - the ray extra installs it
        return None
    me = psutil.Process()
    pids = [str(p.pid) for p in me.children(recursive=True)]
    if not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCH, str(me.pid), *pids], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once (one line) when a HOST:PORT address does not answer: Ray itself retries for minutes."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"--address {address}: nothing answers at {hp[0]}:{hp[1]} ({exc.strerror or exc}); start the "
                         "head node with `ray start --head`, or leave --address out for a local cluster") from None


def cluster_addresses(ray) -> dict[str, list[str]]:
    """The addresses the connected cluster's nodes and GCS use (for the loopback checks of the tests)."""
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    gcs = ray.get_runtime_context().gcs_address
    return {"nodes": nodes, "gcs": [gcs.rsplit(":", 1)[0]]}
