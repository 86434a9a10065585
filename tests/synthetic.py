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


# ---------------------------------------------------------------------------------------------------------------
# Features from a ground-truth label map ("oracle" features): the generator of benchmarks/bench_oracle.py and of
# the stuff tests. Documented there; kept here so that tests and benchmark build the very same features.

def class_embeddings(n_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n_classes, dim) random unit vectors, one per class (nearly orthogonal for dim >> n_classes)."""
    e = np.random.default_rng([seed, 101]).normal(size=(n_classes, dim))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def fill_ignored(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Labels with every invalid pixel replaced by its nearest valid pixel's label (features need a class)."""
    from scipy import ndimage

    if valid.all() or not valid.any():
        return np.where(valid, labels, 0)
    iy, ix = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return labels[iy, ix]


def features_from_labels(labels: np.ndarray, grid: tuple[int, int], embeddings: np.ndarray, is_thing: np.ndarray,
                         noise: float, rng: np.random.Generator, thing_attention: float = 4.0,
                         attention_noise: float = 0.25, cls_noise: float = 0.05) -> dict[str, np.ndarray]:
    """DINO-like patch features of one image from its (H, W) class map (every pixel a class 0..C-1).

    - A patch covers a (H/h) x (W/w) block of pixels; its clean feature is the area-weighted mean of the
      class embeddings of its pixels (patches on a boundary mix their classes, as ViT patches do).
    - ``feats`` = clean + Gaussian noise of total norm about ``noise`` (per-dimension std noise/sqrt(D)),
      then L2-normalised per patch.
    - ``attn``: the area-weighted mean of ``thing_attention`` (things) and 1 (stuff) times a log-normal
      factor exp(attention_noise * N(0, 1)), normalised to sum 1: the CLS token attends to objects.
    - ``cls``: the attention-weighted mean of the patch features plus ``cls_noise`` Gaussian noise per dimension.
    """
    H, W = labels.shape
    h, w = grid
    C, D = embeddings.shape
    cell = (np.minimum(np.arange(H) * h // H, h - 1)[:, None] * w + np.minimum(np.arange(W) * w // W, w - 1)[None]).ravel()
    counts = np.bincount(cell * C + labels.ravel().astype(np.int64), minlength=h * w * C).reshape(h * w, C)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    feats = frac @ embeddings + rng.normal(scale=noise / np.sqrt(D), size=(h * w, D))
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    attn = (frac @ np.where(is_thing, thing_attention, 1.0)) * np.exp(attention_noise * rng.normal(size=h * w))
    attn /= attn.sum()
    cls = attn @ feats + cls_noise * rng.normal(size=D)
    return {"feats": feats.reshape(h, w, D).astype(np.float16), "attn": attn.reshape(h, w).astype(np.float16),
            "cls": cls.astype(np.float32)}


STUFF_COLOURS = ((120, 170, 230), (110, 110, 110), (60, 140, 50), (150, 100, 60))
THING_COLOURS = ((220, 40, 40), (240, 220, 40))


def make_scene_dataset(root: Path, n_images: int = 12, n_stuff: int = 3, n_things: int = 2, size: tuple[int, int] = (120, 160),
                       grid: tuple[int, int] = (8, 10), dim: int = 32, noise: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Street-like scenes: stuff bands whose borders fall between patch borders, one or two objects on top.

    Class ids: 0..n_stuff-1 stuff, n_stuff.. things. Writes root/images/<key>.png and root/features/<key>.npz
    (features_from_labels) and returns {key: ground-truth map}.
    """
    rng = np.random.default_rng(seed)
    H, W = size
    C = n_stuff + n_things
    emb = class_embeddings(C, dim, seed)
    is_thing = np.arange(C) >= n_stuff
    colours = np.array(STUFF_COLOURS[:n_stuff] + THING_COLOURS[:n_things], np.float32)
    gts = {}
    for i in range(n_images):
        gt = np.zeros((H, W), np.int64)
        # Stuff: horizontal bands (e.g. sky / buildings / road) at random heights, not on the 15-px patch rows.
        cuts = np.sort(rng.choice(np.arange(int(0.2 * H), int(0.85 * H)), size=n_stuff - 1, replace=False))
        for s, y in enumerate(cuts, start=1):
            gt[y:] = s
        # Things: one or two boxes.
        for t in range(1 + i % 2):
            bh, bw = rng.integers(int(0.2 * H), int(0.4 * H)), rng.integers(int(0.15 * W), int(0.3 * W))
            y0, x0 = rng.integers(0, H - bh), rng.integers(t * W // 2, (t + 1) * W // 2 - bw)
            gt[y0:y0 + bh, x0:x0 + bw] = n_stuff + (i + t) % n_things
        rgb = np.clip(colours[gt] + rng.normal(scale=8, size=(H, W, 3)), 0, 255).astype(np.uint8)
        key = f"scene{i:03d}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "features").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "images" / f"{key}.png")
        np.savez(root / "features" / f"{key}.npz", **features_from_labels(gt, grid, emb, is_thing, noise, rng))
        gts[key] = gt
    return gts


def matched_ious(preds: dict[str, np.ndarray], gts: dict[str, np.ndarray], n_classes: int) -> np.ndarray:
    """Per-class IoU after dataset-level Hungarian matching (n_classes,)."""
    from scipy.optimize import linear_sum_assignment

    conf = np.zeros((256, n_classes), np.int64)
    for key, gt in gts.items():
        np.add.at(conf, (preds[key].ravel().astype(np.int64), gt.ravel()), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    ious = np.zeros(n_classes)
    for r, c in zip(rows, cols):
        tp = conf[r, c]
        ious[c] = tp / max(conf[r].sum() + conf[:, c].sum() - tp, 1)
    return ious
