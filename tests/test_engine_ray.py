"""``--engine ray`` (README "Running on a cluster (Ray)"): the same masks, model file and cache entries as the local
engine, byte for byte; a worker killed mid-batch is retried; a killed driver resumes; an unreadable image is
reported (exit 4); every Ray process stays on the loopback interface.

One loopback Ray cluster (2 CPUs) serves the whole module; the CLI runs in-process join it. Skipped when Ray is
not installed (the ``ray`` extra).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_helpers import LoopbackCluster, assert_loopback, is_loopback

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytestmark = pytest.mark.slow  # a loopback Ray cluster per module: minutes

from segcli.method.model import SegModel  # noqa: E402
from tests.checkpoints import TINY, checkpoint_file  # noqa: E402
from tests.cli_helpers import cli, ok, pngs  # noqa: E402
from tests.test_cli_backbone import feature_files, scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Realistic token counts for the tiny ViT (see tests/test_schedule.py): 224x336, 336x224, 224x224 inputs.
SIZES = [(60, 40), (40, 60), (50, 50)]
BASE = ["--k", 3, "--short-side", 224, "--max-side", 448, "--crf-max-side", 64, "--device", "cpu", "--precision", "fp32",
        "--quiet"]
FAST = [*BASE, "--fusion", "any", "--regions", "whole"]


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(num_cpus=2)
    try:
        yield c.ray
    finally:
        c.stop()


def make_images(folder: Path, n: int, seed: int = 500, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene(*SIZES[i % 3], seed=seed + i).save(folder / f"s{i:02d}.png")
    if bad:
        (folder / "s02b.png").write_bytes(b"not an image")  # sorted among the others
    return folder


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every cache entry (features and region bundles) by relative path, as bytes."""
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*.npz"))}


def weights() -> list:
    return ["--weights", checkpoint_file(TINY, "timm")]


def test_ray_engine_writes_what_the_local_engine_writes(cluster, tmp_path):
    """Item 3 (and 4's unreadable image): masks, model file and cache entries are byte-identical; the unreadable
    image is reported and gives exit 4 on both engines; a ray run then reuses the local run's cache."""
    images = make_images(tmp_path / "images", 7)
    runs = {}
    for engine in ("local", "ray"):
        r = ok(cli("cluster-dataset", images, "--out", tmp_path / f"{engine}.segcli", "--masks", tmp_path / engine,
                   "--overlay", tmp_path / f"overlay-{engine}", "--cache", tmp_path / f"cache-{engine}",
                   "--engine", engine, *weights(), *FAST), 4)
        assert "s02b.png" in r.output and "skipped" in r.output and "Traceback" not in r.output
        overlays = {p.name: p.read_bytes() for p in sorted((tmp_path / f"overlay-{engine}").glob("*.jpg"))}
        runs[engine] = (pngs(tmp_path / engine), (tmp_path / f"{engine}.segcli").read_bytes(),
                        cache_files(tmp_path / f"cache-{engine}"), overlays)
    masks, model, cache, overlays = runs["ray"]
    assert len(masks) == 7 and masks == runs["local"][0]
    assert model == runs["local"][1], "the model files differ"
    assert cache.keys() == runs["local"][2].keys() and cache == runs["local"][2]
    assert len(overlays) == 7 and overlays == runs["local"][3]
    assert len(SegModel.load(tmp_path / "ray.segcli").class_centroids) == 2

    # segment --model on the local engine's cache: nothing is computed again, the masks are the same.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache-local").rglob("*.npz")}
    ok(cli("segment", images, "--model", tmp_path / "ray.segcli", "--out", tmp_path / "again", "--engine", "ray",
           "--cache", tmp_path / "cache-local", "--workers", 1, "--cpus-per-worker", 0.5, *weights(), *FAST), 4)
    assert pngs(tmp_path / "again") == masks
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache-local").rglob("*.npz")} == before
    assert_loopback(cluster)


def test_parts_and_stuff_on_ray_match_local(cluster, tmp_path):
    """The other per-image finishers: fit samples of foreground/background patches (--assign parts, --stuff), the
    part graph, and labels that need features."""
    images = make_images(tmp_path / "images", 5, seed=700, bad=False)
    out = {}
    for engine in ("local", "ray"):
        ok(cli("segment", images, "--out", tmp_path / engine, "--cache", tmp_path / f"cache-{engine}",
               "--engine", engine, "--assign", "parts", "--parts", 6, "--stuff", 1, *weights(), *BASE))
        out[engine] = pngs(tmp_path / engine), cache_files(tmp_path / f"cache-{engine}")
    assert len(out["ray"][0]) == 5
    assert out["ray"] == out["local"]


