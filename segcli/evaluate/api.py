"""The Python API: ``evaluate(pred_dir, gt, config) -> EvaluationResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli.io import storage
from segcli.errors import InputError, UsageError
from segcli.evaluate.config import MATCHINGS, PROTOCOLS, EvaluationConfig, available_cores
from segcli.evaluate.labels import LabelSpec, resolve_spec
from segcli.evaluate.metrics import match_and_score, scores
from segcli.evaluate.pairing import Pair, Pairing, pair_files
from segcli.evaluate.parallel import batched, run_batches
from segcli.evaluate.scoring import BatchResult, ImageScore, ScoreOptions, score_batch

__all__ = ["EvaluationResult", "ImageScore", "evaluate"]


@dataclass
class EvaluationResult:
    """Every figure of one evaluation. Fractions are in 0..1 (the terminal shows percent).

    ``mode`` is ``dataset`` (one confusion matrix over all pixels, one matching: the protocol) or ``per-image``
    (every image matched on its own; ``miou``/``pixel_accuracy`` are then means over images, and ``iou`` comes
    from the sum of the per-image matched matrices).
    """

    mode: str
    config: EvaluationConfig
    spec: LabelSpec
    pairing: Pairing
    method: str  # "hungarian" | "majority" | "per-image"
    pred_ids: list[int]  # prediction ids that took part in the matching
    mapping: dict[int, int | None]  # cluster id -> class id (None: unmatched); empty in per-image mode
    confusion: np.ndarray  # (len(pred_ids), C) int64: pixels of prediction id (row) and class (column)
    matched_confusion: np.ndarray  # (C + 1, C) int64: rows = matched class (+ unmatched), columns = true class
    iou: np.ndarray  # (C,) float, NaN for classes absent from ground truth and matched prediction
    present: np.ndarray  # (C,) bool
    tp: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    miou: float
    pixel_accuracy: float
    scored_pixels: int
    ignored_pixels: int
    num_resized: int
    num_precropped: int
    workers: int
    seconds: float
    per_image: list[ImageScore] | None = None
    method_counts: dict[str, int] = field(default_factory=dict)  # per-image mode: images per matching method

    @property
    def pairs(self) -> list[Pair]:
        return self.pairing.pairs

    @property
    def num_images(self) -> int:
        return len(self.pairing.pairs)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def num_pred_ids(self) -> int:
        return len(self.pred_ids)

    def per_class_iou(self) -> dict[str, float | None]:
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.class_names, self.iou)}


def _check(config: EvaluationConfig) -> int:
    if config.protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {config.protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if config.matching not in MATCHINGS:
        raise UsageError(f"unknown --matching {config.matching!r}; choose {', '.join(MATCHINGS)}")
    if config.num_clusters is not None and not 1 <= config.num_clusters <= 256:
        raise UsageError(f"--num-clusters must be between 1 and 256, not {config.num_clusters}")
    if config.workers is not None and config.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {config.workers}")
    return config.workers or available_cores()


def evaluate(
    pred_dir: str | Path,
    gt: str | Path,
    config: EvaluationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Score the label PNGs in ``pred_dir`` against the ground truth ``gt`` (docs/evaluation.md).

    ``progress(done, total)`` is called after each batch of images. Raises :class:`segcli.errors.InputError`
    for missing / mismatched / unreadable files and :class:`segcli.errors.UsageError` for bad options.
    """
    import time

    config = config or EvaluationConfig()
    workers = _check(config)
    spec = resolve_spec(config)
    pairing = pair_files(storage.location(pred_dir), storage.location(gt), config.split, config.allow_missing)
    opts = ScoreOptions(config.protocol, config.strict_size, config.per_image, config.matching, config.num_clusters)

    start = time.perf_counter()
    total = BatchResult(np.zeros((256, spec.num_classes + 2), dtype=np.int64))
    if config.per_image:
        total.matched = np.zeros((spec.num_classes + 1, spec.num_classes), dtype=np.int64)

    def fold(res: BatchResult) -> None:
        total.full += res.full
        total.images += res.images
        total.resized += res.resized
        total.precropped += res.precropped
        if res.matched is not None:
            total.matched += res.matched
            total.per_image.extend(res.per_image)
        if progress is not None:
            progress(total.images, len(pairing.pairs))

    run_batches(score_batch, batched(pairing.pairs, workers), (spec, opts), workers, fold)
    seconds = time.perf_counter() - start

    full = total.full
    C = spec.num_classes
    ignored = int(full[:, C].sum())
    if int(full[:, :C].sum()) == 0:
        raise InputError(f"no pixel to score: every ground-truth pixel of the {total.images} images is ignored")
    dataset = match_and_score(full, C, config.matching, config.num_clusters)
    common = dict(
        config=config, spec=spec, pairing=pairing, pred_ids=[int(i) for i in dataset.pred_ids],
        confusion=dataset.scored, scored_pixels=dataset.scores.scored_pixels, ignored_pixels=ignored,
        num_resized=total.resized, num_precropped=total.precropped, workers=workers, seconds=seconds,
    )  # fmt: skip
    if not config.per_image:
        s = dataset.scores
        return EvaluationResult(
            mode="dataset", method=dataset.method, mapping=dataset.mapping(), matched_confusion=dataset.matched,
            iou=s.iou, present=s.present, tp=s.tp, gt_pixels=s.gt_pixels, pred_pixels=s.pred_pixels,
            miou=s.miou, pixel_accuracy=s.pixel_accuracy, **common,
        )  # fmt: skip
    images = sorted(total.per_image, key=lambda r: r.key)
    scored = [r for r in images if r.scored_pixels > 0 and not np.isnan(r.miou)]
    s = scores(total.matched)
    counts: dict[str, int] = {}
    for r in images:
        counts[r.method] = counts.get(r.method, 0) + 1
    return EvaluationResult(
        mode="per-image", method="per-image", mapping={}, matched_confusion=total.matched,
        iou=s.iou, present=s.present, tp=s.tp, gt_pixels=s.gt_pixels, pred_pixels=s.pred_pixels,
        miou=float(np.mean([r.miou for r in scored])),
        pixel_accuracy=float(np.mean([r.pixel_accuracy for r in scored])),
        per_image=images, method_counts=counts, **common,
    )  # fmt: skip
