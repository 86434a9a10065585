"""The per-image work, run in worker processes: read a pair, align it, count its confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli.errors import InputError
from segcli.evaluate.geometry import align
from segcli.evaluate.labels import (
    LabelSpec,
    gt_codes,
    gt_lookup,
    invalid_values_error,
    label_array,
    open_label,
    prediction_ids,
)
from segcli.evaluate.metrics import NUM_PRED_IDS, fold_columns, image_confusion, match_and_score, raw_histogram
from segcli.evaluate.pairing import Pair


@dataclass(frozen=True)
class ScoreOptions:
    protocol: str = "full"
    strict_size: bool = False
    per_image: bool = False
    matching: str = "auto"
    num_clusters: int | None = None


@dataclass
class ImageScore:
    """Figures of one image under per-image matching (``--per-image``)."""

    key: str
    miou: float  # NaN when the image has no scored pixel
    pixel_accuracy: float
    method: str
    mapping: dict[int, int | None]
    classes_present: int
    scored_pixels: int


@dataclass
class LoadedPair:
    pred: np.ndarray  # uint8 cluster ids
    raw: np.ndarray  # raw ground-truth values (uint8, uint16 or int32), same shape
    resized: bool
    precropped: bool


@dataclass
class BatchResult:
    full: np.ndarray  # (256, C + 2) int64
    images: int = 0
    resized: int = 0
    precropped: int = 0
    per_image: list[ImageScore] = field(default_factory=list)
    matched: np.ndarray | None = None  # per-image mode: sum of the per-image matched matrices


def load_pair(pair: Pair, spec: LabelSpec, protocol: str, strict_size: bool) -> LoadedPair:
    """Read, align (resize / protocol crop) and decode one prediction / ground-truth pair."""
    pred_img = open_label(pair.pred, "prediction")
    gt_img = open_label(pair.gt, "ground truth")
    aligned = align(pred_img, gt_img, protocol, strict_size, pair.pred, pair.gt)
    pred = prediction_ids(label_array(aligned.pred, pair.pred, "prediction"), pair.pred)
    raw = label_array(aligned.gt, pair.gt, "ground truth", spec.colour_table)
    if pred.shape != raw.shape:  # only possible with odd image modes; never score misaligned arrays
        raise InputError(f"prediction {pair.pred} and ground truth {pair.gt} differ in size after alignment")
    return LoadedPair(pred, raw, aligned.resized, aligned.precropped)


def pair_confusion(loaded: LoadedPair, spec: LabelSpec, path: Path) -> tuple[np.ndarray, bool]:
    """Confusion of one pair: ((256, 256) raw-value histogram, True) for 8-bit ground truth (folded into classes
    later, per batch), else ((256, C + 2) code matrix, False). Invalid ground-truth values raise InputError."""
    lut = gt_lookup(spec)
    if loaded.raw.dtype == np.uint8:
        hist = raw_histogram(loaded.pred, loaded.raw)
        invalid = lut[:256] == spec.invalid_code
        if invalid.any() and hist[:, invalid].any():
            bad = np.flatnonzero(invalid & (hist.sum(axis=0) > 0))
            raise invalid_values_error(bad, spec, path)
        return hist, True
    codes = gt_codes(loaded.raw, spec, path)
    if spec.invalid_code in codes:
        raise invalid_values_error(np.unique(loaded.raw[codes == spec.invalid_code]), spec, path)
    return image_confusion(loaded.pred, codes, spec.num_classes + 2), False


def score_batch(batch: list[Pair], spec: LabelSpec, opts: ScoreOptions) -> BatchResult:
    """Sum of the full confusion matrices of a batch (plus per-image figures in per-image mode)."""
    ncols = spec.num_classes + 2
    lut8 = gt_lookup(spec)[:256]
    out = BatchResult(np.zeros((NUM_PRED_IDS, ncols), dtype=np.int64))
    raw_total = np.zeros((NUM_PRED_IDS, 256), dtype=np.int64)
    if opts.per_image:
        out.matched = np.zeros((spec.num_classes + 1, spec.num_classes), dtype=np.int64)
    for pair in batch:
        loaded = load_pair(pair, spec, opts.protocol, opts.strict_size)
        conf, is_raw = pair_confusion(loaded, spec, pair.gt)
        if is_raw:
            raw_total += conf
        else:
            out.full += conf
        out.images += 1
        out.resized += loaded.resized
        out.precropped += loaded.precropped
        if opts.per_image:
            conf = fold_columns(conf, lut8, ncols) if is_raw else conf
            res = match_and_score(conf, spec.num_classes, opts.matching, opts.num_clusters)
            out.matched += res.matched
            out.per_image.append(
                ImageScore(
                    pair.key, res.scores.miou, res.scores.pixel_accuracy, res.method, res.mapping(),
                    res.scores.num_present, res.scores.scored_pixels,
                )  # fmt: skip
            )
    out.full += fold_columns(raw_total, lut8, ncols)
    return out
