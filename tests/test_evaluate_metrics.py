"""Hand-computed answers for the evaluation protocol (docs/evaluation.md) on tiny label images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.errors import InputError, UsageError
from segcli.evaluate import EvaluationConfig, evaluate
from segcli.evaluate.geometry import STEGO_SIZE, center_crop, resize_short_side, stego_transform
from segcli.evaluate.metrics import match, matched_confusion, scores, select_method


def save(path: Path, values, mode: str = "L") -> Path:
    arr = np.asarray(values, dtype=np.uint8)
    if arr.ndim == 1:
        arr = arr[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    img.save(path)
    return path


def run(tmp_path: Path, pairs: dict[str, tuple], **cfg):
    for name, (pred, gt) in pairs.items():
        save(tmp_path / "pred" / f"{name}.png", pred)
        save(tmp_path / "gt" / f"{name}.png", gt)
    cfg.setdefault("workers", 1)
    return evaluate(tmp_path / "pred", tmp_path / "gt", EvaluationConfig(**cfg))


# gt  : 0 0 0 0 0 0 0 1 1      id 0 covers 4 px of class 0;
# pred: 0 0 0 0 1 1 1 1 1      id 1 covers 3 px of class 0 and 2 px of class 1.
GT_A = [0, 0, 0, 0, 0, 0, 0, 1, 1]
PRED_A = [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_hungarian_and_majority_differ(tmp_path):
    hung = run(tmp_path / "h", {"a": (PRED_A, GT_A)}, num_classes=2)
    assert hung.method == "hungarian" and hung.mapping == {0: 0, 1: 1}
    assert hung.iou[0] == pytest.approx(4 / 7, abs=1e-12)
    assert hung.iou[1] == pytest.approx(2 / 5, abs=1e-12)
    assert hung.miou == pytest.approx((4 / 7 + 2 / 5) / 2, abs=1e-12)
    assert hung.pixel_accuracy == pytest.approx(6 / 9, abs=1e-12)

    maj = run(tmp_path / "m", {"a": (PRED_A, GT_A)}, num_classes=2, matching="majority")
    assert maj.method == "majority" and maj.mapping == {0: 0, 1: 0}
    assert maj.iou[0] == pytest.approx(7 / 9, abs=1e-12)
    assert maj.iou[1] == 0.0  # class 1 is in the ground truth, so it counts with IoU 0
    assert maj.miou == pytest.approx(7 / 18, abs=1e-12)
    assert maj.pixel_accuracy == pytest.approx(7 / 9, abs=1e-12)


def test_auto_picks_majority_when_more_ids_than_classes(tmp_path):
    # ids: 0 -> 4 px class 0; 1 -> 3 px class 0 + 1 px class 1; 2 -> 2 px class 1
    gt = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    pred = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    maj = run(tmp_path / "a", {"x": (pred, gt)}, num_classes=2)
    assert maj.method == "majority" and maj.mapping == {0: 0, 1: 0, 2: 1}
    assert maj.iou.tolist() == pytest.approx([7 / 8, 2 / 3], abs=1e-12)
    assert maj.pixel_accuracy == pytest.approx(9 / 10, abs=1e-12)
    # forced Hungarian on 3 ids x 2 classes leaves id 1 unmatched: its pixels count as errors
    hung = run(tmp_path / "b", {"x": (pred, gt)}, num_classes=2, matching="hungarian")
    assert hung.mapping == {0: 0, 1: None, 2: 1}
    assert hung.iou.tolist() == pytest.approx([4 / 7, 2 / 3], abs=1e-12)
    assert hung.pixel_accuracy == pytest.approx(6 / 10, abs=1e-12)


def test_select_method_rule():
    assert select_method(21, 21) == "hungarian"
    assert select_method(5, 11) == "hungarian"
    assert select_method(30, 27) == "majority"
    assert select_method(30, 27, "hungarian") == "hungarian"
    with pytest.raises(UsageError):
        select_method(3, 3, "greedy")


def test_ignore_pixels_are_dropped_but_prediction_pixels_are_not(tmp_path):
    # the two 255 pixels are dropped: id 0 -> 1 px class 0; id 1 -> 1 px class 0 + 2 px class 1
    res = run(tmp_path, {"x": ([0, 1, 0, 1, 1, 1], [0, 0, 255, 255, 1, 1])}, num_classes=2)
    assert res.mapping == {0: 0, 1: 1}
    assert res.iou.tolist() == pytest.approx([1 / 2, 2 / 3], abs=1e-12)
    assert res.pixel_accuracy == pytest.approx(3 / 4, abs=1e-12)
    assert (res.scored_pixels, res.ignored_pixels) == (4, 2)


def test_id_seen_only_on_ignored_pixels_is_not_a_predicted_id(tmp_path):
    # Issue 13: an id that meets no scored pixel must not switch `auto` from Hungarian to majority.
    res = run(tmp_path, {"x": ([0, 1, 2], [0, 1, 255])}, num_classes=2)
    assert res.pred_ids == [0, 1] and res.method == "hungarian"
    assert res.mapping == {0: 0, 1: 1}
    assert res.miou == 1.0


def test_custom_ignore_value(tmp_path):
    res = run(tmp_path, {"x": ([0, 1, 1, 1], [0, 1, 7, 7])}, num_classes=2, ignore=7)
    assert res.miou == 1.0 and res.ignored_pixels == 2


def test_size_mismatch_is_resized_nearest_or_an_error(tmp_path):
    pred = [[0, 1], [1, 0]]
    gt = np.kron(np.array([[1, 0], [0, 1]]), np.ones((2, 2), dtype=int))  # 4x4, same layout, ids swapped
    res = run(tmp_path / "a", {"x": (pred, gt)}, num_classes=2)
    assert res.num_resized == 1 and res.mapping == {0: 1, 1: 0}
    assert res.miou == 1.0 and res.scored_pixels == 16
    with pytest.raises(InputError, match="strict-size"):
        run(tmp_path / "b", {"x": (pred, gt)}, num_classes=2, strict_size=True)


def test_class_absent_from_prediction_counts_and_class_absent_everywhere_does_not(tmp_path):
    gt = [0, 0, 1, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 1]
    res = run(tmp_path / "a", {"x": (pred, gt)}, num_classes=3)
    assert res.mapping == {0: 0, 1: 1}
    assert res.iou.tolist() == pytest.approx([1.0, 3 / 4, 0.0], abs=1e-12)
    assert res.miou == pytest.approx((1 + 3 / 4 + 0) / 3, abs=1e-12)
    assert res.pixel_accuracy == pytest.approx(5 / 6, abs=1e-12)
    res4 = run(tmp_path / "b", {"x": (pred, gt)}, num_classes=4)  # class 3: in neither -> left out of the mean
    assert np.isnan(res4.iou[3]) and not res4.present[3]
    assert res4.miou == pytest.approx(res.miou, abs=1e-12)


def test_empty_prediction(tmp_path):
    res = run(tmp_path, {"x": ([0, 0, 0, 0], [0, 0, 0, 1])}, num_classes=2)
    assert res.pred_ids == [0] and res.method == "hungarian" and res.mapping == {0: 0}
    assert res.iou.tolist() == pytest.approx([3 / 4, 0.0], abs=1e-12)
    assert res.miou == pytest.approx(3 / 8, abs=1e-12)


def test_unreadable_prediction_file_is_an_input_error(tmp_path):
    save(tmp_path / "gt" / "x.png", [0, 1])
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="cannot read prediction"):
        evaluate(tmp_path / "pred", tmp_path / "gt", EvaluationConfig(num_classes=2, workers=1))


def test_all_ground_truth_ignored_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no pixel to score"):
        run(tmp_path, {"x": ([0, 1], [255, 255])}, num_classes=2)


def test_dataset_matrix_versus_per_image_matching(tmp_path):
    pairs = {"a": ([1, 1, 0, 0], [0, 0, 1, 1]), "b": ([0, 0, 1, 1], [0, 0, 1, 1])}
    ds = run(tmp_path / "d", pairs, num_classes=2)
    assert ds.mode == "dataset"
    assert ds.miou == pytest.approx(1 / 3, abs=1e-12)  # each id is right on one image, wrong on the other
    assert ds.pixel_accuracy == pytest.approx(1 / 2, abs=1e-12)
    pi = run(tmp_path / "p", pairs, num_classes=2, per_image=True)
    assert pi.mode == "per-image" and pi.method == "per-image"
    assert pi.miou == 1.0 and pi.pixel_accuracy == 1.0
    assert [(r.key, r.mapping) for r in pi.per_image] == [("a", {0: 1, 1: 0}), ("b", {0: 0, 1: 1})]


def test_num_clusters_fixes_the_id_set(tmp_path):
    res = run(tmp_path / "a", {"x": ([0, 0, 1, 1], [0, 0, 1, 1])}, num_classes=2, num_clusters=3)
    assert res.pred_ids == [0, 1, 2] and res.method == "majority"
    with pytest.raises(UsageError, match="num-clusters"):
        run(tmp_path / "b", {"x": ([0, 5, 1, 1], [0, 0, 1, 1])}, num_classes=2, num_clusters=3)


def test_workers_give_identical_figures(tmp_path):
    rng = np.random.default_rng(0)
    pairs = {f"im{i:02d}": (rng.integers(0, 4, (20, 30)), rng.integers(0, 3, (20, 30))) for i in range(12)}
    one = run(tmp_path / "a", pairs, num_classes=3, workers=1)
    two = run(tmp_path / "b", pairs, num_classes=3, workers=2)
    assert np.array_equal(one.confusion, two.confusion) and one.miou == two.miou and one.mapping == two.mapping


def test_matching_functions_directly():
    scored = np.array([[4, 0], [3, 2]])
    assert match(scored, "hungarian").tolist() == [0, 1]
    assert match(scored, "majority").tolist() == [0, 0]
    m = matched_confusion(scored, np.array([0, 0]), 2)
    assert m.tolist() == [[7, 2], [0, 0], [0, 0]]
    s = scores(m)
    assert s.miou == pytest.approx(7 / 18) and s.scored_pixels == 9


def test_stego_geometry_matches_torchvision_conventions():
    img = Image.new("L", (480, 360))
    assert resize_short_side(img, 320).size == (426, 320)  # int(320 * 480 / 360) = 426
    tall = Image.new("L", (375, 500))
    assert resize_short_side(tall, 320).size == (320, 426)
    strip = Image.fromarray(np.tile(np.arange(426, dtype=np.uint16).astype(np.uint8), (320, 1)))
    cropped = center_crop(strip, 320)
    assert cropped.size == (320, 320) and np.asarray(cropped)[0, 0] == 53  # round(106 / 2) = 53
    assert stego_transform(Image.new("L", (320, 320))).size == (STEGO_SIZE, STEGO_SIZE)


def test_stego_protocol_crops_the_border_away(tmp_path):
    gt = np.zeros((480, 640), dtype=np.uint8)
    gt[200:280, 280:360] = 1
    pred = gt.copy()
    pred[:, :40] = 1  # wrong only in the leftmost 40 columns, which the 320 centre crop drops
    full = run(tmp_path / "f", {"x": (pred, gt)}, num_classes=2)
    assert full.miou < 1.0
    stego = run(tmp_path / "s", {"x": (pred, gt)}, num_classes=2, protocol="stego")
    assert stego.miou == 1.0 and stego.scored_pixels == 320 * 320
    # a prediction already at 320x320 is taken as the crop; only the ground truth is transformed
    crop = np.asarray(stego_transform(Image.fromarray(gt)))
    pre = run(tmp_path / "c", {"x": (crop, gt)}, num_classes=2, protocol="stego")
    assert pre.num_precropped == 1 and pre.miou == 1.0
