"""The data behind ``segcli report``: one row per image, its figures, the sample that gets pictures, class colours.

Sources, all optional but the mask folder:

* the mask folder of ``segment`` (or ``cluster-dataset --masks``): its label PNGs, and its run record
  ``segcli-run.json`` (:mod:`segcli.io.run_record`): settings, model, weights, timings, which input image each mask
  belongs to, and the images skipped with their reason;
* the ``--json`` file of ``segcli evaluate``: the cluster-to-class matching, per-class IoU, confusion matrices,
  and how the ground truth is read (preset, palette, ignore value, folder, split);
* ``--images DIR``: the input images, when the run record is missing or its images have moved.

Every image is read once to score it (prediction and ground truth, one pair at a time: memory does not grow
with the number of images) and the sampled ones once more for their pictures (:func:`sample_rows`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli.errors import InputError

# Colour of a ground-truth class that no cluster was matched to (it has no prediction colour).
UNMATCHED_COLOUR = (128, 128, 128)


@dataclass
class ImageRow:
    """One image of the report. ``miou``/``accuracy`` are None when it has no ground truth (or no scored
    pixel); ``status`` is ``ok``, ``skipped`` (segment skipped it: ``reason`` says why), ``unreadable`` (its mask
    or ground truth could not be read: ``reason``) or ``no prediction`` (ground truth without a mask)."""

    key: str
    image: str | None = None
    mask: Path | None = None
    gt: Path | None = None
    status: str = "ok"
    reason: str | None = None
    miou: float | None = None
    accuracy: float | None = None
    pred_ids: list[int] = field(default_factory=list)  # cluster ids present in the prediction
    gt_classes: list[int] = field(default_factory=list)  # ground-truth classes present (ignored pixels excluded)
    mapping: dict[int, int | None] | None = None  # per-image matching (evaluate --per-image), else None
    notes: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """What the report uses of an ``evaluate --json`` file."""

    data: dict
    mapping: dict[int, int | None]  # dataset mode: cluster id -> class id (None: unmatched); {} per-image
    class_names: list[str]
    per_image: dict[str, dict] | None  # per-image mode: key -> its figures and mapping

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def mode(self) -> str:
        return str(self.data.get("mode", "dataset"))


def load_evaluation(path: Path) -> Evaluation:
    """Read and check an ``evaluate --json`` file (:class:`InputError`, one line, when it is not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the evaluation {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except ValueError as exc:
        raise InputError(f"evaluation {path} is not valid JSON ({exc})") from None
    needed = ("class_names", "per_class", "mapping", "matched_confusion", "num_classes")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        raise InputError(f"{path} is not the --json output of segcli evaluate")
    try:
        mapping = {int(k): (None if v is None else int(v)) for k, v in data["mapping"].items()}
        names = [str(n) for n in data["class_names"]]
        per_image = None
        if data.get("per_image") is not None:
            per_image = {str(r["name"]): r for r in data["per_image"]}
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"evaluation {path} is damaged ({exc})") from None
    return Evaluation(data, mapping, names, per_image)


def image_scores(confusion: np.ndarray, mapping: dict[int, int | None], num_classes: int) -> tuple[float | None, float | None]:
    """(mIoU, pixel accuracy) of one image under a cluster -> class ``mapping``.

    ``confusion``: (256, C[+extra]) pixel counts, prediction id x ground-truth class (columns past C, ignored
    pixels, are dropped). Clusters the mapping does not match count as errors, as in ``evaluate``. The mIoU
    averages the classes present in the image's ground truth or matched prediction; None without scored pixels.
    """
    from segcli.evaluate.metrics import scores

    C = num_classes
    conf = np.asarray(confusion)[:, :C]
    matched = np.zeros((C + 1, C), dtype=np.int64)
    for pid in np.flatnonzero(conf.sum(axis=1)):
        cls = mapping.get(int(pid))
        matched[cls if cls is not None and 0 <= cls < C else C] += conf[pid]
    s = scores(matched)
    if s.scored_pixels == 0:
        return None, None
    return (None if math.isnan(s.miou) else s.miou), s.pixel_accuracy


def class_colours(mapping: dict[int, int | None], pixels: dict[int, int], num_classes: int,
                  palette: np.ndarray) -> np.ndarray:
    """(num_classes, 3) colour of each ground-truth class: the palette colour of the cluster matched to it (the
    one with most pixels when several are), so that ground truth and prediction read alike; classes with no
    cluster get :data:`UNMATCHED_COLOUR`."""
    out = np.tile(np.array(UNMATCHED_COLOUR, np.uint8), (num_classes, 1))
    best: dict[int, tuple[int, int]] = {}
    for pid, cls in mapping.items():
        if cls is None or not 0 <= cls < num_classes or not 0 <= pid < len(palette):
            continue
        n = int(pixels.get(pid, 0))
        if cls not in best or (n, -pid) > (best[cls][0], -best[cls][1]):
            best[cls] = (n, pid)
    for cls, (_, pid) in best.items():
        out[cls] = palette[pid]
    return out


def sample_rows(rows: list[ImageRow], n: int) -> list[int]:
    """Indices of the rows that get pictures: all when there are at most ``n``; otherwise the ``ceil(n/2)``
    worst-scored images (lowest mIoU, then pixel accuracy) and ``n - ceil(n/2)`` more spread evenly over the
    rest in score order (so the best ones are shown too). Without scores: ``n`` spread evenly in name order.
    Rows without a mask (skipped, no prediction, unreadable) never get pictures."""
    usable = [i for i, r in enumerate(rows) if r.status == "ok" and r.mask is not None]
    if n <= 0:
        return []
    if len(usable) <= n:
        return usable
    scored = [i for i in usable if rows[i].miou is not None]
    if not scored:
        return sorted({usable[j] for j in np.linspace(0, len(usable) - 1, n).round().astype(int)})
    order = sorted(scored, key=lambda i: (rows[i].miou, rows[i].accuracy or 0.0, rows[i].key))
    order += sorted((i for i in usable if rows[i].miou is None), key=lambda i: rows[i].key)
    worst = math.ceil(n / 2)
    rest = order[worst:]
    picks = [rest[j] for j in np.linspace(0, len(rest) - 1, n - worst).round().astype(int)] if n > worst else []
    return sorted(set(order[:worst]) | set(picks))


def gather_rows(masks_dir: Path, record: dict | None, images_dir: Path | None) -> list[ImageRow]:
    """One row per mask of ``masks_dir`` plus one per image the run skipped, in key order, with the input image
    of each (from ``images_dir`` when given, else from the run record); a mask whose image cannot be found
    keeps a note and is shown without its input."""
    from segcli.evaluate.pairing import scan_images

    masks = {k: p for k, p in scan_images(masks_dir, "mask").items() if p.suffix.lower() == ".png"}
    images: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if record is not None:
        images = {str(k): str(p) for k, p in record.get("items", [])}
        skipped = {str(k): str(v) for k, v in (record.get("skipped") or {}).items()}
    if images_dir is not None:
        images = {k: str(p) for k, p in scan_images(images_dir, "input image").items()}
    rows = []
    for key in sorted(set(masks) | set(skipped)):
        row = ImageRow(key, image=images.get(key), mask=masks.get(key))
        if key in skipped and key not in masks:
            row.status, row.reason = "skipped", skipped[key]
        if row.image is not None and not Path(row.image).is_file() and "://" not in row.image:
            row.image = None
        if row.image is None and row.status == "ok":
            row.notes.append("input image not found")
        rows.append(row)
    return rows


def gt_spec(evaluation: Evaluation):
    """The :class:`segcli.evaluate.labels.LabelSpec` the evaluation read its ground truth with."""
    from segcli.errors import UsageError
    from segcli.evaluate.config import EvaluationConfig
    from segcli.evaluate.labels import resolve_spec

    d = evaluation.data
    preset = d.get("preset")
    config = EvaluationConfig(preset=preset, num_classes=None if preset else d.get("num_classes"),
                              ignore=None if preset else d.get("ignore"), palette=d.get("palette"),
                              split=d.get("split"), protocol=str(d.get("protocol") or "full"))
    try:
        return resolve_spec(config)
    except UsageError as exc:
        raise InputError(f"the evaluation's label settings cannot be used: {exc}") from None


def pair_ground_truth(rows: list[ImageRow], masks_dir: Path, evaluation: Evaluation) -> list[str]:
    """Attach each row's ground-truth file (the evaluation's folder and split, paired by key as ``evaluate``
    does) and add rows for ground truth without a mask. Returns page-level notes (e.g. the folder is gone)."""
    from segcli.evaluate.pairing import pair_files

    gt_dir = evaluation.data.get("gt_dir")
    if not gt_dir:
        return ["the evaluation names no ground-truth folder: no per-image figures"]
    if "://" not in str(gt_dir) and not Path(gt_dir).exists():
        return [f"the evaluation's ground-truth folder {gt_dir} is not there any more: no per-image figures"]
    try:
        pairing = pair_files(Path(masks_dir), Path(gt_dir), evaluation.data.get("split"), allow_missing=True)
    except InputError as exc:
        return [f"ground truth not paired: {exc}"]
    by_key = {r.key: r for r in rows}
    for pair in pairing.pairs:
        if pair.key in by_key:
            by_key[pair.key].gt = pair.gt
    for row in rows:
        if row.gt is None and row.status == "ok":
            row.notes.append("no ground truth")
    for key in pairing.missing:
        if key not in by_key:
            rows.append(ImageRow(key, status="no prediction", reason="ground truth without a mask"))
    rows.sort(key=lambda r: r.key)
    return []


def read_pair(row: ImageRow, spec, protocol: str = "full"):
    """(prediction ids uint8, ground-truth codes uint16: class id, ``spec.ignore_code`` or invalid) of a row,
    aligned as ``evaluate`` aligns them (the prediction resized to the ground truth, nearest)."""
    from segcli.evaluate.labels import gt_codes
    from segcli.evaluate.pairing import Pair
    from segcli.evaluate.scoring import load_pair

    loaded = load_pair(Pair(row.key, row.mask, row.gt), spec, protocol, False)
    return loaded.pred, gt_codes(loaded.raw, spec, row.gt)


def score_row(row: ImageRow, evaluation: Evaluation | None, spec) -> None:
    """Fill a row's ids present and, with ground truth, its mIoU and pixel accuracy under the evaluation's
    matching (its own matching and figures in per-image mode). A mask or ground truth that cannot be read
    marks the row ``unreadable`` with the reason (the report goes on)."""
    from segcli.evaluate.labels import label_array, open_label, prediction_ids
    from segcli.evaluate.metrics import image_confusion

    if row.status != "ok" or row.mask is None:
        return
    try:
        if row.gt is None or evaluation is None:
            pred = prediction_ids(label_array(open_label(row.mask, "prediction"), row.mask, "prediction"), row.mask)
            row.pred_ids = [int(i) for i in np.flatnonzero(np.bincount(pred.ravel(), minlength=256))]
            return
        pred, codes = read_pair(row, spec)
        row.pred_ids = [int(i) for i in np.flatnonzero(np.bincount(pred.ravel(), minlength=256))]
        C = spec.num_classes
        if (codes == spec.invalid_code).any():
            raise InputError(f"ground truth {row.gt} has values that are neither classes nor ignored: check the "
                             "evaluation's --preset / --num-classes")
        row.gt_classes = [int(c) for c in np.flatnonzero(np.bincount(codes.ravel(), minlength=C + 2)[:C])]
        protocol = str(evaluation.data.get("protocol") or "full")
        if protocol != "full":
            pred, codes = read_pair(row, spec, protocol)
        if evaluation.per_image is not None:
            figures = evaluation.per_image.get(row.key)
            if figures is not None:
                row.miou, row.accuracy = figures.get("miou"), figures.get("pixel_accuracy")
                row.mapping = {int(k): (None if v is None else int(v)) for k, v in (figures.get("mapping") or {}).items()}
            else:
                row.notes.append("not in the evaluation")
            return
        row.miou, row.accuracy = image_scores(image_confusion(pred, codes, C + 2), evaluation.mapping, C)
    except InputError as exc:
        row.status, row.reason = "unreadable", str(exc)
        row.miou = row.accuracy = None
