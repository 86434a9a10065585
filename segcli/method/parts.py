"""Merge over-clustered foreground parts into classes by community detection (docs/method.md: "Each stage", classes; Leopart in the seed-system table).

Leopart's fully unsupervised step, without its ground-truth-tuned thresholds:

1. the foreground patches of the whole dataset are over-clustered into ``n_parts`` parts (k-means, 100-300);
2. :func:`part_adjacency` counts, per image, how often two *different* parts are 4-neighbours on the patch
   grid; the caller sums these (n_parts, n_parts) matrices over the dataset;
3. :func:`merge_parts` builds a weighted graph of parts and runs Louvain (networkx) with the resolution
   chosen by search so that the number of communities approaches the number of object classes.

Only spatial adjacency is counted, not plain co-occurrence in the same image: parts of one object touch
each other, while two classes that merely appear in the same picture (person and horse, table and chair)
co-occur without touching most of the time, so co-occurrence would tie classes together.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["part_adjacency", "merge_parts", "normalised_weights"]


def part_adjacency(part_grid: np.ndarray, n_parts: int) -> np.ndarray:
    """Counts of 4-neighbour patch pairs of two different foreground parts, (n_parts, n_parts) int64.

    ``part_grid``: (h, w) integer patch grid, -1 = background (any negative value is background).
    Every unordered pair of horizontally or vertically adjacent foreground patches with parts ``a != b``
    adds 1 to ``[a, b]`` and to ``[b, a]``; the matrix is symmetric with a zero diagonal. Vectorised
    (one ``bincount``), so summing it over a dataset is cheap.
    """
    grid = np.asarray(part_grid)
    if grid.ndim != 2:
        raise ValueError(f"part_grid must be a 2-D (h, w) array, got shape {grid.shape}")
    if grid.dtype.kind not in "iu":
        raise ValueError(f"part_grid must hold integer part ids, got dtype {grid.dtype}")
    n = int(n_parts)
    if n < 0:
        raise ValueError("n_parts must be >= 0")
    grid = grid.astype(np.int64, copy=False)
    if grid.size and grid.max(initial=-1) >= n:
        raise ValueError(f"part_grid has part id {int(grid.max())} but n_parts is {n}")
    a = np.concatenate([grid[:, :-1].ravel(), grid[:-1, :].ravel()])
    b = np.concatenate([grid[:, 1:].ravel(), grid[1:, :].ravel()])
    keep = (a >= 0) & (b >= 0) & (a != b)
    a, b = a[keep], b[keep]
    counts = np.bincount(a * n + b, minlength=n * n).reshape(n, n) if n else np.zeros((0, 0), np.int64)
    counts = counts.astype(np.int64, copy=False)
    return counts + counts.T


def normalised_weights(adjacency: np.ndarray) -> np.ndarray:
    """Edge weights of the part graph: ``A_ij / sqrt(s_i * s_j)`` with ``s_i = sum_j A_ij`` (float64).

    Raw counts scale with part size: a large, frequent part (a torso, a wheel) has large counts with
    everything it touches, including parts of other classes it borders only occasionally, while a small part
    (a beak) has small counts even with the parts it always touches. Dividing by the geometric mean of the
    two parts' total boundary counts turns each edge into "what share of their boundaries the two parts
    share" (the symmetric normalisation D^-1/2 A D^-1/2 of normalised cuts / spectral clustering), which
    is comparable across part sizes. The normalisation uses only the adjacency itself, so ``part_sizes``
    (patch counts) is not needed for it.
    """
    A = np.asarray(adjacency, dtype=np.float64)
    A = 0.5 * (A + A.T)
    np.fill_diagonal(A, 0.0)
    s = A.sum(axis=1)
    inv = np.zeros_like(s)
    np.divide(1.0, np.sqrt(s), out=inv, where=s > 0)
    return A * inv[:, None] * inv[None, :]


def _louvain(G, resolution: float, seed: int) -> list[set[int]]:
    import networkx as nx

    return nx.community.louvain_communities(G, weight="weight", resolution=resolution, seed=seed)


def merge_parts(
    adjacency: np.ndarray,
    n_classes: int,
    seed: int = 0,
    part_sizes: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> np.ndarray:
    """Community id (0..m-1, int64) of every part, with m <= ``n_classes`` and as close to it as possible.

    ``adjacency``: symmetric (n_parts, n_parts) counts summed over a dataset (:func:`part_adjacency`).
    Weights are :func:`normalised_weights`. Louvain (``networkx.community.louvain_communities``, seeded)
    runs on the parts that have at least one edge; its resolution is searched (geometric bracketing, then
    bisection in log space) so that the number of communities reaches ``n_classes``: an exact hit wins,
    else the closest count above (then merged down), else the closest below. Nothing here looks at labels.

    Too many communities (the search overshoots, or the graph has more connected components than
    ``n_classes``): the smallest community is merged into the community it has the largest total edge weight
    with, repeatedly; one with no edge to any other goes to the nearest community by (size-weighted) mean
    centroid when ``centroids`` ((n_parts, d) part centres, optional) is given, else to the largest one.

    Isolated parts (no edge: a part never seen touching another part, e.g. an empty k-means cluster) carry
    no evidence, so they do not use up class slots: they join the nearest community by centroid (when
    ``centroids`` is given) or the largest community -- except when the connected parts yield fewer than
    ``n_classes`` communities, in which case the largest isolated parts fill the free slots as singletons.

    Sizes (for "smallest" and for numbering): ``part_sizes`` (e.g. patch counts per part) when given, else
    each part's total adjacency count. Communities are numbered by total size, descending (ties: lowest part
    index first), so the numbering is deterministic for a given input and seed.
    """
    import networkx as nx

    A = np.asarray(adjacency)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"adjacency must be a square (n_parts, n_parts) matrix, got shape {A.shape}")
    if A.dtype.kind not in "biuf":
        raise ValueError(f"adjacency must be numeric, got dtype {A.dtype}")
    if not np.isfinite(A).all() or (A < 0).any():
        raise ValueError("adjacency must hold finite, non-negative counts")
    n = A.shape[0]
    if int(n_classes) != n_classes or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    k = int(n_classes)
    W = normalised_weights(A)
    raw_strength = 0.5 * (A + A.T).astype(np.float64).sum(axis=1)
    if part_sizes is not None:
        sizes = np.asarray(part_sizes, dtype=np.float64).reshape(-1)
        if sizes.shape != (n,):
            raise ValueError(f"part_sizes must have one entry per part ({n}), got shape {sizes.shape}")
    else:
        sizes = raw_strength
    if centroids is not None:
        centroids = np.asarray(centroids, dtype=np.float64)
        if centroids.ndim != 2 or centroids.shape[0] != n:
            raise ValueError(f"centroids must be (n_parts, d) = ({n}, d), got shape {centroids.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return _number_by_size(np.arange(n), sizes)

    connected = np.flatnonzero(W.sum(axis=1) > 0)
    isolated = np.flatnonzero(W.sum(axis=1) == 0)
    labels = np.arange(n, dtype=np.int64)  # community id = lowest member index; isolated parts: singletons
    if len(connected):
        G = nx.Graph()
        G.add_nodes_from(connected.tolist())
        iu, ju = np.nonzero(np.triu(W, 1))
        G.add_weighted_edges_from(zip(iu.tolist(), ju.tolist(), W[iu, ju].tolist()))
        for c in _search_resolution(G, min(k, len(connected)), seed):
            members = sorted(c)
            labels[members] = members[0]
    if len(isolated):
        labels = _place_isolated(labels, connected, isolated, k, sizes, centroids)
    labels = _merge_down(labels, k, W, sizes, centroids)
    return _number_by_size(labels, sizes)


def _place_isolated(labels, connected, isolated, k, sizes, centroids) -> np.ndarray:
    """Isolated parts fill free class slots (largest first), the rest join the nearest / largest community."""
    labels = labels.copy()
    n_comm = len(np.unique(labels[connected]))
    iso = isolated[np.lexsort((isolated, -sizes[isolated]))]  # largest first, ties by index
    free = max(0, k - n_comm)
    keep, attach = iso[:free], iso[free:]
    if not len(attach):
        return labels
    base = np.concatenate([connected, keep])
    ids = np.unique(labels[base])
    if centroids is not None:
        w = np.maximum(sizes, 1e-12)
        means = np.stack([np.average(centroids[base[labels[base] == c]], axis=0, weights=w[base[labels[base] == c]]) for c in ids])
        d = ((centroids[attach][:, None, :] - means[None]) ** 2).sum(-1)
        labels[attach] = ids[np.argmin(d, axis=1)]
    else:
        tot = np.array([sizes[base[labels[base] == c]].sum() for c in ids])
        labels[attach] = ids[np.lexsort((ids, -tot))[0]]
    return labels


def _search_resolution(G, target: int, seed: int, max_steps: int = 40) -> list[set[int]]:
    """Louvain partition whose community count best approaches ``target`` (exact > above > below)."""
    cache: dict[float, list[set[int]]] = {}

    def run(r: float) -> list[set[int]]:
        if r not in cache:
            cache[r] = _louvain(G, r, seed)
        return cache[r]

    n_nodes = G.number_of_nodes()
    target = min(target, n_nodes)
    lo, hi = 1.0, 1.0
    steps = 0
    # bracket: count(lo) <= target <= count(hi)
    while len(run(hi)) < target and steps < max_steps and hi < 1e6:
        lo, hi = hi, hi * 2.0
        steps += 1
    while len(run(lo)) > target and steps < max_steps and lo > 1e-6:
        hi, lo = lo, lo / 2.0
        steps += 1
    # bisect in log space
    while steps < max_steps:
        if len(run(lo)) == target or len(run(hi)) == target:
            break
        mid = math.sqrt(lo * hi)
        if mid in (lo, hi) or hi / lo < 1.0 + 1e-6:
            break
        m = len(run(mid))
        steps += 1
        if m == target:
            break
        if m < target:
            lo = mid
        else:
            hi = mid

    def key(r: float) -> tuple:
        m = len(cache[r])
        if m == target:
            return (0, 0, r)
        if m > target:
            return (1, m - target, r)
        return (2, target - m, r)

    best = min(cache, key=key)
    return cache[best]


def _merge_down(labels: np.ndarray, k: int, W: np.ndarray, sizes: np.ndarray, centroids) -> np.ndarray:
    """Merge smallest communities into their most-connected neighbour until at most ``k`` remain."""
    labels = labels.copy()
    ids = np.unique(labels)
    if len(ids) <= k:
        return labels
    # community-level matrices, updated in place as communities merge
    index = {c: i for i, c in enumerate(ids.tolist())}
    member = np.array([index[c] for c in labels.tolist()], dtype=np.int64)
    m = len(ids)
    onehot = np.zeros((len(labels), m))
    onehot[np.arange(len(labels)), member] = 1.0
    CW = onehot.T @ W @ onehot
    np.fill_diagonal(CW, 0.0)
    csize = onehot.T @ sizes
    alive = np.ones(m, dtype=bool)
    if centroids is not None:
        csum = onehot.T @ (centroids * np.maximum(sizes, 1e-12)[:, None])
        cwt = onehot.T @ np.maximum(sizes, 1e-12)
    while alive.sum() > k:
        cand = np.flatnonzero(alive)
        # smallest alive community (ties: lowest index)
        small = cand[np.lexsort((cand, csize[cand]))[0]]
        others = cand[cand != small]
        w = CW[small, others]
        if w.max() > 0:
            target = others[int(np.argmax(w))]
        elif centroids is not None:
            mine = csum[small] / cwt[small]
            cent = csum[others] / cwt[others][:, None]
            target = others[int(np.argmin(((cent - mine) ** 2).sum(axis=1)))]
        else:
            target = others[np.lexsort((others, -csize[others]))[0]]
        # merge small -> target
        CW[target] += CW[small]
        CW[:, target] += CW[:, small]
        CW[target, target] = 0.0
        CW[small] = 0.0
        CW[:, small] = 0.0
        csize[target] += csize[small]
        if centroids is not None:
            csum[target] += csum[small]
            cwt[target] += cwt[small]
        alive[small] = False
        member[member == small] = target
    return member


def _number_by_size(labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Renumber communities 0..m-1 by total size descending, ties by their lowest part index."""
    ids, inverse = np.unique(labels, return_inverse=True)
    tot = np.bincount(inverse, weights=sizes, minlength=len(ids))
    first = np.full(len(ids), len(labels), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(labels)))
    order = np.lexsort((first, -tot))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank[inverse].astype(np.int64)
