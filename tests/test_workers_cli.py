"""--workers end to end (README "Keeping an accelerator busy"): Ctrl-C stops every worker (exit 130, no orphan),
a worker that dies on one image costs only that image (exit 4), a killed run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.checkpoints import TINY, checkpoint_file
from tests.processes import interrupt, segcli_process, wait_until
from tests.test_cli_backbone import scene

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(60, 40), (40, 60), (50, 50)]

pytestmark = pytest.mark.slow


def make_images(folder: Path, n: int, seed: int = 500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene(*SIZES[i % 3], seed=seed + i).save(folder / f"s{i:02d}.png")
    return folder


def common(cache: Path) -> list[str]:
    return ["--weights", str(checkpoint_file(TINY, "timm")), "--cache", str(cache), "--k", "3", "--short-side", "224",
            "--max-side", "448", "--device", "cpu", "--precision", "fp32", "--quiet"]


def segcli(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], cwd=ROOT, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)


def children(pid: int) -> set[int]:
    """Every descendant process of pid (from /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], seconds: float) -> set[int]:
    t0 = time.time()
    while time.time() - t0 < seconds:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """A model fitted on 6 images (in-process path), and its reference masks of 30 images with --workers 0."""
    tmp = tmp_path_factory.mktemp("fitted")
    images = make_images(tmp / "images", 30)
    model = tmp / "model.segcli"
    fit_images = make_images(tmp / "fit", 6, seed=900)
    r = segcli("cluster-dataset", fit_images, "--out", model, "--workers", "0", *common(tmp / "cache"))
    assert r.returncode == 0, r.stderr.decode()
    r = segcli("segment", images, "--model", model, "--out", tmp / "reference", "--workers", "0", *common(tmp / "cache"))
    assert r.returncode == 0, r.stderr.decode()
    return images, model


def wait_for_masks(proc: subprocess.Popen, out: Path, n: int) -> None:
    wait_until(proc, lambda: len(list(out.glob("*.png"))) >= n, "masks", 300)


def pool_run(fitted, tmp_path: Path) -> tuple[Path, list]:
    """(output folder, arguments) of a `segment --workers 2` run over the 30 images with the fitted model."""
    images, model = fitted
    out = tmp_path / "masks"
    return out, ["segment", images, "--model", model, "--out", out, "--workers", "2", *common(tmp_path / "cache")]


def reference_masks(images: Path) -> dict[str, bytes]:
    """The masks of the --workers 0 reference run, by file name."""
    return {p.name: p.read_bytes() for p in (images.parent / "reference").glob("*.png")}


def test_ctrl_c_stops_every_worker_and_the_run_resumes(fitted, tmp_path):
    out, args = pool_run(fitted, tmp_path)
    with segcli_process(args) as proc:
        wait_for_masks(proc, out, 3)
        kids = children(proc.pid)
        assert len(kids) >= 2, "the workers run in processes of their own"
        code, err, seconds = interrupt(proc)  # SIGINT to the whole process group, as Ctrl-C
    assert seconds < 10
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err  # issue 20: one line, no EBADF trace
    assert wait_gone(kids, 5) == set(), "orphan worker processes"
    # issue 20 item 14: the workers' temporaries of masks being written are swept before the run exits
    assert not [p.name for p in out.rglob("*.tmp")], "an interrupted run left temporaries"
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    rerun = segcli(*args)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert len(list(out.glob("*.png"))) == 30
    assert all(p.stat().st_mtime_ns == m for p, m in before.items()), "finished masks were redone"
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == reference_masks(fitted[0])


def test_a_killed_run_leaves_no_worker_and_resumes(fitted, tmp_path):
    out, args = pool_run(fitted, tmp_path)
    with segcli_process(args) as proc:
        wait_for_masks(proc, out, 3)
        kids = children(proc.pid)
        interrupt(proc, signal.SIGKILL, group=False)  # the main process only: its workers must notice and exit
        assert wait_gone(kids, 10) == set(), "workers outlived their killed main process"
    rerun = segcli(*args)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == reference_masks(fitted[0])


def test_a_worker_that_dies_on_one_image_skips_only_that_image(fitted, tmp_path):
    images, model = fitted
    out = tmp_path / "masks"
    r = segcli("segment", images, "--model", model, "--out", out, "--workers", "2", *common(tmp_path / "cache"),
               env={"SEGCLI_TEST_CRASH_ON": "s07"})
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert "s07" in err and "died" in err and "Traceback" not in err, err
    reference = reference_masks(images)
    del reference["s07.png"]
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == reference
    # the next run (no crash) does the missing image and keeps the others
    r = segcli("segment", images, "--model", model, "--out", out, "--workers", "2", *common(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "s07.png").is_file()
