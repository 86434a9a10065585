"""Foreground masks from three clustering levels and their fusion (docs/method.md, "Each stage": the three levels, which cluster is foreground, fusion).

A k-means cluster of patch features is not yet "foreground" or "background": it is labelled by how much
the CLS token attends to its patches (salient objects draw attention) and, when two clusters draw about
the same attention, by how many of its patches lie on the image border (backgrounds touch the frame).
Attention is compared after dividing each image's map by its mean, so images of different sizes and
numbers of patches weigh the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcli.method.kmeans import KMeans, assign_nearest

# Two clusters whose mean normalised attention differs by less than this are tied on attention.
ATTENTION_TIE = 0.05
# k-means restarts of the image level (one image's patches, k = 2 by default). Every other fit runs 3; here
# one is kept: on the oracle benchmark (voc-mini, noise 1.25) 3 restarts gave the same mIoU (41.9 %) and pixel
# accuracy (92.2 %) as 1 (issue 19, docs/incoming/issue19.md), and the device engine's batched k-means
# (segcli.method.batched) runs one restart, so both engines stay alike.
IMAGE_LEVEL_N_INIT = 1


def normalised_attention(attn: np.ndarray) -> np.ndarray:
    """Attention divided by its image mean (1.0 = average patch)."""
    a = np.asarray(attn, dtype=np.float32)
    m = float(a.mean()) if a.size else 0.0
    return a / m if m > 0 else np.ones_like(a)


def border_grid(h: int, w: int) -> np.ndarray:
    """Boolean (h, w) grid, True on the outermost ring of patches."""
    b = np.zeros((h, w), dtype=bool)
    b[0, :] = b[-1, :] = True
    b[:, 0] = b[:, -1] = True
    return b


def label_clusters(labels: np.ndarray, n_clusters: int, attn: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Decide which clusters are foreground; returns a (n_clusters,) bool array.

    Clusters are ranked by mean normalised attention (higher first), ties (within ATTENTION_TIE) broken by
    border share (lower first). With two clusters the first is foreground; with more, every cluster whose
    mean attention is above the overall mean is, always keeping at least one of each kind.
    """
    labels = np.asarray(labels).ravel()
    attn = np.asarray(attn, dtype=np.float64).ravel()
    border = np.asarray(border, dtype=np.float64).ravel()
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    safe = np.maximum(counts, 1)
    mean_attn = np.bincount(labels, weights=attn, minlength=n_clusters) / safe
    border_share = np.bincount(labels, weights=border, minlength=n_clusters) / safe
    # Empty clusters can never be foreground.
    mean_attn[counts == 0] = -np.inf
    border_share[counts == 0] = np.inf

    fg = np.zeros(n_clusters, dtype=bool)
    if n_clusters == 2:
        fg[_most_foreground(mean_attn, border_share)] = True
        return fg
    overall = float(attn.mean()) if attn.size else 0.0
    fg[mean_attn > overall] = True
    if not fg.any():
        fg[_most_foreground(mean_attn, border_share)] = True
    if fg.all():
        fg[_least_foreground(mean_attn, border_share)] = False
    return fg


def _most_foreground(mean_attn: np.ndarray, border_share: np.ndarray) -> int:
    """The cluster of highest mean attention; among those within ATTENTION_TIE of it (|a - b| < 0.05, a
    tolerance, not a rounding grid), the one touching the image border least."""
    finite = np.isfinite(mean_attn)
    if not finite.any():
        return 0
    top = float(mean_attn[finite].max())
    tied = np.flatnonzero(finite & (top - mean_attn < ATTENTION_TIE))
    return int(tied[np.argmin(border_share[tied])])


def _least_foreground(mean_attn: np.ndarray, border_share: np.ndarray) -> int:
    """The mirror of :func:`_most_foreground`: lowest mean attention (empty clusters first), ties within
    ATTENTION_TIE broken towards the largest border share."""
    if not np.isfinite(mean_attn).all():
        return int(np.flatnonzero(~np.isfinite(mean_attn))[0])
    low = float(mean_attn.min())
    tied = np.flatnonzero(mean_attn - low < ATTENTION_TIE)
    return int(tied[np.argmax(border_share[tied])])


