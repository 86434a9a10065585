"""Quality and CPU cost of the refinement stage on real images, with no backbone weights.

    python benchmarks/bench_refine.py                        # ../shared/data/voc-mini and ../shared/data/camvid-val
    python benchmarks/bench_refine.py --voc DIR --camvid DIR --json FILE [--max-images N] [--refiners a b ...]

The foreground masks a ViT would produce are simulated from the ground truth, the way the pipeline sees them:
the image is read at the working resolution (``load_image``), the backbone input size is the pipeline's
(``target_size``: short side 448, long side <= 1344, multiples of 16), and each 16-px patch gets the
foreground fraction of the ground truth resized to that input. Three patch-level inputs:

* ``clean``: the fractions themselves (a perfect soft patch map);
* ``hard``: fractions > 0.5, turned into probabilities by the pipeline's soft score (``fuse`` of three
  agreeing levels, p = 0.964 / 0.036);
* ``noisy``: as ``hard`` with 10 % of the patches flipped, contour patches (4-neighbours of the other
  label) three times likelier, 3 seeds.

Each is upsampled to the image with the pipeline's ``upsample`` and refined by every refiner. Scores:
foreground IoU over the dataset (sum of intersections / sum of unions, ignore pixels excluded), boundary
F-score at 3 px tolerance (mean over images and seeds; ignore pixels take the nearest labelled pixel's
label), and CPU milliseconds per image (process CPU time, all threads; torch runs one thread by default, like
pydensecrf, so that on a shared machine spinning worker threads do not inflate its CPU time). VOC foreground = every object
class (void 255 ignored); CamVid foreground = car, pedestrian, bicyclist, sign_symbol, pole (11 ignored).
Prints one table per dataset and writes every figure as JSON
(``{"voc": {"<refiner>": {"noisy": {"iou", "bf", "ms"}, ...}}, "camvid": ...}``) plus the table text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from segcli.vit.backbone import target_size  # noqa: E402
from segcli.config import SegmentConfig  # noqa: E402
from segcli.method.crf import CRFParams, crf_available, refine_foreground_scaled  # noqa: E402
from segcli.method.foreground import fuse  # noqa: E402
from segcli.io.images import load_image  # noqa: E402
from segcli.pipeline import resize_labels, upsample  # noqa: E402
from segcli.method.refine import RefineParams, refine_foreground_torch, refine_mask  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CAMVID_FG = (2, 6, 8, 9, 10)  # pole, sign_symbol, car, pedestrian, bicyclist
CAMVID_IGNORE = 11
VOC_IGNORE = 255
PATCH = 16
INPUTS = ("clean", "hard", "noisy")
NOISE_SEEDS = (0, 1, 2)
FLIP_FRACTION = 0.10
CONTOUR_WEIGHT = 3.0
BF_TOLERANCE = 3


@dataclass
class Sample:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8 at the working resolution
    fg: np.ndarray  # (H, W) bool ground-truth foreground
    valid: np.ndarray  # (H, W) bool, False on ignore pixels
    fractions: np.ndarray  # (h, w) foreground fraction of each backbone patch


# ---------------------------------------------------------------------------------------------- data
def voc_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a VOC layout (JPEGImages / SegmentationClass) or an images/ + SegmentationClass/ folder."""
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        masks = base / "SegmentationClass"
        if not masks.is_dir():
            continue
        images = base / "JPEGImages" if (base / "JPEGImages").is_dir() else base / "images"
        return _pairs(images, masks)
    raise SystemExit(f"bench_refine: {root} has no SegmentationClass/ folder")


def camvid_pairs(root: Path) -> list[tuple[Path, Path]]:
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise SystemExit(f"bench_refine: {root} needs images/ and labels/")
    return _pairs(root / "images", root / "labels")


def _pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    return [(by_stem[m.stem], m) for m in sorted(masks.glob("*.png")) if m.stem in by_stem]


def load_sample(image: Path, mask: Path, dataset: str, cfg: SegmentConfig) -> Sample:
    """The image as the pipeline reads it, its ground truth at that size, and its patch foreground fractions."""
    rgb = load_image(image, cfg.work_max_side).rgb
    gt = np.array(Image.open(mask))
    if gt.ndim == 3:
        gt = gt[..., 0]
    gt = resize_labels(gt, rgb.shape[:2])
    if dataset == "voc":
        valid, fg = gt != VOC_IGNORE, (gt > 0) & (gt != VOC_IGNORE)
    else:
        valid, fg = gt != CAMVID_IGNORE, np.isin(gt, CAMVID_FG)
    H, W = rgb.shape[:2]
    th, tw = target_size(H, W, PATCH, cfg.short_side, cfg.max_side)
    # Foreground fraction of each patch of the backbone input, among its labelled pixels.
    t = torch.from_numpy(np.stack([fg & valid, valid]).astype(np.float32))[None]
    t = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    t = F.avg_pool2d(t, PATCH)[0].numpy()
    fractions = np.where(t[1] > 1e-3, t[0] / np.maximum(t[1], 1e-3), 0.0).astype(np.float32)
    return Sample(image.stem, rgb, fg, valid, np.clip(fractions, 0.0, 1.0))


