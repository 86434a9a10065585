"""Benchmark of `segcli evaluate`: 1449 synthetic VOC-sized label pairs (the size of VOC 2012 val).

    python benchmarks/bench_evaluate.py                 # 1449 pairs of 500x375, 1 worker and all workers
    python benchmarks/bench_evaluate.py --images 200 --workers 1 2 4

Ground truth: mode-P PNGs with the VOC palette, background plus 1-4 rectangles / ellipses of random classes
out of 21, outlined by a 5-pixel void (255) band, as in VOC. Predictions: the class ids permuted, object
outlines shifted by a few pixels, so both sides compress and decode like real masks. Everything lives in a
temporary folder that is removed afterwards. Prints one row per worker count: images/s and total seconds of
the evaluate() API (pairing, reading, scoring, matching; no report).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segcli.evaluate import EvaluationConfig, evaluate
from segcli.evaluate.config import available_cores
from segcli.evaluate.palettes import voc_colours

W, H, CLASSES = 500, 375, 21
PALETTE = [v for c in voc_colours() for v in c]


def perm(c: int) -> int:
    return (c * 5 + 3) % CLASSES  # a bijection of 0..20: the "cluster id" of class c


def draw_pair(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    gt = Image.new("P", (W, H), 0)
    pred = Image.new("P", (W, H), perm(0))
    g, p = ImageDraw.Draw(gt), ImageDraw.Draw(pred)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, CLASSES))
        x0, y0 = int(rng.integers(0, W - 60)), int(rng.integers(0, H - 60))
        x1, y1 = x0 + int(rng.integers(40, W - x0)), y0 + int(rng.integers(40, H - y0))
        shape = g.ellipse if rng.random() < 0.5 else g.rectangle
        shape((x0, y0, x1, y1), fill=cls, outline=255, width=5)
        dx, dy = (int(v) for v in rng.integers(-8, 9, 2))
        pshape = p.ellipse if shape == g.ellipse else p.rectangle
        pshape((x0 + dx, y0 + dy, x1 + dx, y1 + dy), fill=perm(cls))
    gt.putpalette(PALETTE)
    pred.putpalette(PALETTE)
    return pred, gt


def make_dataset(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "pred").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in range(n):
        pred, gt = draw_pair(rng)
        name = f"2008_{i:06d}.png"
        pred.save(root / "pred" / name)
        gt.save(root / "gt" / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1449)
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 1 and all cores)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per worker count; the best is reported")
    args = ap.parse_args()
    cores = available_cores()
    counts = args.workers or sorted({1, cores})

    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    try:
        t0 = time.perf_counter()
        make_dataset(tmp, args.images)
        made = time.perf_counter() - t0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"segcli evaluate benchmark: {args.images} synthetic VOC-sized pairs ({W}x{H}, mode P, 21 classes + void)"
        )
        print(f"machine: {platform.processor() or platform.machine()}, {cores} cores available, "
              f"load average {load:.2f} at start; python {platform.python_version()}")  # fmt: skip
        print(f"dataset written in {made:.1f} s (not timed below)")
        evaluate(tmp / "pred", tmp / "gt", EvaluationConfig(preset="voc", workers=1))  # warm-up: imports, page cache
        print()
        print(f"{'workers':>7}  {'total s':>8}  {'images/s':>9}  {'Mpixel/s':>9}  {'mIoU %':>7}  matching")
        for w in counts:
            best = None
            for _ in range(args.repeat):
                t = time.perf_counter()
                res = evaluate(tmp / "pred", tmp / "gt", EvaluationConfig(preset="voc", workers=w))
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
            mpx = args.images * W * H / best / 1e6
            row = f"{w:>7}  {best:>8.2f}  {args.images / best:>9.0f}  {mpx:>9.1f}  {100 * res.miou:>7.2f}"
            print(f"{row}  {res.method}")
        import resource

        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"\npeak resident memory: main process {parent:.0f} MB, largest worker {child:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
