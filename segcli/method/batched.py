"""The per-image foreground and crop steps for a whole batch of images at once, as tensor operations on a device.

On a GPU the backbone forward of a ViT-S/16 takes well under a millisecond per image, while the per-image
foreground step (three level assignments, the image level's k-means, the fusion) costs a few milliseconds of
one CPU core per image: run image by image on the host, it would set the pace. Here the images of a batch are
padded to a common number of patches and every stage runs on the device for all of them together:

* the dataset and category levels: nearest-centroid assignment (``x.c - |c|^2/2``, in float64 as
  :func:`segcli.method.kmeans.assign_nearest`) of every patch of every image;
* the image level: Lloyd's k-means on each image's own patches, batched (``bmm``), started from the same
  k-means++ seeds as :class:`segcli.method.kmeans.KMeans` (drawn on the host from the same seeded generator: a few
  distance rows per image), then the same canonical ordering and final assignment, so the clusters are the
  per-image path's;
* the fusion: the weighted votes and their logistic (:func:`segcli.method.foreground.fuse`).

Which clusters are foreground (:func:`segcli.method.foreground.label_clusters`, a sort of ``k`` numbers per image)
and the ordering of ``k`` centroids stay on the host. The results equal :func:`segcli.method.steps.foreground`'s:
the tests compare them on the CPU, where this code runs too (``device="cpu"``). Images whose k-means the
per-image path treats as a special case (fewer patches than clusters, all patches identical) go through
:func:`segcli.method.steps.foreground` itself.

:func:`segcli.method.regions.crop_batch` cuts region crops out of an image on the device and resizes them for the crop forward
(bicubic, antialiased: within one grey level of PIL's resize, which the host path uses).
"""

from __future__ import annotations

import numpy as np
import torch

from segcli.io.cache import ImageFeatures
from segcli.errors import BadImageError, ModelError
from segcli.method.foreground import PROPOSAL_VOTE_WEIGHT, SOFT_SLOPE_VOTES, border_grid, label_clusters, normalised_attention, vote_threshold
from segcli.method.kmeans import first_distinct_rows, kmeans_pp
from segcli.method.model import SegModel

MAX_ITER = 100  # = segcli.method.kmeans.KMeans' default max_iter, which the per-image path uses: both paths stop alike
KMEANS_MAX_SAMPLES = 100_000  # KMeans' default max_samples: larger images are subsampled, by the per-image path


