"""Presenting a result: the rich table on the terminal and the ``--json`` file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


METHOD_TEXT = {"hungarian": "Hungarian", "majority": "many-to-one majority"}


def _pct(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _ids_text(ids: list[int], limit: int = 8) -> str:
    if not ids:
        return "—"
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", … (+{len(ids) - limit})" if len(ids) > limit else "")


def matching_text(result) -> str:
    """One line saying which matching was used and why."""
    if result.mode == "per-image":
        counts = ", ".join(f"{METHOD_TEXT.get(m, m)} on {n}" for m, n in sorted(result.method_counts.items()))
        return f"per-image matching: every image matched on its own ({counts} images)"
    n, C = result.num_pred_ids, result.num_classes
    rel = "=" if n == C else ("<" if n < C else ">")
    why = f"{n} predicted ids {rel} {C} classes"
    requested = result.config.matching
    if requested != "auto":
        why += f", --matching {requested}"
    text = f"matching: {METHOD_TEXT[result.method]} ({why})"
    unmatched = [i for i, c in result.mapping.items() if c is None]
    if unmatched:
        text += f"; unmatched ids {_ids_text(unmatched)} count as errors"
    return text


def summary_lines(result) -> list[str]:
    p = result.pairing
    mode = "dataset-level confusion matrix" if result.mode == "dataset" else "PER-IMAGE matching (not the protocol)"
    lines = [f"{result.num_images} images · protocol {result.config.protocol} · {mode}"]
    lines.append(f"ground truth: {result.spec.describe()}")
    notes = []
    if p.missing or p.extra:
        notes.append(
            f"scored {result.num_images} of {p.num_gt} ground-truth images (--allow-missing: {len(p.missing)} without "
            f"prediction, {len(p.extra)} predictions without ground truth)"
        )
    if p.split:
        outside = f" ({p.outside_split} predictions outside it not scored)" if p.outside_split else ""
        notes.append(f"split {p.split}{outside}")
    if result.num_resized:
        notes.append(f"{result.num_resized} predictions resized to their ground truth's size (nearest)")
    if result.num_precropped:
        notes.append(f"{result.num_precropped} predictions already 320x320 (taken as STEGO crops)")
    lines += notes
    lines.append(f"pixels: {result.scored_pixels:,} scored, {result.ignored_pixels:,} ignored")
    lines.append(matching_text(result))
    return lines


def render_report(result, console=None) -> None:
    """Print the summary, the per-class table and the headline figures with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for line in summary_lines(result):
        console.print(line, highlight=False, markup=False)
    by_class: dict[int, list[int]] = {}
    for pid, cls in result.mapping.items():
        if cls is not None:
            by_class.setdefault(cls, []).append(pid)
    title = "IoU per class" + (" (sum of per-image matched matrices)" if result.mode == "per-image" else "")
    table = Table(title=title, title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    table.add_column("GT pixels %", justify="right")
    if result.mode == "dataset":
        table.add_column("cluster ids")
    total = max(1, result.scored_pixels)
    for c, name in enumerate(result.class_names):
        row = [str(c), name, _pct(result.iou[c]), f"{100 * result.gt_pixels[c] / total:.2f}"]
        if result.mode == "dataset":
            row.append(_ids_text(by_class.get(c, [])))
        table.add_row(*row)
    console.print(table)
    label = "mean per-image " if result.mode == "per-image" else ""
    console.print(
        f"[bold]{label}mIoU {_pct(result.miou)} %[/bold] · {label}pixel accuracy {_pct(result.pixel_accuracy)} % · "
        f"mIoU over {int(result.present.sum())} of {result.num_classes} classes present",
        highlight=False,
    )


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def result_to_dict(result) -> dict:
    """Every figure of the result as JSON-ready data (fractions in 0..1, NaN as null)."""
    from segcli import __version__

    p, cfg, names = result.pairing, result.config, result.class_names
    data = {
        "tool": f"segcli {__version__}",
        "mode": result.mode,
        "protocol": cfg.protocol,
        "matching": result.method,
        "matching_requested": cfg.matching,
        "matching_note": matching_text(result),
        "preset": result.spec.preset,
        "num_classes": result.num_classes,
        "ignore": result.spec.ignore,
        "palette": result.spec.palette_name,
        "class_names": list(names),
        "pred_dir": str(p.pred_dir) if p.pred_dir else None,
        "gt_dir": str(p.gt_dir) if p.gt_dir else None,
        "gt_layout": p.layout,
        "split": p.split,
        "images": result.num_images,
        "ground_truth_images": p.num_gt,
        "missing_predictions": p.missing,
        "extra_predictions": p.extra,
        "predictions_outside_split": p.outside_split,
        "resized_predictions": result.num_resized,
        "precropped_predictions": result.num_precropped,
        "scored_pixels": result.scored_pixels,
        "ignored_pixels": result.ignored_pixels,
        "miou": _num(result.miou),
        "pixel_accuracy": _num(result.pixel_accuracy),
        "classes_present": int(result.present.sum()),
        "num_pred_ids": result.num_pred_ids,
        "pred_ids": result.pred_ids,
        "mapping": {str(k): v for k, v in result.mapping.items()},
        "mapping_names": {str(k): (names[v] if v is not None else None) for k, v in result.mapping.items()},
        "per_class": [
            {
                "id": c, "name": names[c], "iou": _num(result.iou[c]), "present": bool(result.present[c]),
                "tp": int(result.tp[c]), "gt_pixels": int(result.gt_pixels[c]),
                "pred_pixels": int(result.pred_pixels[c]),
            }  # fmt: skip
            for c in range(result.num_classes)
        ],
        "confusion": {
            "rows": "prediction id (pred_ids order)",
            "columns": "ground-truth class id",
            "counts": np.asarray(result.confusion).tolist(),
        },
        "matched_confusion": {
            "rows": "matched class id; the last row holds unmatched prediction ids",
            "columns": "ground-truth class id",
            "counts": np.asarray(result.matched_confusion).tolist(),
        },
        "workers": result.workers,
        "seconds": round(result.seconds, 3),
    }
    if result.per_image is not None:
        data["method_counts"] = result.method_counts
        data["per_image"] = [
            {
                "name": r.key, "miou": _num(r.miou), "pixel_accuracy": _num(r.pixel_accuracy), "matching": r.method,
                "classes_present": r.classes_present, "scored_pixels": r.scored_pixels,
                "mapping": {str(k): v for k, v in r.mapping.items()},
            }  # fmt: skip
            for r in result.per_image
        ]
    return data


def write_json(result, path) -> None:
    """Write :func:`result_to_dict` to ``path`` (``-`` = standard output)."""
    import sys

    text = json.dumps(result_to_dict(result), indent=1)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    from segcli.io.outputs import atomic_write, check_file_destination

    target = Path(path)
    check_file_destination(target, "--json", create=True)
    data = (text + "\n").encode()
    atomic_write(target, lambda fh: fh.write(data))
