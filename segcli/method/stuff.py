"""Stuff classes of the background (``--stuff N``): scenes, not only objects.

The three clustering levels separate objects ("things") from a background. In street and indoor scenes
that background is most of the picture and holds several classes of its own (sky, road, building, tree).
With ``--stuff N`` the background patches of the dataset are clustered into N stuff classes (a bounded
sample, fitted with the model and saved in it); every background patch takes its nearest stuff class, the
per-class probabilities are upsampled and refined with the image by a multi-label dense CRF (so stuff
boundaries follow colour edges, as the foreground's do), and the objects are laid over that map.

Class ids: 0..N-1 are stuff, N..k-1 things (``SegmentConfig.thing_offset``).

Probabilities: a patch x (L2-normalised) and stuff centroid c get the logit ``-|x - c|^2 / (2 T)`` with
``T = STUFF_TEMPERATURE``, then a softmax over the N classes. The arg-max is the nearest centroid (k-means'
own assignment); for unit vectors and unit centroids the logit is ``cos(x, c) / T`` up to a constant, i.e. a
softmax of cosine similarity at temperature 0.1, the student temperature of DINO. Patches of an object
have no stuff of their own: they take the probabilities of the nearest background patch, so pixels that
the object regions do not cover in the end (dropped specks, CRF-trimmed edges) get the surrounding stuff.
"""

from __future__ import annotations

import numpy as np

from segcli.config import SegmentConfig
from segcli.method.kmeans import KMeans

STUFF_TEMPERATURE = 0.1


def fit_stuff(sample: np.ndarray, n: int, seed: int, max_samples: int) -> np.ndarray:
    """(n, D) float32 stuff centroids from a sample of background patch features (k-means).

    Centroids come sorted by cluster size (the KMeans contract), so stuff id 0 is the largest stuff class.
    """
    km = KMeans(n, seed=seed, max_samples=max_samples).fit(np.asarray(sample, dtype=np.float32))
    return km.cluster_centers_.astype(np.float32)


def stuff_probabilities(feats: np.ndarray, fg_grid: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, h, w) float32 stuff-class probabilities of each patch of one image.

    ``feats``: (h, w, D) patch features; ``fg_grid``: (h, w) bool, True on object patches, which take the
    probabilities of their nearest background patch (their own when the image has no background patch).
    """
    from scipy import ndimage

    h, w, d = feats.shape
    x = np.asarray(feats, dtype=np.float32).reshape(-1, d)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = np.asarray(centroids, dtype=np.float32)
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None]
    logits = -d2 / (2.0 * STUFF_TEMPERATURE)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    p = p.T.reshape(len(c), h, w)
    fg = np.asarray(fg_grid, dtype=bool)
    if fg.any() and not fg.all():
        iy, ix = ndimage.distance_transform_edt(fg, return_distances=False, return_indices=True)
        p = p[:, iy, ix]
    return np.ascontiguousarray(p, dtype=np.float32)


def refine_stuff(rgb: np.ndarray, probs: np.ndarray, config: SegmentConfig, device=None) -> np.ndarray:
    """(H, W) stuff ids from (N, H, W) probabilities at the image's size: the one place that refines them,
    with the foreground's refiner (``--refine``; ``--no-crf``: the arg-max) on ``device``."""
    from segcli.method.refine import refine_label_map

    method = config.refine if config.crf else "none"
    return refine_label_map(rgb, probs, method, config.crf_iterations, config.crf_max_side, device)
