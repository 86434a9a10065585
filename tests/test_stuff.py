"""--stuff N: stuff classes of the background, on scenes whose answer is known (tests/synthetic.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import segcli.method.crf as crf_mod
from segcli.cli import app
from segcli.config import SegmentConfig
from segcli.method.crf import CRFParams, CRFUnavailableWarning, crf_available, refine_labels, refine_labels_scaled
from segcli.errors import ModelError, UsageError
from segcli.evaluate.presets import PRESETS
from segcli.method.model import SegModel
from segcli.io.outputs import read_label_png
from tests.synthetic import make_dataset, make_scene_dataset, matched_ious

runner = CliRunner()
needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf (pip install pydensecrf2) not installed")
N_STUFF, N_THINGS = 3, 2


def run(*args) -> "object":
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return root, make_scene_dataset(root, n_stuff=N_STUFF, n_things=N_THINGS, noise=0.2)


def segment(root: Path, out: Path, cache: Path, *extra) -> dict[str, np.ndarray]:
    r = run("segment", root / "images", "--features", root / "features", "--out", out, "--k", N_STUFF + N_THINGS,
            "--stuff", N_STUFF, "--assign", "pooled", "--cache", cache, "--quiet", *extra)
    assert r.exit_code == 0, r.output
    return {p.stem: read_label_png(p) for p in out.glob("*.png")}


@needs_crf
def test_stuff_recovers_stuff_classes(scenes, tmp_path):
    root, gts = scenes
    preds = segment(root, tmp_path / "masks", tmp_path / "cache")
    assert set(preds) == set(gts)
    ious = matched_ious(preds, gts, N_STUFF + N_THINGS)
    assert ious[:N_STUFF].mean() > 0.9, ious
    assert ious.mean() > 0.85, ious
    # Id convention: stuff pixels get ids 0..N-1, object pixels N..k-1.
    stuff_gt = np.concatenate([g.ravel() < N_STUFF for g in gts.values()])
    stuff_pred = np.concatenate([preds[k].ravel() < N_STUFF for k in gts])
    assert (stuff_gt == stuff_pred).mean() > 0.95
    assert max(int(p.max()) for p in preds.values()) < N_STUFF + N_THINGS


def test_stuff_without_crf_still_labels_stuff(scenes, tmp_path):
    # Patch-level stuff map (no image refinement): boundaries inside patches are lost, the classes are not.
    root, gts = scenes
    ious = matched_ious(segment(root, tmp_path / "masks", tmp_path / "cache", "--no-crf"), gts, N_STUFF + N_THINGS)
    assert ious[:N_STUFF].mean() > 0.75, ious


def test_stuff_fit_predict_byte_identical_and_resume(scenes, tmp_path):
    root, gts = scenes
    common = ["--features", root / "features", "--k", 5, "--stuff", 3, "--assign", "pooled", "--quiet"]
    r = run("cluster-dataset", root / "images", "--out", tmp_path / "m.segcli", "--masks", tmp_path / "fit",
            "--cache", tmp_path / "c1", *common)
    assert r.exit_code == 0, r.output
    model = SegModel.load(tmp_path / "m.segcli")
    assert model.config.stuff == 3 and model.stuff_centroids.shape == (3, model.feature_dim)
    r = run("segment", root / "images", "--model", tmp_path / "m.segcli", "--out", tmp_path / "pred",
            "--features", root / "features", "--cache", tmp_path / "c2", "--quiet")
    assert r.exit_code == 0, r.output
    r = run("segment", root / "images", "--out", tmp_path / "trans", "--cache", tmp_path / "c3", *common)
    assert r.exit_code == 0, r.output
    for k in gts:
        a = (tmp_path / "fit" / f"{k}.png").read_bytes()
        assert a == (tmp_path / "pred" / f"{k}.png").read_bytes()
        assert a == (tmp_path / "trans" / f"{k}.png").read_bytes()
    # Resume keeps the finished masks of the same model.
    r = run("segment", root / "images", "--model", tmp_path / "m.segcli", "--out", tmp_path / "pred",
            "--features", root / "features", "--cache", tmp_path / "c2", "--quiet")
    assert r.exit_code == 0 and f"{len(gts)} kept" in r.output
    # The model still refuses features of another dimension.
    other = tmp_path / "other"
    make_dataset(other, dim=16)
    r = runner.invoke(app, ["segment", str(other / "images"), "--model", str(tmp_path / "m.segcli"), "--features",
                            str(other / "features"), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c4")])
    assert r.exit_code == 5


def test_stuff_zero_and_one_are_todays_background(tmp_path):
    root = tmp_path / "objects"
    gts = make_dataset(root)
    outs = {}
    for name, extra in (("plain", []), ("zero", ["--stuff", "0"]), ("one", ["--stuff", "1"])):
        r = run("segment", root / "images", "--features", root / "features", "--out", tmp_path / name, "--k", 4,
                "--assign", "pooled", "--cache", tmp_path / "cache", "--quiet", *extra)
        assert r.exit_code == 0, r.output
        outs[name] = {k: (tmp_path / name / f"{k}.png").read_bytes() for k in gts}
    assert outs["plain"] == outs["zero"] == outs["one"]


@pytest.mark.parametrize("k, stuff", [(5, 5), (5, -1), (2, 2)])
def test_bad_stuff_is_a_usage_error(tmp_path, k, stuff):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    r = runner.invoke(app, ["segment", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--k", str(k),
                            "--stuff", str(stuff), "--features", str(tmp_path)])
    assert r.exit_code == 2
    assert "--stuff" in r.output


def test_config_counts_things_and_categories():
    cfg = SegmentConfig(k=27, stuff=15)
    assert (cfg.n_stuff, cfg.thing_offset, cfg.n_things, cfg.n_categories) == (15, 15, 12, 12)
    assert cfg.level_clusters("dataset") == cfg.level_clusters("image") == 27
    plain = SegmentConfig(k=21)
    assert (plain.n_stuff, plain.thing_offset, plain.n_things, plain.n_categories) == (0, 1, 20, 20)
    assert plain.level_clusters("dataset") == 2
    assert SegmentConfig(k=27, stuff=15, categories=5).n_categories == 5
    with pytest.raises(UsageError):
        SegmentConfig(k=4, stuff=4)


def test_presets_say_what_to_use():
    assert PRESETS["cocostuff27"].segment_args == ("--k", "27", "--stuff", "15")
    assert PRESETS["cityscapes27"].segment_args == ("--k", "27", "--stuff", "17")
    assert PRESETS["camvid"].segment_args == ("--k", "11", "--stuff", "8")
    assert PRESETS["voc"].segment_args == ("--k", "21", "--stuff", "0")
    coco = PRESETS["cocostuff27"]
    assert [coco.class_names[i] for i in coco.stuff][:2] == ["ceiling", "floor"] and "person" not in coco.stuff


def _save_with(model: SegModel, path: Path, **changes) -> None:
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in model.tensors().items()}
    meta = model.metadata()
    for k, v in changes.items():
        if v is None:
            tensors.pop(k, None)
        else:
            tensors[k] = v
    path.write_bytes(save(tensors, metadata=meta))


def test_model_file_stuff_checks(scenes, tmp_path):
    root, _ = scenes
    r = run("cluster-dataset", root / "images", "--out", tmp_path / "m.segcli", "--features", root / "features",
            "--k", 5, "--stuff", 3, "--assign", "pooled", "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output
    model = SegModel.load(tmp_path / "m.segcli")
    assert model.metadata()["format_version"] == "2"
    _save_with(model, tmp_path / "bad.segcli", stuff_centroids=np.zeros((2, model.feature_dim), np.float32))
    with pytest.raises(ModelError, match="stuff centroids"):
        SegModel.load(tmp_path / "bad.segcli")
    # A model without stuff is still written as version 1 (older segcli reads it), and one written before
    # stuff classes existed (no stuff_centroids tensor) still loads.
    r = run("cluster-dataset", root / "images", "--out", tmp_path / "plain.segcli", "--features", root / "features",
            "--k", 4, "--assign", "pooled", "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output
    plain = SegModel.load(tmp_path / "plain.segcli")
    assert plain.metadata()["format_version"] == "1"
    _save_with(plain, tmp_path / "old.segcli", stuff_centroids=None)
    assert SegModel.load(tmp_path / "old.segcli").stuff_centroids.size == 0


# ------------------------------------------------------------------ multi-label dense CRF

def three_band_scene(h=90, w=120, seed=0):
    """Three colour bands with a soft, misplaced 3-label guess (like an upsampled patch map)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[37:] = 1
    truth[:, 83:] = 2
    colours = np.array([[120, 170, 230], [110, 110, 110], [60, 140, 50]], np.float64)
    rgb = np.clip(colours[truth] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    guess = np.roll(truth, (6, -7), axis=(0, 1))
    probs = np.stack([ndimage.gaussian_filter((guess == c).astype(float), 6) for c in range(3)])
    probs = 0.1 + 0.7 * probs
    return rgb, probs, truth


@needs_crf
def test_multilabel_crf_follows_the_image():
    rgb, probs, truth = three_band_scene()
    before = (probs.argmax(0) == truth).mean()
    labels = refine_labels(rgb, probs)
    assert labels.shape == truth.shape
    after = (labels == truth).mean()
    assert before < 0.9 and after > 0.97
    scaled = refine_labels_scaled(rgb, probs, CRFParams(), max_side=48)
    assert scaled.shape == truth.shape and (scaled == truth).mean() > 0.95
    # Two labels agree with the foreground CRF on the same unaries.
    fg = probs[1] / probs[:2].sum(0)
    two = refine_labels(rgb, np.stack([1 - fg, fg]))
    assert ((two == 1) == crf_mod.refine_foreground(rgb, fg)).mean() > 0.999


def test_multilabel_crf_without_pydensecrf_is_argmax(monkeypatch):
    rgb, probs, _ = three_band_scene()
    monkeypatch.setattr(crf_mod, "_import_densecrf", lambda: None)
    monkeypatch.setattr(crf_mod, "_warned_missing", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = refine_labels(rgb, probs)
    assert np.array_equal(labels, probs.argmax(0))
    assert any(issubclass(w.category, CRFUnavailableWarning) for w in caught)


def test_multilabel_crf_rejects_bad_shapes():
    rgb, probs, _ = three_band_scene()
    with pytest.raises(ValueError, match="probs"):
        refine_labels(rgb, probs[0])
    with pytest.raises(ValueError, match="probs"):
        refine_labels(rgb[:10], probs)
    assert not refine_labels(rgb, probs[:1]).any()


def test_split_regions_separates_touching_objects_of_different_clusters():
    from segcli.method.regions import split_regions

    regions = np.zeros((40, 60), np.int64)
    regions[10:30, 5:45] = 1  # a "car" (x < 20) touching a "cyclist" (x >= 20): one component
    regions[2:6, 50:58] = 2  # a small separate object
    clusters = np.zeros((4, 6), np.int64)  # 10x10-px patches
    clusters[:, 2:] = 1
    clusters[1, 1] = 2  # a speck of a third cluster: too small to be a region, joins its neighbour
    out, n = split_regions(regions, clusters, min_area=150)
    assert n == 3
    assert len(np.unique(out[20:30, 5:20])) == 1 and len(np.unique(out[10:30, 20:45])) == 1
    assert out[25, 10] != out[25, 30]
    assert set(np.unique(out[10:20, 10:20])) <= {out[25, 10], out[25, 30]}  # the speck joined a neighbour
    assert ((out > 0) == (regions > 0)).all()
    assert len(np.unique(out[2:6, 50:58])) == 1  # smaller than min_area but kept whole: nothing to split