def _assign(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest of the centres C (B, k, D) for the rows X (B, N, D), float64, exact duplicates tie to the first
    (as :func:`segcli.method.kmeans.assign_nearest`)."""
    X64, C64 = X.double(), C.double()
    scores = torch.bmm(X64, C64.transpose(1, 2)) - 0.5 * (C64 * C64).sum(-1)[:, None, :]
    return scores.argmax(-1)


def _level_assign(flat: torch.Tensor, centroids: np.ndarray) -> torch.Tensor:
    """Nearest-centroid ids (B, N) of one shared set of centroids, with assign_nearest's duplicate rule."""
    keep = first_distinct_rows(np.asarray(centroids, np.float64) + 0.0)
    C = torch.from_numpy(np.asarray(centroids, np.float64)[keep]).to(flat.device)
    ids = _assign(flat, C[None].expand(flat.shape[0], -1, -1))
    return torch.from_numpy(keep).to(flat.device)[ids]


def _lloyd_batch(X: torch.Tensor, valid: torch.Tensor, C: torch.Tensor, max_iter: int = MAX_ITER) -> torch.Tensor:
    """Lloyd iterations of every image's k-means at once (the numpy engine's loop, batched).

    X (B, N, D) float32 padded rows, ``valid`` (B, N) which rows are real, C (B, k, D) initial centres.
    An image stops changing once its labels repeat (as the numpy loop's early exit: recomputing the centres
    from the same labels gives the same centres).
    """
    B, N, _ = X.shape
    k = C.shape[1]
    x_sq = (X * X).sum(-1)
    labels = None
    done = torch.zeros(B, dtype=torch.bool, device=X.device)
    for _ in range(max_iter):
        # The numpy engine's order of operations: -2 x.c, then + |x|^2, then + |c|^2.
        d = (torch.bmm(X, C.transpose(1, 2)) * -2.0 + x_sq[:, :, None] + (C * C).sum(-1)[:, None, :]).clamp_min(0.0)
        new = d.argmin(-1)
        if labels is not None:
            same = ((new == labels) | ~valid).all(1)
            done = done | same
            if bool(done.all()):
                break
        labels = torch.where(done[:, None], labels, new) if labels is not None else new
        onehot = (labels[:, None, :] == torch.arange(k, device=X.device)[None, :, None]) & valid[:, None, :]
        counts = onehot.sum(-1)
        sums = torch.bmm(onehot.to(X.dtype), X)
        newC = sums / counts.clamp_min(1)[..., None].to(X.dtype)
        empty = (counts == 0) & ~done[:, None]
        if bool(empty.any()):  # re-seed empty clusters on the rows farthest from their centre (per image)
            far_d = torch.where(valid, d.gather(2, labels[..., None])[..., 0], torch.full_like(x_sq, -1.0))
            for b in torch.nonzero(empty.any(1)).flatten().tolist():
                ids = torch.nonzero(empty[b]).flatten()
                far = torch.argsort(-far_d[b], stable=True)[: len(ids)]
                newC[b, ids[: len(far)]] = X[b, far]
        C = torch.where(done[:, None, None], C, newC)
    return C


def _image_level(model: SegModel, fs: list[ImageFeatures], X: torch.Tensor, valid: torch.Tensor,
                 counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cluster ids, M_I) of every image (see :func:`segcli.method.foreground.image_level_clusters`)."""
    from segcli.method.steps import image_clusters

    cfg = model.config
    k = cfg.level_clusters("image")
    out: list = [None] * len(fs)
    batched = []
    for i, f in enumerate(fs):
        flat = np.asarray(f.feats, np.float32).reshape(counts[i], -1)
        if counts[i] <= k or counts[i] > KMEANS_MAX_SAMPLES or not np.any(flat.max(axis=0) > flat.min(axis=0)):
            out[i] = image_clusters(model, f)  # the per-image path's special cases, by the per-image path
        else:
            rng = np.random.default_rng(cfg.seed)
            x_sq = np.einsum("ij,ij->i", flat, flat)
            batched.append((i, kmeans_pp(flat, x_sq, k, rng)))
    if not batched:
        return out
    idx = torch.tensor([i for i, _ in batched], device=X.device)
    C0 = torch.from_numpy(np.stack([c for _, c in batched])).to(X.device)
    Xb = X[idx]  # the batch's images with a k-means of their own (one gather, used three times)
    C = _lloyd_batch(Xb, valid[idx], C0)
    C_host = C.cpu().numpy()
    # KMeans.fit's canonical order (size descending, then coordinates), then the final float64 assignment.
    first = _assign(Xb, C)
    ordered = np.empty_like(C_host)
    for j, (i, _) in enumerate(batched):
        lab = first[j, : counts[i]].cpu().numpy()
        cnt = np.bincount(lab, minlength=k)
        ordered[j] = C_host[j][np.lexsort(tuple(C_host[j].T[::-1]) + (-cnt,))]
    labels = _assign(Xb, torch.from_numpy(ordered).to(X.device)).cpu().numpy()
    for j, (i, _) in enumerate(batched):
        if len(first_distinct_rows(C_host[j] + 0.0)) < k:  # merged centres: assign_nearest's tie rule, per image
            out[i] = image_clusters(model, fs[i])
            continue
        h, w = fs[i].grid
        lab = labels[j, : counts[i]]
        fg = label_clusters(lab, k, normalised_attention(fs[i].attn), border_grid(h, w))
        out[i] = (lab.reshape(h, w), fg[lab].reshape(h, w))
    return out


def _fuse(masks: list[torch.Tensor], rule: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segcli.method.foreground.fuse` on (B, N) masks."""
    w = np.asarray(weights, dtype=np.float64)
    votes = sum(float(wi) * m.float() for wi, m in zip(w, masks))
    lose, win = vote_threshold(w, rule)
    hard = votes >= win - 1e-6
    soft = 1.0 / (1.0 + torch.exp(-SOFT_SLOPE_VOTES * (votes - (lose + win) / 2.0)))
    return hard, soft.float()


def foreground_batch(model: SegModel, fs: list[ImageFeatures], device: torch.device | str = "cpu"
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """:func:`segcli.method.steps.foreground` of every image of ``fs``, computed together on ``device``.

    Returns per image (hard, soft, clusters) as the per-image step does; raises the same errors.
    """
    from segcli.method.steps import foreground

    cfg = model.config
    if not fs:
        return []
    if cfg.prior == "maskdistill":  # no level to compute: the proposal alone
        return [foreground(model, f) for f in fs]
    dev = torch.device(device)
    counts = [f.grid[0] * f.grid[1] for f in fs]
    D = int(np.asarray(fs[0].feats).shape[-1])
    for f in fs:
        d = int(np.asarray(f.feats).shape[-1])
        if d != model.feature_dim:
            raise ModelError(f"features have dimension {d} but the model was fitted on {model.feature_dim}; "
                             "use the backbone/features the model was fitted with")
        if cfg.prior != "levels" and f.proposal is None:
            raise BadImageError(f"--prior {cfg.prior}: its features have no 'proposal' array")
    B, N = len(fs), max(counts)
    X_host = np.zeros((B, N, D), np.float32)
    valid_host = np.zeros((B, N), bool)
    for i, f in enumerate(fs):
        X_host[i, : counts[i]] = np.asarray(f.feats, np.float32).reshape(counts[i], D)
        valid_host[i, : counts[i]] = True
    X = torch.from_numpy(X_host).to(dev, non_blocking=True)
    valid = torch.from_numpy(valid_host).to(dev)

    fg_d = torch.from_numpy(np.asarray(model.dataset.foreground, bool)).to(dev)
    m_d = fg_d[_level_assign(X, model.dataset.centroids)]
    cls = np.stack([np.asarray(f.cls, np.float32) for f in fs])
    for row in cls:  # normalised exactly as the per-image step does
        row /= max(float(np.linalg.norm(row)), 1e-12)
    cats = _level_assign(torch.from_numpy(cls[:, None, :]).to(dev), model.category_centroids)[:, 0].cpu().numpy()
    m_c = torch.zeros((B, N), dtype=torch.bool, device=dev)
    for c in np.unique(cats):  # one assignment per category present in the batch
        rows = torch.from_numpy(np.flatnonzero(cats == c)).to(dev)
        level = model.categories[int(c)]
        m_c[rows] = torch.from_numpy(np.asarray(level.foreground, bool)).to(dev)[_level_assign(X[rows], level.centroids)]
    image = _image_level(model, fs, X, valid, counts)
    m_i = torch.zeros((B, N), dtype=torch.bool, device=dev)
    for i, (_, mi) in enumerate(image):
        m_i[i, : counts[i]] = torch.from_numpy(np.asarray(mi, bool).ravel()).to(dev)
    masks, weights = [m_d, m_c, m_i], [1.0, 1.0, 1.0]
    if cfg.prior == "vote":
        prop = torch.zeros((B, N), dtype=torch.bool, device=dev)
        for i, f in enumerate(fs):
            prop[i, : counts[i]] = torch.from_numpy(np.asarray(f.proposal, bool).ravel()).to(dev)
        masks, weights = masks + [prop], weights + [PROPOSAL_VOTE_WEIGHT]
    hard, soft = _fuse(masks, cfg.fusion, weights)
    hard, soft = hard.cpu().numpy(), soft.cpu().numpy()
    return [(hard[i, : counts[i]].reshape(f.grid), soft[i, : counts[i]].reshape(f.grid), image[i][0])
            for i, f in enumerate(fs)]
