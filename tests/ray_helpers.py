"""What the Ray engine tests share: one loopback-only Ray cluster per test module, and the checks that fail a
test when any Ray process is reachable from outside the machine.

Every check is strict: the node and GCS addresses Ray reports, every IPv4 address written in the session's logs,
and the listening sockets of every process of the cluster must be loopback (127.0.0.0/8 or ::1).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

# Before ray is imported anywhere in the test process (README "Running on a cluster (Ray)").
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?![\d.])")


def is_loopback(address: str) -> bool:
    host = address.strip().strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def log_addresses(session_dir: Path) -> set[str]:
    """Every IPv4 address written anywhere in a Ray session's folder (logs, node info)."""
    found: set[str] = set()
    for path in Path(session_dir).rglob("*"):
        if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
            try:
                text = path.read_text(errors="ignore")
            except OSError:
                continue
            found.update(m for m in _IPV4.findall(text) if all(int(p) <= 255 for p in m.split(".")))
    return found


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of these processes."""
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def cluster_pids() -> set[int]:
    """This process and every process it started (a local Ray cluster's GCS, raylet, workers)."""
    import psutil

    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def assert_loopback(ray) -> None:
    """Fail unless every address of the connected Ray cluster is loopback."""
    from segcli.engines.ray_cluster import cluster_addresses

    seen = cluster_addresses(ray)
    bad = {k: [a for a in v if not is_loopback(a)] for k, v in seen.items()}
    assert not any(bad.values()), f"Ray uses non-loopback addresses: {bad}"
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    in_logs = {a for a in log_addresses(session) if not is_loopback(a) and a != "0.0.0.0"}
    assert not in_logs, f"Ray's logs under {session} name non-loopback addresses: {sorted(in_logs)}"
    listening = {(a, p) for a, p in listening_addresses(cluster_pids()) if not is_loopback(a)}
    assert not listening, f"Ray processes listen on non-loopback addresses: {sorted(listening)}"


class LoopbackCluster:
    """A local Ray cluster for one test module: 2 CPUs, no dashboard, every process on 127.0.0.1, its session
    files in a private temporary folder; :meth:`stop` shuts it down and removes them."""

    def __init__(self, num_cpus: int = 2) -> None:
        import ray

        self.ray = ray
        # A short path: Ray's Unix sockets live below it (108-byte limit).
        self.tmp = tempfile.mkdtemp(prefix="segray-", dir="/tmp")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=self.tmp, log_to_driver=False, logging_level=logging.WARNING)
        assert_loopback(ray)

    def stop(self) -> None:
        try:
            if self.ray.is_initialized():
                assert_loopback(self.ray)  # again, after the tests' jobs ran
        finally:
            self.ray.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)
