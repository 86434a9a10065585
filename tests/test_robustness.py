"""Bad input, interruptions, repeatability and safety of whole runs (issue: nothing lost, one-line errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segcli.io.outputs import is_complete_png
from tests.synthetic import make_dataset
from tests.cli_helpers import cli


def one_line_error(result) -> str:
    """The stderr of a failed run must be exactly one 'segcli: error:' line, no traceback."""
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("segcli: error: "), err
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    make_dataset(root, n_images=12)
    return root


def base_args(root: Path, tmp: Path) -> list:
    return ["--features", root / "features", "--k", 4, "--assign", "pooled", "--cache", tmp / "cache", "--quiet"]


# ------------------------------------------------------------------ command errors
def test_missing_input_folder(tmp_path):
    r = cli("segment", tmp_path / "nope", "--out", tmp_path / "o", "--features", tmp_path)
    assert r.exit_code == 3
    assert "not found" in one_line_error(r)


def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("segment", tmp_path / "empty", "--out", tmp_path / "o", "--features", tmp_path)
    assert r.exit_code == 3
    assert "no images" in one_line_error(r)


def test_output_is_a_file(data, tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli("segment", data / "images", "--out", tmp_path / "file", *base_args(data, tmp_path))
    assert r.exit_code == 3
    one_line_error(r)


@pytest.mark.parametrize("k", ["1", "0", "-3"])
def test_k_below_two(data, tmp_path, k):
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--features", data / "features", "--k", k)
    assert r.exit_code == 2
    assert "--k" in one_line_error(r)


def test_unknown_backbone(data, tmp_path):
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--backbone", "not_a_model_xyz")
    assert r.exit_code == 5
    one_line_error(r)


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", b"PK\x03\x04truncated zip"])
def test_corrupt_weights(data, tmp_path, content):
    w = tmp_path / "w.pth"
    w.write_bytes(content)
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--weights", w, "--cache", tmp_path / "c")
    assert r.exit_code == 5
    one_line_error(r)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"just text"])
def test_corrupt_model_file(data, tmp_path, content):
    m = tmp_path / "m.segcli"
    m.write_bytes(content)
    r = cli("segment", data / "images", "--model", m, "--out", tmp_path / "o", "--features", data / "features")
    assert r.exit_code == 5
    one_line_error(r)


def test_truncated_model_file(data, tmp_path):
    r = cli("cluster-dataset", data / "images", "--out", tmp_path / "m.segcli", *base_args(data, tmp_path))
    assert r.exit_code == 0, r.output
    raw = (tmp_path / "m.segcli").read_bytes()
    (tmp_path / "m.segcli").write_bytes(raw[: len(raw) // 2])
    r = cli("segment", data / "images", "--model", tmp_path / "m.segcli", "--out", tmp_path / "o", "--features", data / "features")
    assert r.exit_code == 5
    one_line_error(r)


def test_bad_shard_and_missing_out(data, tmp_path):
    r = cli("cluster-dataset", data / "images", "--shard", "5/2", *base_args(data, tmp_path))
    assert r.exit_code == 2
    one_line_error(r)
    r = cli("cluster-dataset", data / "images", *base_args(data, tmp_path))
    assert r.exit_code == 2
    one_line_error(r)


def test_debug_shows_traceback(tmp_path):
    r = cli("--debug", "segment", tmp_path / "nope", "--out", tmp_path / "o", "--features", tmp_path)
    assert r.exit_code != 0
    assert r.exception is not None and not isinstance(r.exception, SystemExit)


# ------------------------------------------------------------------ bad images are reported and skipped
def test_bad_images_skipped_and_counted(data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    (images / "zero.png").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    good = (images / "set0" / "img000.png").read_bytes()
    (images / "trunc.png").write_bytes(good[: len(good) // 2])
    feats = tmp_path / "features"
    shutil.copytree(data / "features", feats)
    for stem in ("zero", "text", "trunc"):  # features exist: the images themselves are what is bad
        shutil.copy(feats / "set0" / "img000.npz", feats / f"{stem}.npz")
    (images / "nofeat.png").write_bytes(good)
    r = cli("segment", images, "--out", tmp_path / "o", *base_args(data, tmp_path)[2:], "--features", feats)
    assert r.exit_code == 4, r.output
    for name in ("zero.png", "text.jpg", "trunc.png", "nofeat.png"):
        assert name in r.output
    assert "4 skipped" in r.output
    assert len(list((tmp_path / "o").rglob("*.png"))) == 12


# ------------------------------------------------------------------ safety
def test_output_cannot_escape_through_symlink(data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "set0")
    r = cli("segment", data / "images", "--out", out, *base_args(data, tmp_path))
    assert r.exit_code != 0
    assert not list(outside.iterdir())


def test_list_file_with_parent_paths_stays_inside(data, tmp_path):
    import shutil

    lst = tmp_path / "lists" / "deep" / "l.txt"
    lst.parent.mkdir(parents=True)
    target = data / "images" / "set0" / "img000.png"
    lst.write_text(os.path.relpath(target, lst.parent) + "\n")  # '../../..' climbs out of the list's folder
    feats = tmp_path / "feats"
    feats.mkdir()
    shutil.copy(data / "features" / "set0" / "img000.npz", feats / "img000.npz")
    r = cli("segment", lst, "--out", tmp_path / "o", "--features", feats, "--k", 2, "--assign", "pooled",
            "--cache", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    # The key of a listed file outside the list's folder is its stem: the mask lands inside --out.
    assert [p.relative_to(tmp_path / "o").as_posix() for p in (tmp_path / "o").rglob("*.png")] == ["img000.png"]


# ------------------------------------------------------------------ interruptions
def _spawn(args: list, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segcli", *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, start_new_session=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    make_dataset(root, n_images=60, grid=(16, 20), nested=False)
    return root


def _wait_for_outputs(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if out.is_dir() and len(list(out.glob("*.png"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail("run ended before it could be interrupted: " + proc.stderr.read().decode())
        time.sleep(0.01)
    pytest.fail("no outputs appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_without_redoing(big, tmp_path, sig):
    args = ["segment", big / "images", "--out", tmp_path / "o", "--features", big / "features", "--k", 4,
            "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet"]
    ref = subprocess.run([sys.executable, "-m", "segcli", *[str(a) for a in args[:3]], str(tmp_path / "ref"),
                          *[str(a) for a in args[4:]]], capture_output=True)
    assert ref.returncode == 0, ref.stderr
    proc = _spawn(args)
    _wait_for_outputs(tmp_path / "o", 5, proc)
    t_sig = time.time()
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    if sig == signal.SIGINT:
        assert time.time() - t_sig < 5
        assert proc.returncode == 130
        assert b"interrupted" in proc.stderr.read()
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.png")}
    assert all(is_complete_png(tmp_path / "o" / n) for n in done_before)
    rerun = subprocess.run([sys.executable, "-m", "segcli", *[str(a) for a in args]], capture_output=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} kept".encode() in rerun.stderr or len(done_before) == 0
    for name, mtime in done_before.items():
        assert (tmp_path / "o" / name).stat().st_mtime_ns == mtime, "a finished mask was redone"
    outs = sorted(p.name for p in (tmp_path / "o").glob("*.png"))
    assert outs == sorted(p.name for p in (tmp_path / "ref").glob("*.png"))
    for name in outs:
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_model_file_never_executes_code(data, tmp_path):
    """A pickle disguised as a model file is refused and its payload never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m.segcli").write_bytes(pickle.dumps(Payload()))
    r = cli("segment", data / "images", "--model", tmp_path / "m.segcli", "--out", tmp_path / "o", "--features", data / "features")
    assert r.exit_code == 5
    one_line_error(r)
    assert not marker.exists()


def test_model_round_trip(data, tmp_path):
    from segcli.method.model import SegModel

    r = cli("cluster-dataset", data / "images", "--out", tmp_path / "m.segcli", *base_args(data, tmp_path))
    assert r.exit_code == 0, r.output
    m = SegModel.load(tmp_path / "m.segcli")
    m.save(tmp_path / "m2.segcli")
    m2 = SegModel.load(tmp_path / "m2.segcli")
    assert m.digest() == m2.digest()
    assert m2.config.k == 4 and m2.config.assign == "pooled" and m2.version
    for name, arr in m.tensors().items():
        assert np.array_equal(arr, m2.tensors()[name]), name


def test_only_bad_images_is_an_input_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    (images / "b.png").write_text("no")
    (tmp_path / "feats").mkdir()  # apart from the outputs: a features folder holding --out/--cache is refused
    r = cli("segment", images, "--out", tmp_path / "o", "--features", tmp_path / "feats", "--assign", "pooled",
            "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 3
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("segcli: error: no usable images")
    assert "Traceback" not in r.output