def _dying_actor(marker: Path):
    """A FeatureActor that kills its own process on its first batch while ``marker`` exists (removed first, so
    the restarted actor runs the batch again)."""
    from segcli.engines.ray import FeatureActor

    def call(self, batch):
        if os.path.exists(marker):
            os.remove(marker)
            os._exit(1)
        return FeatureActor.__call__(self, batch)

    return type("DyingFeatureActor", (FeatureActor,), {"__call__": call})


def _dying_task(marker: Path):
    from segcli.engines.ray import finish_task

    def task(batch, spec):
        if os.path.exists(marker):
            os.remove(marker)
            os._exit(1)
        return finish_task(batch, spec)

    return staticmethod(task)


def test_a_worker_killed_mid_batch_is_retried(cluster, tmp_path):
    """Item 4: a backbone actor and a per-image task each die in the middle of a batch (their process exits);
    Ray restarts them, the batches run again, and the output is complete and equal to the local engine's."""
    from segcli.config import SegmentConfig
    from segcli.ray_segmenter import RaySegmenter
    from segcli.engines.ray_cluster import RayOptions
    from segcli.io.images import discover_images
    from segcli.pipeline import Segmenter

    images = make_images(tmp_path / "images", 6, seed=900, bad=False)
    items = discover_images(images)
    actor_marker, task_marker = tmp_path / "kill-actor", tmp_path / "kill-task"
    actor_marker.touch()
    task_marker.touch()
    Dying = type("Dying", (RaySegmenter,), {"feature_actor": _dying_actor(actor_marker),
                                            "finish_task": _dying_task(task_marker)})
    config = SegmentConfig(backbone=TINY, k=3, short_side=224, max_side=448, crf_max_side=64, fusion="any",
                           regions="whole")
    common = dict(weights=checkpoint_file(TINY, "timm"), device="cpu", precision="fp32")
    seg = Dying(config, ray_options=RayOptions(), cache_dir=tmp_path / "cache", **common).fit(items)
    summary = seg.predict(items, tmp_path / "ray")
    assert not actor_marker.exists() and not task_marker.exists(), "the workers were not killed"
    assert summary.written == 6 and not summary.skipped
    assert len(feature_files(tmp_path / "cache")) == 6
    local = Segmenter(config, cache_dir=tmp_path / "cache-local", **common).fit(items)
    local.predict(items, tmp_path / "local")
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "local")
    assert seg.model_.to_bytes() == local.model_.to_bytes()


def test_killed_driver_resumes(tmp_path):
    """Item 4: ``segcli segment --engine ray`` (its own local cluster) killed with SIGKILL mid-run leaves every
    finished cache entry; the same command then finishes without recomputing them, and stops its cluster."""
    images = make_images(tmp_path / "images", 12, seed=1100, bad=False)
    cache, out = tmp_path / "cache", tmp_path / "masks"
    args = [sys.executable, "-m", "segcli", "segment", images, "--out", out, "--cache", cache, "--engine", "ray",
            *weights(), *FAST]
    args = [str(a) for a in args]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        t0 = time.time()
        while len(feature_files(cache)) < 3:
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed: " + proc.stderr.read().decode())
            if time.time() - t0 > 240:
                pytest.fail("no feature files appeared")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait(timeout=60)
        proc.stderr.close()
    _wait_gone(proc.pid)
    before = {p: p.stat().st_mtime_ns for p in feature_files(cache)}
    assert before
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr
    assert len(pngs(out)) == 12 and len(feature_files(cache)) == 12
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "finished features were computed again"


