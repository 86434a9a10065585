"""How many mask pixels change between fp32 and ``--precision auto`` (and what auto resolves to here).

    python benchmarks/bench_precision.py [--images DIR] [--backbone NAME] [--weights FILE]

Runs ``segment`` (fit on the images, then predict) twice on the same images, once in fp32 and once with the
default ``--precision auto``, each with its own cache, and compares the label PNGs: the fraction of pixels
whose label differs, and the fraction whose foreground/background decision differs (class ids may be
permuted between two fits; the foreground decision is not). Without --weights a random-weight checkpoint
is used (no DINO weights can be downloaded here): the figure then measures how bf16 rounding propagates
through the method, not the figure real weights would give. On a machine where auto resolves to fp32 the
two runs are the same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "voc-mini" / "images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else REPO / "examples")
    ap.add_argument("--backbone", default="vit_small_patch16_224.dino")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--k", type=int, default=21)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "precision_cpu.json")
    args = ap.parse_args()


    import segcli.vit.compat  # noqa: F401
    from bench_pipeline import random_checkpoint
    from segcli.vit.backbone import resolve_precision, select_device
    from segcli.config import SegmentConfig
    from segcli.io.images import discover_images
    from segcli.io.outputs import read_label_png
    from segcli.pipeline import Segmenter

    items = discover_images(args.images)
    resolved = resolve_precision("auto", select_device("auto"))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights or random_checkpoint(args.backbone, tmp)
        for precision in ("fp32", "auto"):
            cfg = SegmentConfig(backbone=args.backbone, k=args.k)
            t0 = time.perf_counter()
            seg = Segmenter(cfg, weights=weights, precision=precision, cache_dir=tmp / f"cache-{precision}").fit(items)
            seg.predict(items, tmp / precision)
            seconds[precision] = time.perf_counter() - t0
        total = changed = fg_changed = 0
        for path in sorted((tmp / "fp32").rglob("*.png")):
            a = read_label_png(path)
            b = read_label_png(tmp / "auto" / path.relative_to(tmp / "fp32"))
            total += a.size
            changed += int((a != b).sum())
            fg_changed += int(((a > 0) != (b > 0)).sum())
    load = os.getloadavg()
    result = {"auto_resolves_to": resolved, "images": len(items), "pixels": total,
              "label_changed_fraction": changed / total, "foreground_changed_fraction": fg_changed / total,
              "seconds": seconds, "auto_over_fp32_time": seconds["auto"] / seconds["fp32"],
              "weights": str(args.weights) if args.weights else "random", "load_average": load}
    print(f"{len(items)} images from {args.images}; auto -> {resolved}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"pixels whose label differs from fp32: {100 * changed / total:.3f} %; "
          f"whose foreground decision differs: {100 * fg_changed / total:.3f} %")
    print(f"segment time, auto / fp32: {seconds['auto'] / seconds['fp32']:.2f}x "
          f"({seconds['fp32']:.1f} s vs {seconds['auto']:.1f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
