"""Object regions of a refined foreground mask and what describes each of them (docs/method.md, "Each stage": regions and classes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def find_regions(fg: np.ndarray, mode: str = "components", min_frac: float = 0.01, min_px: int = 400) -> tuple[np.ndarray, int]:
    """Label map (H, W) int32 with 0 = background and 1..R = regions, and R.

    Components (8-connected) smaller than min(min_frac * area, min_px) pixels are dropped to background:
    the fraction removes speckle in small images, the pixel cap keeps small objects in large ones.
    """
    fg = np.asarray(fg, dtype=bool)
    if mode == "whole":
        return fg.astype(np.int32), int(fg.any())
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32), 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_area = min(min_frac * fg.size, float(min_px))
    keep = sizes >= min_area
    keep[0] = False
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return remap[labels], int(keep.sum())


def split_regions(regions: np.ndarray, patch_labels: np.ndarray, min_area: float) -> tuple[np.ndarray, int]:
    """Split each region along the patch clusters it covers; returns (label map, number of regions).

    Two objects of different kinds that touch (a cyclist beside a car) form one connected component of the
    foreground; their patches fall into different clusters of the image's own k-means. Each (region,
    cluster) piece becomes a region of its own when it has at least ``min_area`` pixels; smaller pieces join
    the nearest kept piece, and a region with no piece that large stays whole. ``patch_labels`` (h, w) is
    resized to the region map's size (nearest).
    """
    regions = np.asarray(regions, dtype=np.int64)
    H, W = regions.shape
    h, w = patch_labels.shape
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    clusters = np.asarray(patch_labels, dtype=np.int64)[np.ix_(ys, xs)]
    out = np.zeros((H, W), np.int32)
    n = 0
    eight = np.ones((3, 3), dtype=bool)
    for r, sl in enumerate(ndimage.find_objects(regions), start=1):
        if sl is None:
            continue
        inside = regions[sl] == r
        kept = 0
        for c in np.unique(clusters[sl][inside]):
            pieces, m = ndimage.label(inside & (clusters[sl] == c), structure=eight)
            sizes = np.bincount(pieces.ravel(), minlength=m + 1)
            for p in np.flatnonzero(sizes[1:] >= min_area) + 1:
                n += 1
                kept += 1
                out[sl][pieces == p] = n
        if kept == 0:
            n += 1
            out[sl][inside] = n
    orphans = (regions > 0) & (out == 0)
    if orphans.any():
        iy, ix = ndimage.distance_transform_edt(out == 0, return_distances=False, return_indices=True)
        out[orphans] = out[iy[orphans], ix[orphans]]
    return out, n


def region_boxes(regions: np.ndarray, n: int, margin: float = 0.1) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) half-open bounding box of each region 1..n, grown by a relative margin and clipped to
    the image (the object plus a little context)."""
    H, W = regions.shape
    boxes = []
    for sl in ndimage.find_objects(regions, max_label=n):
        if sl is None:  # cannot happen for labels from find_regions, kept for safety
            boxes.append((0, 1, 0, 1))
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        my, mx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
        boxes.append((max(0, y0 - my), min(H, y1 + my), max(0, x0 - mx), min(W, x1 + mx)))
    return boxes


def region_crops(rgb: np.ndarray, regions: np.ndarray, n: int, margin: float = 0.1) -> list[np.ndarray]:
    """Bounding-box crop of each region with a relative margin (:func:`region_boxes`)."""
    return [rgb[y0:y1, x0:x1] for y0, y1, x0, x1 in region_boxes(regions, n, margin)]


def regions_on_grid(regions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Region id of each patch: the id at the patch centre (nearest-neighbour downsampling)."""
    H, W = regions.shape
    h, w = grid
    ys = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return regions[np.ix_(ys, xs)]


def pooled_embeddings(regions: np.ndarray, n: int, feats: np.ndarray) -> np.ndarray:
    """Mean patch feature of each region, L2-normalised (the backbone-free region descriptor).

    A region too small to own a patch centre takes the patch under its own centre of mass.
    """
    h, w, d = feats.shape
    flat = np.asarray(feats, dtype=np.float32).reshape(-1, d)
    on_grid = regions_on_grid(regions, (h, w)).ravel()
    sums = np.zeros((n + 1, d), dtype=np.float64)
    np.add.at(sums, on_grid, flat)
    counts = np.bincount(on_grid, minlength=n + 1)
    out = np.zeros((n, d), dtype=np.float32)
    H, W = regions.shape
    for r in range(1, n + 1):
        if counts[r]:
            v = sums[r] / counts[r]
        else:
            cy, cx = ndimage.center_of_mass(regions == r)
            v = flat[min(int(cy * h / H), h - 1) * w + min(int(cx * w / W), w - 1)]
        out[r - 1] = v / max(np.linalg.norm(v), 1e-12)
    return out


def crop_batch(rgb: torch.Tensor, boxes: list[tuple[int, int, int, int]], side: int, mean, std) -> torch.Tensor:
    """Region crops of one (3, H, W) uint8 image tensor (on any device), each resized to side x side
    (bicubic, antialiased) and normalised: the (n, 3, side, side) input of the crop forward.

    ``boxes``: (y0, y1, x0, x1) half-open pixel boxes, as :func:`segcli.method.regions.region_boxes` gives them.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    out = []
    for y0, y1, x0, x1 in boxes:
        c = rgb[None, :, y0:y1, x0:x1].float()
        if c.shape[-2:] != (side, side):
            c = F.interpolate(c, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
            c = c.round_().clamp_(0, 255)  # PIL's resize returns uint8
        out.append(c)
    if not out:
        return torch.zeros((0, 3, side, side), device=rgb.device)
    return (torch.cat(out) / 255.0 - m) / s
