"""A synthetic dataset whose answer is known: images, ground-truth masks and features built from them.

Each image has a textured background and one or two axis-aligned objects on the 16-px patch grid; each
object class has its own colour and its own feature prototype (optionally two prototypes: a top and a
bottom *part*), patch features are prototype + noise, attention is high on objects, and the CLS token is
the mean prototype of the image's objects. The method must recover the masks from these features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PATCH = 16
COLOURS = {0: (70, 90, 60), 1: (220, 40, 40), 2: (40, 60, 220), 3: (240, 220, 40)}


def make_dataset(root: Path, n_images: int = 12, n_classes: int = 3, dim: int = 32, grid: tuple[int, int] = (8, 10),
                 noise: float = 0.25, parts: bool = False, seed: int = 0, nested: bool = True,
                 proposal: bool = False) -> dict[str, np.ndarray]:
    """Write root/images/<key>.png and root/features/<key>.npz; return {key: ground-truth mask}.

    proposal: also store a ``proposal`` array, the patch mask of the image's first object only (like
    MaskDistill's one-object proposal on an image with two objects).
    """
    rng = np.random.default_rng(seed)
    h, w = grid
    # Like DINO keys, the foreground/background contrast is the dominant direction of the features, and
    # classes (and parts) differ along other directions: row 0 is background, then (top, bottom) per class.
    axis = np.zeros(dim, np.float32)
    axis[0] = 1.0
    protos = 0.6 * rng.normal(size=(1 + n_classes * 2, dim)).astype(np.float32)
    protos[:, 0] = 0.0
    protos[0] -= 2.0 * axis
    protos[1:] += 2.0 * axis
    gts = {}
    for i in range(n_images):
        key = f"set{i % 2}/img{i:03d}" if nested else f"img{i:03d}"
        cls_grid = np.zeros((h, w), np.int64)
        part_grid = np.zeros((h, w), np.int64)
        classes = [1 + (i % n_classes)] + ([1 + ((i + 1) % n_classes)] if i % 3 == 0 else [])
        boxes = [(1, 1, 5, 5), (2, 6, 6, 9)]
        for c, (y0, x0, y1, x1) in zip(classes, boxes):
            cls_grid[y0:y1, x0:x1] = c
            mid = (y0 + y1) // 2
            part_grid[y0:mid, x0:x1] = 2 * c - 1
            part_grid[mid:y1, x0:x1] = 2 * c if parts else 2 * c - 1
        feats = protos[part_grid] + noise * rng.normal(size=(h, w, dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        attn = np.where(cls_grid > 0, 2.0, 0.5) * np.exp(0.1 * rng.normal(size=(h, w)))
        attn = attn / attn.sum()
        cls = np.mean([protos[2 * c - 1] for c in classes], axis=0) + 0.05 * rng.normal(size=dim)
        mask = np.kron(cls_grid, np.ones((PATCH, PATCH), np.int64))
        rgb = np.array([COLOURS[c] for c in range(n_classes + 1)], np.float32)[mask]
        rgb = np.clip(rgb + rng.normal(scale=8, size=rgb.shape), 0, 255).astype(np.uint8)
        img_path = root / "images" / f"{key}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(img_path)
        feat_path = root / "features" / f"{key}.npz"
        feat_path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"proposal": cls_grid == classes[0]} if proposal else {}
        np.savez(feat_path, feats=feats.astype(np.float16), cls=cls.astype(np.float32), attn=attn.astype(np.float16), **extra)
        gts[key] = mask
    return gts


def matched_miou(preds: dict[str, np.ndarray], gts: dict[str, np.ndarray], n_classes: int) -> float:
    """Dataset-level Hungarian-matched mIoU (a small independent implementation for tests)."""
    from scipy.optimize import linear_sum_assignment

    conf = np.zeros((256, n_classes), np.int64)
    for key, gt in gts.items():
        np.add.at(conf, (preds[key].ravel().astype(np.int64), gt.ravel()), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = dict(zip(rows, cols))
    ious = []
    for c in range(n_classes):
        pred_ids = [r for r, cc in mapping.items() if cc == c]
        tp = sum(conf[r, c] for r in pred_ids)
        fp = sum(conf[r].sum() for r in pred_ids) - tp
        fn = conf[:, c].sum() - tp
        ious.append(tp / max(tp + fp + fn, 1))
    return float(np.mean(ious))