def soft_score(hard: np.ndarray) -> np.ndarray:
    """The pipeline's soft foreground of a patch mask that all three levels agree on."""
    return fuse([hard, hard, hard], "majority")[1]


def noisy_mask(hard: np.ndarray, seed: int) -> np.ndarray:
    """``hard`` with FLIP_FRACTION of its patches flipped, contour patches CONTOUR_WEIGHT times likelier."""
    rng = np.random.default_rng([seed, hard.shape[0], hard.shape[1]])
    pad = np.pad(hard, 1, mode="edge")
    contour = ((pad[:-2, 1:-1] != hard) | (pad[2:, 1:-1] != hard) | (pad[1:-1, :-2] != hard) | (pad[1:-1, 2:] != hard))
    weights = np.where(contour, CONTOUR_WEIGHT, 1.0).ravel()
    n = int(round(FLIP_FRACTION * hard.size))
    flip = rng.choice(hard.size, size=n, replace=False, p=weights / weights.sum())
    out = hard.copy().ravel()
    out[flip] = ~out[flip]
    return out.reshape(hard.shape)


def patch_inputs(sample: Sample) -> dict[str, list[np.ndarray]]:
    """The three patch-level inputs (a list per kind: one map, or one per noise seed), upsampled to the image."""
    size = sample.rgb.shape[:2]
    hard = sample.fractions > 0.5
    return {
        "clean": [upsample(sample.fractions, size)],
        "hard": [upsample(soft_score(hard), size)],
        "noisy": [upsample(soft_score(noisy_mask(hard, s)), size) for s in NOISE_SEEDS],
    }


