"""Pairing predictions with ground truth: extensions, sub-folders, VOC layouts and splits, missing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.errors import EXIT_INPUT, EXIT_USAGE, InputError, UsageError
from segcli.evaluate import EvaluationConfig, evaluate
from segcli.evaluate.pairing import pair_files

GT = np.array([[0, 0, 1, 1]], dtype=np.uint8)


def put(path: Path, arr=GT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_pairs_by_relative_path_and_stem_with_any_extension(tmp_path):
    put(tmp_path / "pred" / "a.png")
    put(tmp_path / "pred" / "sub" / "b.bmp")
    put(tmp_path / "pred" / "sub" / "c.tif")
    put(tmp_path / "gt" / "a.bmp")
    put(tmp_path / "gt" / "sub" / "b.png")
    put(tmp_path / "gt" / "sub" / "c.png")
    (tmp_path / "gt" / "notes.txt").write_text("not an image")
    put(tmp_path / "gt" / ".hidden" / "z.png")
    pairing = pair_files(tmp_path / "pred", tmp_path / "gt")
    assert [p.key for p in pairing.pairs] == ["a", "sub/b", "sub/c"]
    assert pairing.pairs[1].pred.suffix == ".bmp" and pairing.pairs[1].gt.suffix == ".png"


def test_missing_and_extra_files_are_an_error_unless_allowed(tmp_path):
    for name in ("a", "b", "c"):
        put(tmp_path / "gt" / f"{name}.png")
    put(tmp_path / "pred" / "a.png")
    put(tmp_path / "pred" / "b.png")
    put(tmp_path / "pred" / "zzz.png")
    with pytest.raises(InputError) as err:
        evaluate(tmp_path / "pred", tmp_path / "gt", EvaluationConfig(num_classes=2, workers=1))
    msg = str(err.value)
    assert "1 ground-truth images have no prediction (c)" in msg
    assert "1 predictions have no ground truth (zzz)" in msg and "--allow-missing" in msg
    assert "\n" not in msg and err.value.exit_code == EXIT_INPUT
    res = evaluate(tmp_path / "pred", tmp_path / "gt", EvaluationConfig(num_classes=2, workers=1, allow_missing=True))
    assert res.num_images == 2 and res.pairing.missing == ["c"] and res.pairing.extra == ["zzz"]
    assert res.pairing.num_gt == 3


def test_no_match_at_all_and_bad_folders(tmp_path):
    put(tmp_path / "gt" / "a.png")
    put(tmp_path / "pred" / "b.png")
    with pytest.raises(InputError, match="no prediction .* matches"):
        pair_files(tmp_path / "pred", tmp_path / "gt", allow_missing=True)
    with pytest.raises(InputError, match="does not exist"):
        pair_files(tmp_path / "nope", tmp_path / "gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prediction images"):
        pair_files(tmp_path / "empty", tmp_path / "gt")


def test_two_files_with_the_same_key_are_refused(tmp_path):
    put(tmp_path / "pred" / "a.png")
    put(tmp_path / "pred" / "a.bmp")
    put(tmp_path / "gt" / "a.png")
    with pytest.raises(InputError, match="two prediction files"):
        pair_files(tmp_path / "pred", tmp_path / "gt")


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for name in ("2007_000001", "2007_000002", "2007_000003", "2007_000004"):
        put(voc / "SegmentationClass" / f"{name}.png")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("2007_000002\n2007_000003\n")
    (sets / "train.txt").write_text("2007_000001\n2007_000004\n")
    return voc


@pytest.mark.parametrize("where", ["root", "devkit", "voc2012", "segclass"])
def test_voc_layout_with_split(tmp_path, where):
    voc = make_voc(tmp_path / "data")
    gt = {"root": tmp_path / "data", "devkit": voc.parent, "voc2012": voc, "segclass": voc / "SegmentationClass"}[where]
    for name in ("2007_000001", "2007_000002", "2007_000003"):  # 000001 is a train image: outside the split
        put(tmp_path / "pred" / f"{name}.png")
    pairing = pair_files(tmp_path / "pred", gt, split="val")
    assert pairing.layout == "voc" and [p.key for p in pairing.pairs] == ["2007_000002", "2007_000003"]
    assert pairing.outside_split == 1 and not pairing.extra and not pairing.missing
    with pytest.raises(InputError, match="--split val"):  # without a split, all 4 masks are expected
        pair_files(tmp_path / "pred", gt)
    with pytest.raises(InputError, match="found: train, val"):
        pair_files(tmp_path / "pred", gt, split="test")


def test_split_as_a_file_of_ids(tmp_path):
    for name in ("a", "b", "c"):
        put(tmp_path / "gt" / f"{name}.png")
    put(tmp_path / "pred" / "b.png")
    ids = tmp_path / "ids.txt"
    ids.write_text("# ids\nb.jpg\n")
    pairing = pair_files(tmp_path / "pred", tmp_path / "gt", split=str(ids))
    assert [p.key for p in pairing.pairs] == ["b"]
    ids.write_text("b\nq\n")
    with pytest.raises(InputError, match="no ground-truth file"):
        pair_files(tmp_path / "pred", tmp_path / "gt", split=str(ids))
    with pytest.raises(UsageError) as err:
        pair_files(tmp_path / "pred", tmp_path / "gt", split="val")
    assert err.value.exit_code == EXIT_USAGE


VOC_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-mini"


@pytest.mark.skipif(not VOC_MINI.is_dir(), reason="../shared/data/voc-mini is not present")
def test_voc_mini_palette_masks_against_themselves(tmp_path):
    gt = VOC_MINI / "SegmentationClass"
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in sorted(gt.glob("*.png")):  # prediction = ground truth with ids shifted, void kept as an id
        arr = np.asarray(Image.open(f))
        put(pred / f.name, ((arr.astype(np.int64) + 1) % 256).astype(np.uint8))
    res = evaluate(pred, gt, EvaluationConfig(preset="voc", workers=1))
    assert res.num_images == 11 and res.miou == 1.0 and res.pixel_accuracy == 1.0
    assert all(res.mapping[c + 1] == c for c in np.flatnonzero(res.present))
