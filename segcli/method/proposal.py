"""MaskDistill's object-mask proposal: one object per image from the last block's queries and keys.

Source: W. Van Gansbeke, S. Vandenhende, L. Van Gool, "Discovering Object Masks with Transformers for
Unsupervised Semantic Segmentation" (MaskDistill, 2022), mask generation step.  The upstream code is
licensed CC BY-NC 4.0; it was read to learn the algorithm (see the project's seed-systems notes) and this
is an independent implementation.

The steps, on one image (``q``, ``k``: (H, N, d) per-head queries and keys of the last block *before* the
attention scale, prefix tokens first, CLS at token 0):

1. ``A = q . k`` raw dot products, no scale, no softmax; only the CLS query's row is needed.
2. ``G_cls`` = that row over the patch keys, averaged over the first ``heads`` heads (default 5: the
   setting MaskDistill uses for ViT-S/16; 0 = all heads, more than the model has = all heads).
3. ``threshold_attention``: sort ascending, divide by the sum, cumulative sum; entries whose cumulative sum
   exceeds ``1 - mass`` (mass 0.5) are kept (the largest values holding half the total), the rest are set to 0.
4. The key graph ``G_i = sum over all heads of K_p K_p^T`` over the patches (prefix tokens excluded).
5. Candidates: the ``int(topk * n_patches)`` (topk 0.4) highest ``G_cls`` patches; the **seed** is the first.
6. Source nodes: the candidates with ``G_i[seed, j] > 0``; ``G_diff = sum of their rows of G_i``; the binary
   map ``G_diff > 0`` on the patch grid.
7. The 4-connected component of that map containing the seed is the proposal.

Deviations that only make the result well defined (upstream would crash or be order-dependent):

- Ties in step 5 are broken deterministically (upstream: ``torch.topk``'s unspecified order).  Step 3 sets
  every entry outside the 50 % mass to exactly 0, so whenever those entries are fewer than 40 % of the
  patches the remaining candidates are chosen among tied zeros: they are taken in the order of their CLS
  score before step 3 (the next most attended patches), then in raster order.  Ties in step 3 also go by
  raster order (the earlier patch ranks higher), so a perfectly flat attention seeds at the top-left patch.
- At least one candidate is kept on tiny grids (``int(0.4 * n) == 0``).
- A zero or non-finite sum in step 3 keeps every entry (upstream divides by zero and drops them all).
- If the seed itself is not in the map (its key is zero), the proposal is empty.

``G_diff`` is computed as ``(sum of the source nodes' keys) @ K^T`` with all heads' keys concatenated, which
is the same number as the sum of rows of ``G_i`` (bilinearity) without ever forming the N x N graph, and in
float64 on the CPU, so a proposal does not depend on the device or on the order of float32 summations.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_HEADS = 5
DEFAULT_TOPK = 0.4
DEFAULT_MASS = 0.5


def rank_descending(values: np.ndarray, then: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``values`` from largest to smallest; equal values by ``then`` (larger first), then by index."""
    values = np.asarray(values, dtype=np.float64).ravel()
    keys = [np.arange(values.size)]
    if then is not None:
        keys.append(-np.asarray(then, dtype=np.float64).ravel())
    return np.lexsort((*keys, -values))


def threshold_attention(values: np.ndarray, mass: float = DEFAULT_MASS) -> np.ndarray:
    """Boolean mask of the largest entries of a 1-D map holding ``mass`` of its total (MaskDistill/DINO).

    Literally: sorted ascending (ties: later index first), divided by the total, cumulative sum, kept where
    the cumulative sum exceeds ``1 - mass``.  For non-negative maps this keeps the top entries whose mass
    reaches ``mass`` (the entry crossing the line included).  A zero or non-finite total keeps everything.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    total = float(v.sum())
    if v.size == 0 or total == 0.0 or not np.isfinite(total):
        return np.ones(v.shape, dtype=bool)
    ascending = rank_descending(v)[::-1]
    keep_sorted = np.cumsum(v[ascending] / total) > 1.0 - mass
    keep = np.zeros(v.shape, dtype=bool)
    keep[ascending] = keep_sorted
    return keep


def proposal_candidates(g_cls: np.ndarray, topk: float = DEFAULT_TOPK, mass: float = DEFAULT_MASS) -> np.ndarray:
    """Steps 3 and 5: patch indices of the candidates, best first (the first is the seed).

    The CLS scores outside the top ``mass`` are zeroed (:func:`threshold_attention`), then the
    ``max(1, int(topk * n))`` highest are taken; ties (the zeroed entries) by the score before zeroing.
    """
    g_cls = np.asarray(g_cls, dtype=np.float64).ravel()
    kept = g_cls * threshold_attention(g_cls, mass)
    return rank_descending(kept, then=g_cls)[: max(1, int(topk * g_cls.size))]


def seed_component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of a boolean (h, w) map containing ``seed`` (empty when seed is off)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask[seed]:
        return np.zeros(mask.shape, dtype=bool)
    labels, _ = ndimage.label(mask)  # default structure: 4-connectivity in 2-D
    return labels == labels[seed]


def object_proposal(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int],
    n_prefix: int = 1,
    heads: int = DEFAULT_HEADS,
    topk: float = DEFAULT_TOPK,
    mass: float = DEFAULT_MASS,
) -> np.ndarray:
    """MaskDistill's proposal for one image: a boolean (h, w) patch mask, one 4-connected object.

    q, k: (H, N, d) unscaled per-head queries and keys (any device/dtype), N = n_prefix + h * w, the CLS
    token at index 0 and the patches after the ``n_prefix`` prefix tokens in raster order.
    """
    h, w = int(grid[0]), int(grid[1])
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"expected q and k of shape (H, N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n_heads, n_tokens, _ = k.shape
    n = h * w
    if n_tokens != n_prefix + n or n_prefix < 1:
        raise ValueError(f"{n_tokens} tokens do not make CLS + {n_prefix - 1} other prefix tokens + {h}x{w} patches")
    use = n_heads if heads <= 0 else min(int(heads), n_heads)
    q_cls = q[:use, 0].detach().to("cpu", torch.float64)  # (use, d)
    keys = k[:, n_prefix:].detach().to("cpu", torch.float64)  # (H, n, d): patch keys only
    # Steps 1-2: raw CLS-query x patch-key products, mean over the first `use` heads.
    g_cls = torch.einsum("hd,hnd->hn", q_cls, keys[:use]).mean(dim=0).numpy()
    # Steps 3 and 5: candidates and seed.
    candidates = proposal_candidates(g_cls, topk, mass)
    seed = int(candidates[0])
    # Steps 4 and 6: rows of the head-summed key graph, via the concatenated keys.
    flat = keys.permute(1, 0, 2).reshape(n, -1)  # (n, H*d)
    seed_row = flat[torch.from_numpy(candidates)] @ flat[seed]  # G_i[seed, candidates]
    sources = torch.from_numpy(candidates[(seed_row > 0).numpy()])
    g_diff = flat @ flat[sources].sum(dim=0)  # sum over the source nodes of G_i[j, :] (zero if none)
    # Step 7.
    return seed_component((g_diff > 0).numpy().reshape(h, w), divmod(seed, w))


def object_proposals(
    q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], n_prefix: int = 1, heads: int = DEFAULT_HEADS
) -> torch.Tensor:
    """:func:`object_proposal` of every image of a batch: q, k (B, H, N, d) -> (B, h, w) bool on the CPU."""
    return torch.from_numpy(np.stack([object_proposal(q[b], k[b], grid, n_prefix, heads) for b in range(q.shape[0])]))
