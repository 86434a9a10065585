"""The method end to end through the CLI, on features whose answer is known (tests/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.io.outputs import read_label_png
from tests.synthetic import make_dataset, matched_miou

runner = CliRunner()


def run(*args: str) -> "object":
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_masks(out: Path, keys) -> dict[str, np.ndarray]:
    return {k: read_label_png(out / f"{k}.png") for k in keys}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    gts = make_dataset(root)
    return root, gts


def test_segment_recovers_known_masks(data, tmp_path):
    root, gts = data
    out = tmp_path / "masks"
    r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4,
            "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    preds = read_masks(out, gts)
    for k, gt in gts.items():
        assert preds[k].shape == gt.shape
        assert preds[k].max() <= 3
    assert matched_miou(preds, gts, 4) > 0.95


def test_crf_off_and_on_agree_on_clean_data(data, tmp_path):
    root, gts = data
    for flag in ("--crf", "--no-crf"):
        out = tmp_path / flag
        r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4,
                "--assign", "pooled", flag, "--cache", tmp_path / "cache", "--quiet")
        assert r.exit_code == 0, r.output
        assert matched_miou(read_masks(out, gts), gts, 4) > 0.95


def test_fit_then_predict_equals_transductive_segment(data, tmp_path):
    root, gts = data
    common = ["--features", root / "features", "--k", 4, "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet"]
    r = run("cluster-dataset", root / "images", "--out", tmp_path / "m.segcli", "--masks", tmp_path / "fit", *common)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.segcli").stat().st_size < 200_000
    r = run("segment", root / "images", "--model", tmp_path / "m.segcli", "--out", tmp_path / "pred",
            "--features", root / "features", "--cache", tmp_path / "cache2", "--quiet")
    assert r.exit_code == 0, r.output
    r = run("segment", root / "images", "--out", tmp_path / "trans", *common)
    assert r.exit_code == 0, r.output
    for k in gts:
        a = (tmp_path / "fit" / f"{k}.png").read_bytes()
        assert a == (tmp_path / "pred" / f"{k}.png").read_bytes()
        assert a == (tmp_path / "trans" / f"{k}.png").read_bytes()


def test_part_merging_recovers_classes(tmp_path):
    root = tmp_path / "parts"
    gts = make_dataset(root, n_images=15, parts=True, seed=3)
    out = tmp_path / "masks"
    r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4,
            "--assign", "parts", "--parts", 6, "--cache", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    assert matched_miou(read_masks(out, gts), gts, 4) > 0.95


def test_same_seed_same_bytes(data, tmp_path):
    root, gts = data
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4,
                "--assign", "pooled", "--seed", 7, "--cache", tmp_path / f"cache{i}", "--quiet")
        assert r.exit_code == 0, r.output
        outs.append({k: (out / f"{k}.png").read_bytes() for k in gts})
    assert outs[0] == outs[1]


def test_model_refuses_other_features(data, tmp_path):
    root, _ = data
    r = run("cluster-dataset", root / "images", "--features", root / "features", "--out", tmp_path / "m.segcli",
            "--k", 4, "--assign", "pooled", "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output
    other = tmp_path / "other"
    make_dataset(other, dim=16)
    r = runner.invoke(app, ["segment", str(other / "images"), "--model", str(tmp_path / "m.segcli"), "--features",
                            str(other / "features"), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    assert r.exit_code == 5


@pytest.mark.parametrize("extra", [
    ["--class-method", "spectral"],
    ["--fusion", "all"],
    ["--fusion", "any"],
    ["--categories", "2"],
    ["--regions", "whole", "--min-region", "0.05"],
    ["--refine", "densecrf", "--crf-max-side", "0", "--work-max-side", "96"],
    ["--refine", "densecrf"],
    ["--refine", "none"],
])
def test_method_options_still_recover_masks(data, tmp_path, extra):
    root, gts = data
    out = tmp_path / "masks"
    r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4,
            "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet", *extra)
    assert r.exit_code == 0, r.output
    preds = read_masks(out, gts)
    # --regions whole gives one class per image: the two-object images lose one object.
    assert matched_miou(preds, gts, 4) > (0.7 if "whole" in extra else 0.95)


def test_no_resume_rewrites_and_resume_keeps(data, tmp_path):
    root, gts = data
    args = ["segment", root / "images", "--features", root / "features", "--out", tmp_path / "o", "--k", 4,
            "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet"]
    assert run(*args).exit_code == 0
    first = {k: (tmp_path / "o" / f"{k}.png").stat().st_mtime_ns for k in gts}
    r = run(*args)
    assert r.exit_code == 0 and f"{len(gts)} kept" in r.output
    assert first == {k: (tmp_path / "o" / f"{k}.png").stat().st_mtime_ns for k in gts}
    r = run(*args, "--no-resume")
    assert r.exit_code == 0 and "0 kept" in r.output
    assert all((tmp_path / "o" / f"{k}.png").stat().st_mtime_ns != first[k] for k in gts)
