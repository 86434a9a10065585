"""Independent recomputation of the figures on real CamVid labels (../shared/data/camvid-val).

The predictions are perturbations of the ground truth (a known permutation of the class ids plus noise), so
the correct matching is known in advance. The reference below shares no code with segcli.evaluate: it counts
pixels class by class with plain numpy, applies the known matching (or a majority vote it computes itself),
and forms IoU / mIoU / accuracy with Python arithmetic. Agreement is required to 1e-9.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.evaluate import EvaluationConfig, evaluate

DATA = Path(os.environ.get("SEGCLI_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CAMVID = DATA / "camvid-val" / "labels"
pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid-val is not present")

N, IGNORE = 11, 11


def perm(c: np.ndarray) -> np.ndarray:
    return (c * 3 + 1) % N  # a bijection of 0..10


_LABELS: list[tuple[str, np.ndarray]] = []


def camvid_labels() -> list[tuple[str, np.ndarray]]:
    if not _LABELS:
        _LABELS.extend((f.name, np.array(Image.open(f))) for f in sorted(CAMVID.glob("*.png")))
    return _LABELS


def make_predictions(out: Path, extra_ids: bool = False, half_size: bool = False) -> None:
    """Permuted ground truth; 8 % of pixels replaced by a random id; ignored pixels get a random id too."""
    rng = np.random.default_rng(7)
    out.mkdir(parents=True)
    lut = perm(np.arange(256)).astype(np.uint8)
    for name, gt in camvid_labels():
        pred = lut[gt]
        ignored = gt == IGNORE
        pred[ignored] = rng.integers(0, N, int(ignored.sum()), dtype=np.uint8)
        noise = rng.random(gt.shape, dtype=np.float32) < 0.08
        pred[noise] = rng.integers(0, N, int(noise.sum()), dtype=np.uint8)
        if extra_ids:  # split road (permuted id 10) into ids 10 / 11 and car (id 3) into 3 / 12: 13 ids > 11
            checker = (np.indices(gt.shape).sum(axis=0) % 2) == 1
            pred[(pred == 10) & checker] = 11
            pred[(pred == 3) & checker] = 12
        if half_size:
            pred = pred[::2, ::2]
        Image.fromarray(pred).save(out / name, compress_level=0)


def reference(pred_dir: Path, method: str, upsample: int = 1) -> dict:
    """Straightforward recomputation: dataset confusion counts, matching, IoU over present classes."""
    counts: dict[tuple[int, int], int] = {}
    ids: set[int] = set()
    for name, gt in camvid_labels():
        pred = np.array(Image.open(pred_dir / name)).astype(np.int64)
        if upsample > 1:  # exact 2x nearest-neighbour upsampling
            pred = np.repeat(np.repeat(pred, upsample, axis=0), upsample, axis=1)
        assert pred.shape == gt.shape
        ids.update(np.unique(pred).tolist())
        for c in range(N):  # ignore (11) pixels are skipped because c never equals 11
            per_id = np.bincount(pred[gt == c], minlength=256)
            for v in np.flatnonzero(per_id).tolist():
                counts[(v, c)] = counts.get((v, c), 0) + int(per_id[v])
    if method == "known":
        mapping = {int(perm(np.int64(c))): c for c in range(N)}
    else:  # majority: each id to the class it overlaps most (lowest class on ties)
        mapping = {}
        for i in sorted(ids):
            row = [counts.get((i, c), 0) for c in range(N)]
            mapping[i] = max(range(N), key=lambda c: (row[c], -c))
    tp = [0] * N
    pred_px = [0] * N
    gt_px = [0] * N
    for (i, c), k in counts.items():
        gt_px[c] += k
        pred_px[mapping[i]] += k
        if mapping[i] == c:
            tp[c] += k
    ious = [tp[c] / (gt_px[c] + pred_px[c] - tp[c]) for c in range(N) if gt_px[c] + pred_px[c] > 0]
    return {
        "mapping": mapping,
        "miou": sum(ious) / len(ious),
        "acc": sum(tp) / sum(gt_px),
        "iou": [tp[c] / (gt_px[c] + pred_px[c] - tp[c]) if gt_px[c] + pred_px[c] else None for c in range(N)],
        "scored": sum(gt_px),
    }


def check(res, ref) -> None:
    assert res.mapping == ref["mapping"]
    assert abs(res.miou - ref["miou"]) < 1e-9
    assert abs(res.pixel_accuracy - ref["acc"]) < 1e-9
    for got, want in zip(res.iou.tolist(), ref["iou"]):
        assert (want is None and np.isnan(got)) or abs(got - want) < 1e-9
    assert res.scored_pixels == ref["scored"]


def test_hungarian_on_camvid_matches_independent_recomputation(tmp_path):
    make_predictions(tmp_path / "pred")
    res = evaluate(tmp_path / "pred", CAMVID, EvaluationConfig(preset="camvid", workers=2))
    assert res.num_images == 101 and res.method == "hungarian" and res.num_pred_ids == 11
    check(res, reference(tmp_path / "pred", "known"))
    assert 0.7 < res.miou < 0.95  # the noise is visible


def test_majority_on_camvid_matches_independent_recomputation(tmp_path):
    make_predictions(tmp_path / "pred", extra_ids=True)
    res = evaluate(tmp_path / "pred", CAMVID, EvaluationConfig(preset="camvid", workers=2))
    assert res.method == "majority" and res.num_pred_ids == 13
    ref = reference(tmp_path / "pred", "majority")
    assert ref["mapping"][11] == ref["mapping"][10] == 3 and ref["mapping"][12] == ref["mapping"][3] == 8
    check(res, ref)


def test_half_size_predictions_are_upsampled_on_camvid(tmp_path):
    make_predictions(tmp_path / "pred", half_size=True)
    res = evaluate(tmp_path / "pred", CAMVID, EvaluationConfig(preset="camvid", workers=1))
    assert res.num_resized == 101
    check(res, reference(tmp_path / "pred", "known", upsample=2))
