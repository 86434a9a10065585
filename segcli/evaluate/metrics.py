"""Confusion matrices, cluster-to-class matching and the figures (IoU, mIoU, pixel accuracy).

Conventions: a *full* confusion matrix has one row per prediction id 0..255 and one column per class plus two
extra columns (ignored ground truth, invalid ground truth), so it also records which ids occur at all. The
*scored* matrix drops the extra columns: entry [i, c] counts pixels with prediction id i and class c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcli.errors import UsageError

NUM_PRED_IDS = 256


def image_confusion(pred: np.ndarray, codes: np.ndarray, ncols: int) -> np.ndarray:
    """(256, ncols) int64 counts of (prediction id, ground-truth code) over the pixels of one image."""
    idx = pred.astype(np.intp).ravel()
    idx *= ncols
    idx += codes.ravel()
    counts = np.bincount(idx, minlength=NUM_PRED_IDS * ncols)
    return counts.astype(np.int64, copy=False).reshape(NUM_PRED_IDS, ncols)


def raw_histogram(pred: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """(256, 256) int64 counts of (prediction id, raw 8-bit ground-truth value): the fast path for uint8 labels."""
    idx = pred.astype(np.uint16)
    idx <<= 8
    idx |= raw
    counts = np.bincount(idx.ravel(), minlength=NUM_PRED_IDS * 256)
    return counts.astype(np.int64, copy=False).reshape(NUM_PRED_IDS, 256)


def fold_columns(hist: np.ndarray, codes: np.ndarray, ncols: int) -> np.ndarray:
    """Sum the raw-value columns of ``hist`` into code columns (``codes[v]`` = code of raw value ``v``)."""
    out = np.zeros((hist.shape[0], ncols), dtype=np.int64)
    np.add.at(out, (slice(None), codes.astype(np.intp)), hist)
    return out


def select_method(n_pred: int, n_classes: int, requested: str = "auto") -> str:
    """``hungarian`` when predicted ids <= classes, ``majority`` when there are more (unless requested)."""
    if requested in ("hungarian", "majority"):
        return requested
    if requested != "auto":
        raise UsageError(f"unknown matching {requested!r}; choose auto, hungarian or majority")
    return "hungarian" if n_pred <= n_classes else "majority"


def match(scored: np.ndarray, method: str) -> np.ndarray:
    """Class for every row of ``scored`` (prediction ids x classes); -1 = unmatched.

    Hungarian: one-to-one assignment maximising the matched pixel count (``linear_sum_assignment``, maximize);
    with more ids than classes the surplus ids stay unmatched, with fewer some classes get no id.
    Majority: each id goes to the class it overlaps most (ties: lowest class id); ids without any scored
    pixel stay unmatched.
    """
    n_ids = scored.shape[0]
    assignment = np.full(n_ids, -1, dtype=np.int64)
    if n_ids == 0:
        return assignment
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(scored, maximize=True)
        assignment[rows] = cols
    elif method == "majority":
        has_pixels = scored.sum(axis=1) > 0
        assignment[has_pixels] = scored[has_pixels].argmax(axis=1)
    else:
        raise UsageError(f"unknown matching method {method!r}")
    return assignment


def matched_confusion(scored: np.ndarray, assignment: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes + 1, num_classes): rows = matched class (last row: unmatched ids), columns = true class."""
    target = np.where(assignment >= 0, assignment, num_classes)
    out = np.zeros((num_classes + 1, num_classes), dtype=np.int64)
    np.add.at(out, target, scored)
    return out


@dataclass
class Scores:
    iou: np.ndarray  # (C,) float64, NaN where the class is in neither ground truth nor matched prediction
    present: np.ndarray  # (C,) bool
    tp: np.ndarray  # (C,) int64
    gt_pixels: np.ndarray  # (C,) int64
    pred_pixels: np.ndarray  # (C,) int64 (pixels matched to the class, scored pixels only)
    miou: float
    pixel_accuracy: float
    scored_pixels: int

    @property
    def num_present(self) -> int:
        return int(self.present.sum())


def scores(matched: np.ndarray) -> Scores:
    """IoU per class, mIoU over classes present in ground truth or prediction, pixel accuracy."""
    num_classes = matched.shape[1]
    tp = np.diagonal(matched[:num_classes]).astype(np.int64)
    pred_pixels = matched[:num_classes].sum(axis=1)
    gt_pixels = matched.sum(axis=0)
    union = gt_pixels + pred_pixels - tp
    present = union > 0
    iou = np.full(num_classes, np.nan)
    iou[present] = tp[present] / union[present]
    total = int(gt_pixels.sum())
    miou = float(iou[present].mean()) if present.any() else float("nan")
    acc = float(tp.sum() / total) if total else float("nan")
    return Scores(iou, present, tp, gt_pixels, pred_pixels, miou, acc, total)


@dataclass
class MatchResult:
    method: str
    pred_ids: np.ndarray  # the prediction ids taken part (sorted)
    assignment: np.ndarray  # class per pred id, -1 = unmatched
    scored: np.ndarray  # (len(pred_ids), C) int64
    matched: np.ndarray  # (C + 1, C) int64
    scores: Scores

    def mapping(self) -> dict[int, int | None]:
        return {int(i): (int(c) if c >= 0 else None) for i, c in zip(self.pred_ids, self.assignment)}


def prediction_id_set(full: np.ndarray, num_clusters: int | None, num_classes: int | None = None) -> np.ndarray:
    """Ids that meet at least one scored pixel (columns ``:num_classes``), or 0..num_clusters-1.

    An id seen only on ignored ground-truth pixels takes no part: it could never be matched to anything, and
    counting it would switch ``auto`` from Hungarian to majority. ``--num-clusters`` is still checked against
    every id found, ignored pixels included.
    """
    cols = slice(None) if num_classes is None else slice(0, num_classes)
    if num_clusters is None:
        return np.flatnonzero(full[:, cols].sum(axis=1) > 0)
    found = np.flatnonzero(full.sum(axis=1) > 0)
    if found.size and found[-1] >= num_clusters:
        raise UsageError(f"predictions hold id {int(found[-1])} but --num-clusters is {num_clusters}")
    return np.arange(num_clusters)


def match_and_score(
    full: np.ndarray, num_classes: int, matching: str = "auto", num_clusters: int | None = None
) -> MatchResult:
    """Matching and figures from a full (256, C + extra) confusion matrix."""
    ids = prediction_id_set(full, num_clusters, num_classes)
    scored = full[ids, :num_classes]
    method = select_method(len(ids), num_classes, matching)
    assignment = match(scored, method)
    matched = matched_confusion(scored, assignment, num_classes)
    return MatchResult(method, ids, assignment, scored, matched, scores(matched))
