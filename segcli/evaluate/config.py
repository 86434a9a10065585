"""Options of one evaluation run (light: no numpy, so the CLI can import it for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("full", "stego")
MATCHINGS = ("auto", "hungarian", "majority")


@dataclass(frozen=True)
class EvaluationConfig:
    """How to read the labels and how to score them; every field has the CLI option of the same name.

    preset:        ``voc`` | ``camvid`` | ``cityscapes27`` | ``cocostuff27`` (classes, ignore value, names).
    num_classes:   number of ground-truth classes when there is no preset (ids 0..num_classes-1).
    ignore:        ground-truth value whose pixels are dropped (default 255 without a preset).
    palette:       name (``voc``, ``camvid``, ``cityscapes``) or file of a colour table, to decode RGB ground truth.
    split:         VOC split name (``ImageSets/Segmentation/<split>.txt``) or a file of ids, one per line.
    protocol:      ``full`` (ground-truth resolution) or ``stego`` (both sides: short side 320, centre crop 320).
    matching:      ``auto`` (Hungarian if predicted ids <= classes, else majority), ``hungarian``, ``majority``.
    num_clusters:  take the predicted ids to be 0..num_clusters-1 instead of the ids found in the predictions.
    per_image:     match every image on its own (a different, clearly named figure), not the dataset matrix.
    allow_missing: score the pairs that exist when predictions or ground-truth files are missing.
    strict_size:   a prediction whose size differs from its ground truth is an error (default: nearest resize).
    workers:       processes to use (default: the cores this process may run on).
    """

    preset: str | None = None
    num_classes: int | None = None
    ignore: int | None = None
    palette: str | None = None
    split: str | None = None
    protocol: str = "full"
    matching: str = "auto"
    num_clusters: int | None = None
    per_image: bool = False
    allow_missing: bool = False
    strict_size: bool = False
    workers: int | None = None


def available_cores() -> int:
    """Cores this process may run on (respects affinity masks / cgroups' cpusets)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