# ---------------------------------------------------------------------------------------------- scores
def _filled(fg: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Ground truth with every ignore pixel given the label of the nearest labelled pixel."""
    if valid.all() or not valid.any():
        return fg
    idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return fg[idx[0], idx[1]]


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=1) | (~mask & ~ndimage.binary_erosion(~mask, border_value=1))


def boundary_f(pred: np.ndarray, gt: np.ndarray, tol: int = BF_TOLERANCE) -> float:
    """Boundary F-score: boundary pixels of each side within ``tol`` px of the other side's boundary."""
    bp, bg = _boundary(pred), _boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    dg = ndimage.distance_transform_edt(~bg)
    dp = ndimage.distance_transform_edt(~bp)
    precision = float((dg[bp] <= tol).mean())
    recall = float((dp[bg] <= tol).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class Score:
    def __init__(self) -> None:
        self.inter = self.union = 0
        self.bf: list[float] = []
        self.cpu = 0.0
        self.wall = 0.0
        self.n = 0

    def add(self, pred: np.ndarray, sample: Sample, gt_filled: np.ndarray, cpu: float, wall: float) -> None:
        v = sample.valid
        self.inter += int((pred & sample.fg & v).sum())
        self.union += int(((pred | sample.fg) & v).sum())
        self.bf.append(boundary_f(pred, gt_filled))
        self.cpu += cpu
        self.wall += wall
        self.n += 1

    def as_dict(self) -> dict[str, float]:
        return {"iou": 100.0 * self.inter / max(self.union, 1), "bf": 100.0 * float(np.mean(self.bf)),
                "ms": 1000.0 * self.cpu / max(self.n, 1), "wall_ms": 1000.0 * self.wall / max(self.n, 1), "runs": self.n}


# ---------------------------------------------------------------------------------------------- refiners
Refiner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def refiners() -> dict[str, Refiner]:
    """Every refiner and setting measured; ``default`` is what ``segcli segment`` runs with its defaults."""
    cfg = SegmentConfig()
    crf = CRFParams(iterations=cfg.crf_iterations)
    out: dict[str, Refiner] = {"none": lambda rgb, p: p > 0.5}
    if crf_available():
        out["densecrf-full"] = lambda rgb, p: refine_foreground_scaled(rgb, p, crf, 0)
        out["densecrf-320"] = lambda rgb, p: refine_foreground_scaled(rgb, p, crf, 320)
        out["densecrf-160"] = lambda rgb, p: refine_foreground_scaled(rgb, p, crf, 160)
    out["meanfield"] = lambda rgb, p: refine_foreground_torch(rgb, p, RefineParams())
    # The frontier around the shipped setting: colour bin width (VOC prefers wide, CamVid narrow) and iterations.
    for bw in (6, 7, 10):
        out[f"meanfield-bin{bw}"] = lambda rgb, p, bw=bw: refine_foreground_torch(rgb, p, RefineParams(bin_width=bw))
    out["meanfield-5it"] = lambda rgb, p: refine_foreground_torch(rgb, p, RefineParams(iterations=5))
    out["default"] = lambda rgb, p: refine_mask(rgb, p, cfg.refine, cfg.crf_iterations, cfg.crf_max_side)
    return out


# ---------------------------------------------------------------------------------------------- run
def run_dataset(name: str, pairs: list[tuple[Path, Path]], chosen: dict[str, Refiner], cfg: SegmentConfig,
                progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    scores = {r: {k: Score() for k in INPUTS} for r in chosen}
    for i, (image, mask) in enumerate(pairs):
        sample = load_sample(image, mask, name, cfg)
        gt_filled = _filled(sample.fg, sample.valid)
        for kind, maps in patch_inputs(sample).items():
            for prob in maps:
                for rname, fn in chosen.items():
                    c0, w0 = time.process_time(), time.perf_counter()
                    pred = np.asarray(fn(sample.rgb, prob), dtype=bool)
                    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                    scores[rname][kind].add(pred, sample, gt_filled, cpu, wall)
        if progress:
            print(f"\r{name}: {i + 1}/{len(pairs)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {r: {k: s.as_dict() for k, s in per.items()} for r, per in scores.items()}


def table(name: str, n_images: int, results: dict[str, dict[str, dict[str, float]]]) -> str:
    head = f"{name} ({n_images} images)   " + "   ".join(f"{k:>5} IoU   BF" for k in INPUTS)
    lines = [head + "   CPU ms/img  x densecrf-160", "-" * (len(head) + 30)]
    ref = results.get("densecrf-160", {}).get("noisy", {}).get("ms")
    for rname, per in results.items():
        ms = float(np.mean([per[k]["ms"] for k in INPUTS]))
        ratio = f"{ms / float(np.mean([results['densecrf-160'][k]['ms'] for k in INPUTS])):10.2f}" if ref else " " * 10
        cells = "   ".join(f"{per[k]['iou']:9.2f} {per[k]['bf']:5.1f}" for k in INPUTS)
        lines.append(f"{rname:<{len(name) + 14}}   {cells}   {ms:10.0f}  {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voc", type=Path, default=DATA / "voc-mini")
    ap.add_argument("--camvid", type=Path, default=DATA / "camvid-val")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "refine_cpu.json")
    ap.add_argument("--max-images", type=int, default=None, help="at most this many images per dataset (evenly spaced)")
    ap.add_argument("--refiners", nargs="*", default=None, help="only these refiners (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as pydensecrf uses one: CPU ms then compare like with like)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    cfg = SegmentConfig()
    every = refiners()
    chosen = {k: v for k, v in every.items() if args.refiners is None or k in args.refiners}
    unknown = set(args.refiners or ()) - set(every)
    if unknown:
        raise SystemExit(f"bench_refine: unknown refiners {sorted(unknown)}; choose from {sorted(every)}")
    results: dict[str, dict] = {}
    texts = []
    load = os.getloadavg()
    for name, root, finder in (("voc", args.voc, voc_pairs), ("camvid", args.camvid, camvid_pairs)):
        if root is None or not Path(root).is_dir():
            print(f"bench_refine: {name}: {root} not found, skipped", file=sys.stderr)
            continue
        pairs = finder(Path(root))
        if args.max_images and len(pairs) > args.max_images:
            pairs = [pairs[int(i)] for i in np.linspace(0, len(pairs) - 1, args.max_images).round()]
        results[name] = run_dataset(name, pairs, chosen, cfg)
        texts.append(table(name, len(pairs), results[name]))
    header = (f"# python benchmarks/bench_refine.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"# {platform.node()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
              f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}\n"
              f"# IoU / BF (boundary F at {BF_TOLERANCE} px) in points; CPU ms = process CPU time per image (all threads)")
    text = header + "\n\n" + "\n\n".join(texts) + "\n"
    print(text)
    results["meta"] = {"load_average": list(load), "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
                       "default_refine": cfg.refine}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.json.with_suffix(".txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
