"""Reliability round 2 (issue 13): inputs are never written, damaged files are never trusted, bad options and
bad feature files end in a clear line. Every test builds its own bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.corrupt import MODES, damage, npz_arrays, write_npz
from tests.synthetic import make_dataset
from tests.cli_helpers import cli, pngs

FEATURE_ARGS = ["--k", 4, "--assign", "pooled", "--quiet"]


def err_lines(result) -> list[str]:
    return [ln for ln in result.stderr.strip().splitlines() if ln.strip()]


def one_line(result, prefix: str = "segcli: error: ") -> str:
    lines = err_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    make_dataset(root, n_images=8)
    return root


# ------------------------------------------------------------------ 1. inputs are never written
def _overlap_cases(root: Path, tmp: Path) -> dict[str, list]:
    imgs, feats = root / "images", root / "features"
    return {
        "out is the input": ["segment", imgs, "--out", imgs],
        "out inside the input": ["segment", imgs, "--out", imgs / "masks"],
        "out contains the input": ["segment", imgs, "--out", root],
        "overlay is the input": ["segment", imgs, "--out", tmp / "o", "--overlay", imgs / "set0"],
        "cache inside the input": ["segment", imgs, "--out", tmp / "o", "--cache", imgs / "cache"],
        "cache in the features folder": ["segment", imgs, "--out", tmp / "o", "--cache", feats],
        "out in the features folder": ["segment", imgs, "--out", feats / "masks"],
        "masks is the input": ["cluster-dataset", imgs, "--masks", imgs],
        "model file over an input image": ["cluster-dataset", imgs, "--out", imgs / "set0" / "img000.png"],
        "model file in the input": ["cluster-dataset", imgs, "--out", imgs / "model.segcli"],
    }


@pytest.mark.parametrize("case", list(_overlap_cases(Path("r"), Path("t"))))
def test_outputs_overlapping_inputs_are_refused(data, tmp_path, case):
    args = _overlap_cases(data, tmp_path)[case]
    before = tree_digest(data)
    extra = ["--features", data / "features", *FEATURE_ARGS]
    if "--cache" not in args:
        extra += ["--cache", tmp_path / "c"]
    r = cli(*args, *extra)
    assert r.exit_code == 2, r.output
    assert "never writes among its inputs" in one_line(r)
    assert tree_digest(data) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_symlinked_output_and_list_inputs_are_refused(data, tmp_path):
    before = tree_digest(data)
    link = tmp_path / "link"
    os.symlink(data / "images" / "set1", link)
    r = cli("segment", data / "images", "--out", link, "--features", data / "features", "--cache", tmp_path / "c", *FEATURE_ARGS)
    assert r.exit_code == 2 and "never writes" in one_line(r)
    # A list file's images live elsewhere: an output folder holding one of them is refused too.
    lst = tmp_path / "list.txt"
    lst.write_text(f"{data / 'images' / 'set0' / 'img000.png'}\n")
    r = cli("segment", lst, "--out", data / "images" / "set0", "--features", data / "features", "--cache", tmp_path / "c", *FEATURE_ARGS)
    assert r.exit_code == 2 and "holds the input" in one_line(r)
    assert tree_digest(data) == before


def test_output_next_to_the_input_is_fine(data, tmp_path):
    images = tmp_path / "work" / "images"
    shutil.copytree(data / "images", images)
    r = cli("segment", images, "--out", tmp_path / "work" / "masks", "--features", data / "features",
            "--cache", tmp_path / "work" / ".cache", *FEATURE_ARGS)
    assert r.exit_code == 0, r.output
    assert len(pngs(tmp_path / "work" / "masks")) == 8


# ------------------------------------------------------------------ 2. every cache entry is verified
def _region_entries(cache: Path) -> list[Path]:
    return sorted((cache / "regions").rglob("*.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_damaged_region_entries_are_recomputed(data, tmp_path, mode):
    args = ["segment", data / "images", "--features", data / "features", *FEATURE_ARGS, "--cache", tmp_path / "c"]
    r = cli(*args, "--out", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    entries = _region_entries(tmp_path / "c")
    assert len(entries) == 8
    damage(entries[:2], mode)
    r = cli(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in err_lines(r) if ln.startswith("segcli: warning: damaged cache entry")]
    assert len(warnings) == 2, r.stderr
    assert "Traceback" not in r.output
    assert pngs(tmp_path / "o") == pngs(tmp_path / "ref")
    # Replaced: a third run reads them without a warning.
    r = cli(*args, "--out", tmp_path / "o2")
    assert r.exit_code == 0 and "warning" not in r.stderr
    assert pngs(tmp_path / "o2") == pngs(tmp_path / "ref")


def test_valid_looking_entry_with_other_shapes_is_not_used(data, tmp_path):
    """An entry whose digest is right for its key but whose arrays do not fit the run is still refused."""
    from segcli.io.cache import DIGEST_ARRAY, entry_digest

    args = ["segment", data / "images", "--features", data / "features", *FEATURE_ARGS, "--cache", tmp_path / "c"]
    assert cli(*args, "--out", tmp_path / "ref").exit_code == 0
    entry = _region_entries(tmp_path / "c")[0]
    arrays = npz_arrays(entry)
    del arrays[DIGEST_ARRAY]
    arrays["fg_grid"] = arrays["fg_grid"].astype(np.uint8)  # wrong dtype
    arrays["n"] = np.array(int(arrays["n"]) + 5, np.int64)  # inconsistent with the embeddings
    key = "/".join(entry.relative_to(tmp_path / "c").with_suffix("").parts)
    key = key.rsplit("/", 2)[0] + "/" + entry.stem
    arrays[DIGEST_ARRAY] = entry_digest(key, arrays)
    write_npz(entry, arrays, compressed=True)
    r = cli(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "damaged cache entry" in r.stderr and "fg_grid" in r.stderr
    assert pngs(tmp_path / "o") == pngs(tmp_path / "ref")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from tests.test_cli_backbone import scene

    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    for i in range(4):
        scene(48 + 8 * i, 40, seed=i).save(root / "images" / f"s{i}.png")
    return root


BACKBONE_FAST = ["--short-side", 32, "--max-side", 64, "--crf-max-side", 32, "--work-max-side", 96, "--device", "cpu",
                 "--fusion", "any", "--regions", "whole", "--k", 3, "--assign", "pooled", "--quiet"]


@pytest.mark.parametrize("mode", MODES)
def test_damaged_feature_entries_are_recomputed(scenes, tmp_path, mode):
    from tests.checkpoints import SMALL, checkpoint_file

    args = ["segment", scenes / "images", "--weights", checkpoint_file(SMALL, "timm", 0), *BACKBONE_FAST,
            "--cache", tmp_path / "c"]
    r = cli(*args, "--out", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    entries = sorted((tmp_path / "c" / "features").rglob("*.npz"))
    assert len(entries) == 4
    damage(entries[:2], mode)
    shutil.rmtree(tmp_path / "c" / "regions")  # so that every feature entry is read again
    r = cli(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in err_lines(r) if ln.startswith("segcli: warning: damaged cache entry")]
    assert len(warnings) == 2, r.stderr
    assert pngs(tmp_path / "o") == pngs(tmp_path / "ref")
    assert all(e.is_file() for e in entries)


# ------------------------------------------------------------------ 3. model files are validated as a whole
@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    r = cli("cluster-dataset", data / "images", "--features", data / "features", *FEATURE_ARGS, "--cache", tmp / "c",
            "--out", tmp / "m.segcli")
    assert r.exit_code == 0, r.output
    return tmp / "m.segcli"


def _rewrite_model(src: Path, dst: Path, arrays=None, meta=None) -> Path:
    from safetensors.numpy import load, save

    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8:8 + n])["__metadata__"]
    tensors = load(raw)
    for k, v in (arrays or {}).items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v(tensors[k]) if callable(v) else v
    for k, v in (meta or {}).items():
        metadata[k] = v(metadata[k]) if callable(v) else v
    dst.write_bytes(save(tensors, metadata=metadata))
    return dst


def _config_with(**changes):
    def edit(text: str) -> str:
        cfg = json.loads(text)
        cfg.update(changes)
        return json.dumps(cfg)
    return edit


MODEL_DAMAGE = {
    "centroids of another dimension": ({"dataset_centroids": lambda a: a[:, :-1].copy()}, None, "dataset_centroids"),
    "centroids of another dtype": ({"class_centroids": lambda a: a.astype(np.float64)}, None, "class_centroids"),
    "a missing array": ({"category_level_foreground": None}, None, "missing"),
    "NaN in centroids": ({"category_centroids": lambda a: np.where(a == a, np.nan, a).astype(np.float32)}, None, "NaN"),
    "foreground flags not 0/1": ({"dataset_foreground": lambda a: (a + 7).astype(np.uint8)}, None, "dataset_foreground"),
    "too many classes for k": (None, {"config": _config_with(k=2, categories=3)}, "class centroids"),
    "other dataset k": (None, {"config": _config_with(dataset_k=3)}, "dataset_centroids"),
    "bad format version": (None, {"format_version": "one"}, "format version"),
    "format version 0": (None, {"format_version": "0"}, "format version"),
    "feature dim disagrees": (None, {"feature_dim": "7"}, "D=7"),
    "bad configuration": (None, {"config": _config_with(k=-4)}, "configuration"),
    "configuration not json": (None, {"config": "{"}, "configuration"),
}


@pytest.mark.parametrize("case", list(MODEL_DAMAGE))
def test_damaged_model_files_are_exit_5(data, model, tmp_path, case):
    arrays, meta, fragment = MODEL_DAMAGE[case]
    bad = _rewrite_model(model, tmp_path / "bad.segcli", arrays, meta)
    r = cli("segment", data / "images", "--model", bad, "--out", tmp_path / "o", "--features", data / "features",
            "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 5, r.output
    assert fragment in one_line(r)


def test_intact_model_round_trips_through_the_validation(data, model, tmp_path):
    same = _rewrite_model(model, tmp_path / "same.segcli")
    r = cli("segment", data / "images", "--model", same, "--out", tmp_path / "o", "--features", data / "features",
            "--cache", tmp_path / "c", "--quiet")
    assert r.exit_code == 0, r.output


def test_expected_arrays_cover_every_saved_array(model):
    from segcli.method.model import SegModel, expected_arrays

    m = SegModel.load(model)
    specs, dims = expected_arrays(m.config, m.feature_dim)
    assert set(specs) == set(m.tensors()) and dims == {"D": m.feature_dim}


# ------------------------------------------------------------------ 4. non-finite weights and features
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_exit_5(scenes, tmp_path, value):
    import torch

    from tests.checkpoints import SMALL, random_state_dict

    sd = random_state_dict(SMALL, 0)
    sd["blocks.3.attn.qkv.weight"] = sd["blocks.3.attn.qkv.weight"].clone()  # the helper's tensors are shared
    sd["blocks.3.attn.qkv.weight"][0, 0] = value
    torch.save(sd, tmp_path / "w.pth")
    r = cli("segment", scenes / "images", "--weights", tmp_path / "w.pth", *BACKBONE_FAST, "--cache", tmp_path / "c",
            "--out", tmp_path / "o")
    assert r.exit_code == 5, r.output
    line = one_line(r)
    assert "NaN or infinite" in line and "blocks.3.attn.qkv.weight" in line


# ------------------------------------------------------------------ 5. bring-your-own features
def _bad_feature_files(feats: Path) -> dict[str, dict[str, np.ndarray]]:
    good = npz_arrays(feats / "set0" / "img000.npz")
    h, w, d = good["feats"].shape
    return {
        "set0/img002": {**good, "feats": np.ones((h, w, d + 3), np.float16) / np.sqrt(d + 3)},  # other D
        "set1/img003": {**good, "cls": np.ones(d + 1, np.float32)},  # other C
        "set0/img004": {**good, "feats": np.zeros((0, w, d), np.float16), "attn": np.zeros((0, w), np.float16)},
        "set1/img005": {**good, "feats": np.zeros((h, w, 0), np.float16)},  # D = 0
        "set0/img006": {**good, "attn": np.full((h, w), "x")},  # text
        "set1/img007": {**good, "feats": good["feats"].astype(bool)},  # booleans
        "set1/img001": {**good, "cls": good["cls"] * np.inf},  # non-finite CLS
    }


def test_bad_feature_files_are_skipped_and_reported(data, tmp_path):
    feats = tmp_path / "features"
    shutil.copytree(data / "features", feats)
    bad = _bad_feature_files(feats)
    for key, arrays in bad.items():
        write_npz(feats / f"{key}.npz", arrays)
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--features", feats, "--cache", tmp_path / "c", *FEATURE_ARGS)
    assert r.exit_code == 4, r.output
    skipped = [ln for ln in err_lines(r) if ln.startswith("skipped")]
    assert len(skipped) == len(bad), r.stderr
    for key in bad:
        assert sum(key in ln for ln in skipped) == 1, key
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert sorted(pngs(tmp_path / "o")) == ["set0/img000.png"]


def test_float64_features_that_overflow_float16_are_skipped(data, tmp_path):
    feats = tmp_path / "features"
    shutil.copytree(data / "features", feats)
    arrays = npz_arrays(feats / "set1" / "img001.npz")
    arrays["feats"] = arrays["feats"].astype(np.float64) * 1e6
    write_npz(feats / "set1" / "img001.npz", arrays)
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--features", feats, "--cache", tmp_path / "c", *FEATURE_ARGS)
    assert r.exit_code == 4, r.output
    assert "overflow float16" in r.stderr
    assert len(pngs(tmp_path / "o")) == 7


# ------------------------------------------------------------------ 6. every option is validated up front
BAD_OPTIONS = [
    ["--seed", "-1"], ["--seed", str(2**31)], ["--threads", "0"], ["--threads", "-2"], ["--batch-size", "0"],
    ["--k", "257"], ["--min-region-px", "-1"], ["--short-side", "4"], ["--short-side", "512", "--max-side", "256"],
    ["--work-max-side", "8"], ["--crf-max-side", "5"], ["--min-region", "1.5"], ["--min-region", "-0.1"],
    ["--parts", "1"], ["--categories", "0"], ["--max-samples", "10"], ["--precision", "fp8"], ["--fusion", "most"],
    ["--device", "gpu"], ["--assign", "nearest"], ["--regions", "boxes"], ["--class-method", "dbscan"], ["--feature", "logits"],
]


@pytest.mark.parametrize("opt", BAD_OPTIONS, ids=[" ".join(o) for o in BAD_OPTIONS])
def test_bad_option_values_are_exit_2_before_any_work(data, tmp_path, opt):
    r = cli("segment", data / "images", "--out", tmp_path / "o", "--features", data / "features",
            "--cache", tmp_path / "c", "--assign", "pooled", *opt)
    assert r.exit_code == 2, r.output
    one_line(r)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_k_256_is_the_largest_png_k():
    from segcli.config import MAX_K, SegmentConfig
    from segcli.errors import UsageError

    assert MAX_K == 256 and SegmentConfig(k=256).k == 256
    with pytest.raises(UsageError, match="label PNGs hold ids 0..255"):
        SegmentConfig(k=257)
