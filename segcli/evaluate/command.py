"""``segcli evaluate PRED_DIR GT``: the Typer command (registered by segcli/cli.py).

Module-level imports stay light (typer, pathlib, typing, enum) so that ``segcli --help`` is fast; the
evaluation itself is imported when the command runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from segcli.io import storage
from segcli.evaluate.config import EvaluationConfig
from segcli.io.storage import parse_option


class PresetName(str, Enum):
    voc = "voc"
    camvid = "camvid"
    cityscapes27 = "cityscapes27"
    cocostuff27 = "cocostuff27"


class Protocol(str, Enum):
    full = "full"
    stego = "stego"


class Matching(str, Enum):
    auto = "auto"
    hungarian = "hungarian"
    majority = "majority"


def evaluate_command(
    pred_dir: Annotated[
        Path,
        typer.Argument(metavar="PRED_DIR", help="Folder of predicted label PNGs (pixel value = cluster id 0..255); or an s3:// / gs:// prefix.",
                       parser=parse_option),
    ],
    gt: Annotated[
        Path,
        typer.Argument(
            metavar="GT",
            help="Ground-truth folder, paired by relative path and name; or a VOC layout (VOCdevkit, VOC2012 or "
            "its SegmentationClass); either may be an s3:// / gs:// prefix.",
            parser=parse_option,
        ),
    ],
    preset: Annotated[
        Optional[PresetName],
        typer.Option(
            "--preset",
            help="Dataset labels: voc (21 classes, ignore 255), camvid (11, ignore 11), cityscapes27 (labelId-7), "
            "cocostuff27 (STEGO's fine-to-coarse map).",
            show_default=False,
        ),
    ] = None,
    num_classes: Annotated[
        Optional[int],
        typer.Option(
            "--num-classes",
            help="Number of ground-truth classes (ids 0..N-1) when there is no preset.",
            show_default=False,
        ),
    ] = None,
    ignore: Annotated[
        Optional[int],
        typer.Option("--ignore", help="Ground-truth value to drop (default 255, or the preset's).", show_default=False),
    ] = None,
    palette: Annotated[
        Optional[str],
        typer.Option(
            "--palette",
            help="Decode colour-coded (RGB) ground truth with a palette: voc, camvid, cityscapes, or a file of "
            "'R G B' / 'VALUE R G B' lines.",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        Optional[str],
        typer.Option(
            "--split",
            help="Score only this split: a VOC ImageSets/Segmentation name (val, train, ...) or a file of ids.",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            "--protocol",
            help="full: ground-truth resolution. stego: both sides resized to 320 on the short side (nearest) and "
            "centre-cropped to 320x320, as STEGO evaluates.",
        ),
    ] = Protocol.full,
    matching: Annotated[
        Matching,
        typer.Option(
            "--matching",
            help="auto: Hungarian when predicted ids <= classes, many-to-one majority when there are more.",
        ),
    ] = Matching.auto,
    num_clusters: Annotated[
        Optional[int],
        typer.Option(
            "--num-clusters",
            help="Predicted ids are 0..K-1 (default: the distinct ids found in the predictions).",
            show_default=False,
        ),
    ] = None,
    per_image: Annotated[
        bool,
        typer.Option(
            "--per-image",
            help="PER-IMAGE matching (a different figure from the dataset protocol): match every image on its own "
            "and average the per-image mIoU.",
        ),
    ] = False,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Score the pairs that exist when some predictions or ground-truth files are missing.",
        ),
    ] = False,
    strict_size: Annotated[
        bool,
        typer.Option(
            "--strict-size",
            help="A prediction whose size differs from its ground truth is an error (default: nearest resize).",
        ),
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-j", help="Processes to use (default: all available cores).", show_default=False),
    ] = None,
    json_out: Annotated[
        Optional[Path],
        typer.Option(
            "--json",
            help="Write every figure, the confusion matrices and the mapping as JSON ('-': stdout).",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            help="Save a picture of the confusion matrix after matching (PNG, SVG or PDF).",
            show_default=False,
        ),
    ] = None,
    remap_out: Annotated[
        Optional[Path],
        typer.Option(
            "--remap-out",
            help="Write the predictions recoloured with their matched class ids (255 = unmatched) into this folder.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Score predicted label PNGs against ground truth: Hungarian-matched mIoU, pixel accuracy, per-class IoU."""
    import sys

    from rich.console import Console

    from segcli.evaluate.api import evaluate
    from segcli.evaluate.report import render_report, write_json

    config = EvaluationConfig(
        preset=preset.value if preset is not None else None,
        num_classes=num_classes,
        ignore=ignore,
        palette=palette,
        split=split,
        protocol=protocol.value,
        matching=matching.value,
        num_clusters=num_clusters,
        per_image=per_image,
        allow_missing=allow_missing,
        strict_size=strict_size,
        workers=workers,
    )
    json_to_stdout = json_out is not None and str(json_out) == "-"
    from segcli.io.outputs import check_apart_from_inputs

    # Never write among the inputs: --remap-out apart from both folders, --json/--plot not over or among them.
    inputs = [storage.location(p) for p in (pred_dir, gt)]
    check_apart_from_inputs({"--remap-out": remap_out}, [p for p in inputs if storage.is_dir(p)],
                            [p for p in inputs if storage.is_file(p)],
                            {"--json": None if json_to_stdout else json_out, "--plot": plot})
    from segcli.io.outputs import check_file_destination

    for option, target in (("--json", None if json_to_stdout else json_out), ("--plot", plot)):
        if target is not None:  # before the scoring, which may take minutes
            check_file_destination(target, option)
    console = Console(stderr=json_to_stdout)
    err = Console(stderr=True)

    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
        ) as bar:
            task = bar.add_task("scoring", total=None)
            result = evaluate(pred_dir, gt, config, lambda done, total: bar.update(task, completed=done, total=total))
    else:
        result = evaluate(pred_dir, gt, config)

    render_report(result, console)
    if json_out is not None:
        write_json(result, json_out)
        if not json_to_stdout:
            console.print(f"wrote {json_out}", highlight=False, markup=False)
    if plot is not None:
        from segcli.evaluate.plot import plot_confusion

        plot_confusion(result, plot)
        console.print(f"wrote {plot}", highlight=False, markup=False)
    if remap_out is not None:
        from segcli.evaluate.remap import write_remapped

        n = write_remapped(result, remap_out, workers)
        console.print(f"wrote {n} remapped predictions to {remap_out}", highlight=False, markup=False)
    sys.stdout.flush()
