"""How fit (`cluster-dataset`) and predict (`segment --model`) grow with the number of images.

    python benchmarks/bench_scaling.py [--sizes 100 1000 10000] [--grid 16 20] [--dim 64]

Synthetic data (no backbone, so the figures isolate segcli's own work): small images with one or two
objects and their features in the documented `--features` format (feature, CLS and attention arrays),
written once to a temporary folder. Every fit and predict runs in a fresh process through the real CLI, and
its peak resident memory (ru_maxrss) is read from that process. Prints a table; target: time linear in the
number of images (constant per image), memory flat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, time
from segcli.cli import app
t = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""


def make_data(root: Path, n: int, grid: tuple[int, int], dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    h, w = grid
    protos = rng.normal(size=(4, dim)).astype(np.float32)
    protos[0, 0], protos[1:, 0] = -3.0, 3.0  # background vs the three object classes
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls_grid = np.zeros((h, w), np.int64)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        c = 1 + i % 3
        cls_grid[y: y + h // 2, x: x + w // 2] = c
        feats = protos[cls_grid] + 0.3 * rng.normal(size=(h, w, dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        attn = np.where(cls_grid > 0, 2.0, 0.5)
        np.savez(root / "features" / f"img{i:06d}.npz", feats=feats.astype(np.float16),
                 cls=(protos[c] + 0.05 * rng.normal(size=dim)).astype(np.float32),
                 attn=(attn / attn.sum()).astype(np.float16))
        rgb = (np.array([[60, 80, 60], [200, 50, 50], [50, 50, 200], [220, 200, 40]], np.uint8)[cls_grid]
               .repeat(8, 0).repeat(8, 1))
        Image.fromarray(rgb).save(root / "images" / f"img{i:06d}.png")


def run_cli(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode not in (0, None):
        raise SystemExit(f"segcli failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--grid", type=int, nargs=2, default=[16, 20])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--assign", default="pooled", choices=["pooled", "parts"])
    ap.add_argument("--crf", action="store_true", help="keep the CRF on (a constant ~50 ms per image here)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            root = tmp / f"n{n}"
            t0 = time.perf_counter()
            make_data(root, n, tuple(args.grid), args.dim)
            gen = time.perf_counter() - t0
            common = ["--features", str(root / "features"), "--k", "4", "--assign", args.assign,
                      "--cache", str(root / "cache"), "--quiet", "--max-samples", "20000",
                      "--crf" if args.crf else "--no-crf"]
            fit = run_cli(["cluster-dataset", str(root / "images"), "--out", str(root / "m.segcli"), *common])
            pred = run_cli(["segment", str(root / "images"), "--model", str(root / "m.segcli"),
                            "--out", str(root / "masks"), "--features", str(root / "features"),
                            "--cache", str(root / "cache2"), "--quiet"])
            rows.append((n, gen, fit, pred, (root / "m.segcli").stat().st_size))
            print(f"  done n={n}", file=sys.stderr, flush=True)
    print(f"segcli scaling benchmark: synthetic {args.grid[0]}x{args.grid[1]} patch grids, D={args.dim}, "
          f"--assign {args.assign}, CRF {'on' if args.crf else 'off'} (128x160 images), 1 process per run")
    print(f"{'images':>8}{'fit s':>9}{'fit ms/img':>12}{'fit MB':>9}{'predict s':>11}{'pred ms/img':>13}{'pred MB':>9}{'model KB':>10}")
    for n, _, fit, pred, size in rows:
        print(f"{n:>8}{fit['seconds']:>9.1f}{1000 * fit['seconds'] / n:>12.2f}{fit['peak_mb']:>9.0f}"
              f"{pred['seconds']:>11.1f}{1000 * pred['seconds'] / n:>13.2f}{pred['peak_mb']:>9.0f}{size / 1024:>10.0f}")
    if len(rows) > 1:
        (n0, _, f0, p0, _), (n1, _, f1, p1, _) = rows[0], rows[-1]
        print(f"from {n0} to {n1} images ({n1 / n0:.0f}x): fit time x{f1['seconds'] / f0['seconds']:.1f}, "
              f"predict time x{p1['seconds'] / p0['seconds']:.1f}, fit memory x{f1['peak_mb'] / f0['peak_mb']:.2f}, "
              f"predict memory x{p1['peak_mb'] / p0['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