@dataclass
class LevelModel:
    """Fitted centroids of one clustering level and which of them are foreground."""

    centroids: np.ndarray  # (k, D) float32
    foreground: np.ndarray  # (k,) bool

    def mask(self, feats: np.ndarray) -> np.ndarray:
        """Foreground flag of each feature row (nearest centroid)."""
        return self.foreground[assign_nearest(np.asarray(feats, dtype=np.float32), self.centroids)]


def fit_level(feats: np.ndarray, attn: np.ndarray, border: np.ndarray, k: int, seed: int, max_samples: int) -> LevelModel:
    """k-means on a sample of patches, clusters labelled foreground/background."""
    km = KMeans(k, seed=seed, max_samples=max_samples).fit(np.asarray(feats, dtype=np.float32))
    labels = km.predict(np.asarray(feats, dtype=np.float32))
    return LevelModel(km.cluster_centers_.astype(np.float32), label_clusters(labels, k, attn, border))


def image_level_mask(feats: np.ndarray, attn: np.ndarray, k: int, seed: int) -> np.ndarray:
    """M_I: k-means on one image's own patches; (h, w) bool."""
    return image_level_clusters(feats, attn, k, seed)[1]


def image_level_clusters(feats: np.ndarray, attn: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id, M_I) of each patch of one image, both (h, w): k-means on its own patches.

    With fewer patches than k the mask is "attention at or above the median" and every patch is cluster 0.
    """
    h, w, d = feats.shape
    flat = np.asarray(feats, dtype=np.float32).reshape(-1, d)
    if flat.shape[0] < k:
        return np.zeros((h, w), np.int64), np.asarray(attn) >= np.median(attn)
    labels = KMeans(k, seed=seed, n_init=IMAGE_LEVEL_N_INIT).fit_predict(flat)
    fg = label_clusters(labels, k, normalised_attention(attn), border_grid(h, w))
    return labels.reshape(h, w), fg[labels].reshape(h, w)


# Steepness of the vote-to-probability map: half a (unit) vote from the threshold gives p = 0.25 / 0.75, so
# the CRF sees confident but not certain unaries it can still correct.
SOFT_SLOPE_VOTES = float(np.log(3.0) / 0.5)
# --prior vote: weight of MaskDistill's proposal among the three unit-weight level votes. Any weight strictly
# between 1 and 2 gives the same decisions: with --fusion majority a 2-2 tie goes the proposal's way (3 of 4
# otherwise); any/all are unchanged (one vote / all four).
PROPOSAL_VOTE_WEIGHT = 1.5


def vote_threshold(weights: np.ndarray, rule: str) -> tuple[float, float]:
    """(largest losing, smallest winning) weighted vote total of a fusion rule over voters with ``weights``.

    ``any``: at least one voter; ``all``: every voter; ``majority``: more than half the total weight.
    With three unit weights this is the classic 1 / 3 / 2-of-3.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    total = float(w.sum())
    lose, win = -np.inf, np.inf
    for subset in range(1 << n):
        chosen = [(subset >> i) & 1 for i in range(n)]
        s = float(np.dot(chosen, w))
        if rule == "any":
            wins = subset != 0
        elif rule == "all":
            wins = subset == (1 << n) - 1
        else:
            wins = s > total / 2.0 + 1e-9
        if wins:
            win = min(win, s)
        else:
            lose = max(lose, s)
    return lose, win


def fuse(masks: list[np.ndarray], rule: str = "majority", weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Consistency fusion of the level masks (and, with ``--prior vote``, the proposal).

    Returns (hard, soft): hard is foreground where the (weighted) votes meet the rule (see
    :func:`vote_threshold`); soft is a probability, a logistic of the vote total centred halfway between the
    largest losing and the smallest winning total, so that "soft > 0.5" equals "hard" and bilinear
    upsampling of soft gives smooth boundaries for the CRF.  One mask alone (``--prior maskdistill``)
    gives soft 0.75 on it and 0.25 off it.
    """
    w = np.ones(len(masks)) if weights is None else np.asarray(weights, dtype=np.float64)
    votes = np.sum([wi * np.asarray(m, dtype=np.float32) for wi, m in zip(w, masks)], axis=0)
    lose, win = vote_threshold(w, rule)
    hard = votes >= win - 1e-6
    soft = 1.0 / (1.0 + np.exp(-SOFT_SLOPE_VOTES * (votes - (lose + win) / 2.0)))
    return hard, soft.astype(np.float32)