def _wait_gone(pgid: int, timeout: float = 30) -> None:
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the killed run are still running: {left}")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_private_cluster_is_loopback_and_stopped(tmp_path):
    """Item 6 for the engine's own cluster (no --address): every address Ray reports, writes in its logs or
    listens on is loopback, and no Ray process outlives the session."""
    code = """
import json, sys
from segcli.engines.ray_cluster import RayOptions, ray_session
from tests.ray_helpers import cluster_pids, listening_addresses, log_addresses
with ray_session(RayOptions(num_cpus=1)) as ray:
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    from segcli.engines.ray_cluster import cluster_addresses
    pids = cluster_pids()
    session = ray._private.worker._global_node.get_session_dir_path()
    print(json.dumps({"addresses": cluster_addresses(ray), "listening": sorted(a for a, _ in listening_addresses(pids)),
                      "logs": sorted(log_addresses(session)), "pids": sorted(pids)}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    for address in seen["addresses"]["nodes"] + seen["addresses"]["gcs"] + seen["listening"]:
        assert is_loopback(address), seen
    assert all(is_loopback(a) or a == "0.0.0.0" for a in seen["logs"]), seen["logs"]
    assert len(seen["listening"]) >= 2  # GCS and raylet at least: the check saw the cluster
    import psutil

    time.sleep(1)
    alive = [pid for pid in seen["pids"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"Ray processes left running: {alive}"


def test_engine_options_need_engine_ray():
    for extra in (["--address", "auto"], ["--gpus-per-worker", 1], ["--cpus-per-worker", 2]):  # --workers: both engines
        r = cli("segment", ROOT / "examples", "--out", "/nonexistent/x", *extra)
        assert r.exit_code == 2 and "only apply with --engine ray" in r.output, r.output
    r = cli("segment", ROOT / "examples", "--out", "/nonexistent/x", "--engine", "spark")
    assert r.exit_code == 2 and "unknown --engine" in r.output


def test_worker_errors_are_one_line(cluster, tmp_path):
    """A segcli error raised in an actor (a device it cannot use) ends the run with its own one-line message and
    exit code, as on the local engine; an --address where nothing answers fails at once (exit 3)."""
    import torch

    images = make_images(tmp_path / "images", 2, bad=False)
    if not torch.cuda.is_available():
        r = cli("segment", images, "--out", tmp_path / "m", "--cache", tmp_path / "c", "--engine", "ray",
                *weights(), *FAST, "--device", "cuda", "--gpus-per-worker", 0)  # the last --device counts
        assert r.exit_code == 2 and "CUDA is not available" in r.output and "Traceback" not in r.output, r.output
    r = cli("segment", images, "--out", tmp_path / "m", "--engine", "ray", "--address", "127.0.0.1:1", *weights())
    assert r.exit_code == 3 and "nothing answers at 127.0.0.1:1" in r.output, r.output


def test_workers_with_engine_ray_counts_backbone_actors():
    r = cli("segment", ROOT / "examples", "--out", "/nonexistent/x", "--engine", "ray", "--workers", 0)
    assert r.exit_code == 2 and "--workers with --engine ray" in r.output, r.output


def test_resource_requests_that_cannot_be_placed_fail_at_once(cluster, tmp_path):
    """Issue 20 item 1: a backbone worker bigger than any node (64 CPUs or 1 GPU on a 2-CPU, GPU-less cluster), or
    a pool bigger than the cluster, is refused at once with one line (exit 2) instead of Ray waiting forever."""
    images = make_images(tmp_path / "images", 2, bad=False)
    cases = [(["--cpus-per-worker", 64], "--cpus-per-worker 64"), (["--workers", 3, "--cpus-per-worker", 1], "--workers 3")]
    if not cluster.cluster_resources().get("GPU"):
        cases.append((["--gpus-per-worker", 1], "--gpus-per-worker 1"))
    for extra, fragment in cases:
        t0 = time.time()
        r = cli("segment", images, "--out", tmp_path / "m", "--cache", tmp_path / "c", "--engine", "ray",
                *weights(), *FAST, *extra)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and fragment in lines[0] and "wait forever" in lines[0], r.output
        assert time.time() - t0 < 60
        assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sigterm_to_a_ray_driver_is_one_line(tmp_path, sig):
    """Issue 20 item 11: SIGTERM to ``segcli --engine ray`` (its own cluster) ends it with exit 130 and one line,
    not Ray's native stack dump; its cluster does not outlive it. After ``kill -9`` of the driver alone, its
    cluster's processes (GCS, raylet, agents, workers) are gone within seconds (they stayed up to 2 minutes)."""
    import psutil

    from tests.processes import segcli_process

    images = make_images(tmp_path / "images", 12, seed=1300, bad=False)
    cache = tmp_path / "cache"
    with segcli_process(["segment", images, "--out", tmp_path / "masks", "--cache", cache, "--engine", "ray",
                         *weights(), *FAST]) as proc:
        t0 = time.time()
        while not feature_files(cache):
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be interrupted: " + proc.stderr.read().decode())
            if time.time() - t0 > 240:
                pytest.fail("no feature files appeared")
            time.sleep(0.05)
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        err = proc.stderr.read().decode()
        t0 = time.time()
        while True:  # checked before segcli_process kills what is left of the group
            alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            if not alive:
                break
            assert time.time() - t0 < 20, f"Ray processes outlived the driver: {alive}"
            time.sleep(0.5)
    if sig == signal.SIGTERM:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err
