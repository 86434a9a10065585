"""Dense-CRF mean-field in torch on a sparse bilateral grid (docs/method.md, Refinement), on any device, for L labels.

Why: the exact dense CRF (pydensecrf, :mod:`segcli.method.crf`) costs ~2.5 us per pixel and iteration on one CPU
core and has no GPU path, so segcli ran it with the long side reduced to 160 px, which rounds every
boundary to ~3-px steps: about 3 IoU and 9 boundary-F points below the full-size CRF on VOC with noisy
patch masks (``benchmarks/bench_refine.py``). This refiner runs the same model -- Potts energy, unaries
``-log p``, a Gaussian kernel (sxy=1, compat 3) and a bilateral kernel (sxy=67, compat 4), each message a
normalised (weighted-average) filter of Q as pydensecrf's default normalisation nearly makes it -- at full
size, and replaces the permutohedral lattice by a bilateral grid: pixels are splatted into (spatial cell,
colour bin) vertices (cells of ``cell * sxy`` px, colour bins of ``bin_width`` levels per channel), the
occupied vertices are blurred with a Gaussian over neighbouring cells of the same colour bin, and each
pixel reads its vertex back, divided by the filtered ones. Only occupied vertices are stored, a few
thousand for a photo, so one iteration is one ``index_add`` and a few gathers over the pixels.

The colour bin (8 levels, wider than srgb=3, nearer the lattice's effective width) and the 10 iterations
were chosen by ``benchmarks/bench_refine.py``: on VOC with noisy patch masks within 0.5 IoU and 1.1
boundary-F points of the full-size CRF at 0.95x the 160-px CRF's CPU time; on CamVid 1.4 IoU below the
full-size CRF (better boundary F). Narrower bins / fewer iterations favour CamVid and cost VOC.

Larger images than ``max_side`` are refined at that long side (marginals upsampled), so memory is bounded
by the working size whatever the input, as for ``--work-max-side``.

Core API: :func:`refine_probs` takes (L, H, W) probabilities (any L >= 2) and returns (L, H, W) marginals;
:func:`refine_foreground_torch` is the 2-label foreground case (label 1 = ``fg_prob``), with the same tie
rule as :func:`segcli.method.crf.refine_foreground` (foreground only where its marginal is strictly larger).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segcli.config import REFINE_METHODS
from segcli.method.crf import CRFParams  # the dense CRF's parameters, in one place (pydensecrf itself is imported lazily)

__all__ = ["REFINE_METHODS", "RefineParams", "refine_probs", "refine_labels", "refine_foreground_torch", "refine_mask",
           "RefineFallbackWarning"]

_PROB_EPS = 1e-5
_DENSE_VERTICES = 1 << 22  # (cell, colour) table size up to which grid neighbours are found by lookup


@dataclass(frozen=True)
class RefineParams:
    """Kernel widths in full-size pixels and 0-255 colour levels: :class:`segcli.method.crf.CRFParams`' energy, plus the
    bilateral grid's own resolution (which stands in for the colour width ``bilateral_srgb``)."""

    iterations: int = CRFParams.iterations
    gauss_sxy: float = CRFParams.gauss_sxy
    gauss_compat: float = CRFParams.gauss_compat
    bilateral_sxy: float = CRFParams.bilateral_sxy
    bilateral_compat: float = CRFParams.bilateral_compat
    bin_width: float = 8.0  # colour bin of the grid, levels per channel (benchmark: 6-10 trade VOC against CamVid)
    cell: float = 0.5  # grid cell side, in bilateral sxy
    max_side: int = 2048  # larger inputs are refined at this long side


class _BilateralGrid:
    """Normalised bilateral filter of per-pixel channels through occupied (cell, colour bin) vertices."""

    def __init__(self, img: torch.Tensor, cell_px: int, bin_width: float, sigma_cells: float) -> None:
        _, H, W = img.shape
        dev = img.device
        gy = torch.arange(H, device=dev) // cell_px
        gx = torch.arange(W, device=dev) // cell_px
        GY, GX = int(gy[-1]) + 1, int(gx[-1]) + 1
        nb = int(255 // bin_width) + 1
        bins = (img.reshape(3, -1) / bin_width).floor().long().clamp_(0, nb - 1)
        colour = (bins[0] * nb + bins[1]) * nb + bins[2]
        del bins
        cell = (gy[:, None] * GX + gx[None, :]).reshape(-1)
        radius = max(1, int(math.ceil(2 * sigma_cells)))
        weights = {d: math.exp(-d * d / (2 * sigma_cells ** 2)) for d in range(-radius, radius + 1) if d}
        self.taps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        ucol, col_inv = torch.unique(colour, return_inverse=True)
        n_col, n_cell = int(ucol.numel()), GY * GX
        if n_cell * n_col <= _DENSE_VERTICES:
            # Few enough (cell, colour present in the image) pairs for a dense table: neighbours by lookup.
            vkey = cell * n_col + col_inv
            del cell, col_inv, colour
            occupied = torch.zeros(n_cell * n_col, dtype=torch.bool, device=dev)
            occupied[vkey] = True
            index = torch.cumsum(occupied, 0) - 1
            self.inv = index[vkey]
            del vkey
            verts = torch.nonzero(occupied).reshape(-1)
            self.M = int(verts.numel())
            vcell = verts // n_col
            for coord, limit, stride in ((vcell % GX, GX, n_col), (vcell // GX, GY, n_col * GX)):
                axis = []
                for d, wd in weights.items():
                    target = (verts + d * stride).clamp_(0, n_cell * n_col - 1)
                    ok = occupied[target] & (coord + d >= 0) & (coord + d < limit)
                    if ok.any():
                        axis.append((index[target].clamp_(min=0), ok.to(img.dtype) * wd))
                self.taps.append(axis)
            return self._normalise(H * W, img.dtype, dev)
        # Otherwise (large images with many colours): sorted occupied keys, neighbours by binary search.
        colours = nb ** 3
        key = cell * colours + colour
        del cell, col_inv, colour
        uniq, self.inv = torch.unique(key, return_inverse=True)
        del key
        self.M = int(uniq.numel())
        ucell = uniq // colours
        for coord, limit, stride in ((ucell % GX, GX, colours), (ucell // GX, GY, colours * GX)):
            axis = []
            for d, wd in weights.items():
                target = uniq + d * stride
                pos = torch.searchsorted(uniq, target).clamp_(max=self.M - 1)
                ok = (uniq[pos] == target) & (coord + d >= 0) & (coord + d < limit)
                if ok.any():
                    axis.append((pos, ok.to(img.dtype) * wd))
            self.taps.append(axis)
        self._normalise(H * W, img.dtype, dev)

    def _normalise(self, n: int, dtype: torch.dtype, dev: torch.device) -> None:
        self.scale = 1.0
        self.scale = 1.0 / self._filter(torch.ones((1, n), dtype=dtype, device=dev))[0]

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros((self.M, x.shape[0]), dtype=x.dtype, device=x.device).index_add_(0, self.inv, x.T)
        for axis in self.taps:
            out = v.clone()
            for pos, w in axis:
                out += v[pos] * w[:, None]
            v = out
        return v[self.inv].T * self.scale

    __call__ = _filter


def _gauss_taps(sxy: float) -> list[float]:
    r = max(1, int(math.ceil(2 * sxy)))
    return [math.exp(-d * d / (2 * sxy * sxy)) for d in range(-r, r + 1)]


def _separable(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable filter of (C, H, W) with 1-D ``taps`` (odd length), zero padding."""
    r = len(taps) // 2
    for dim in (1, 2):
        n = x.shape[dim]
        xp = F.pad(x, (r, r, 0, 0) if dim == 2 else (0, 0, r, r))
        out = xp.narrow(dim, 0, n) * taps[0]
        for i in range(1, len(taps)):
            out += xp.narrow(dim, i, n) * taps[i]
        x = out
    return x


def _check_image(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 view of an RGB, grey or RGBA image."""
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"rgb must be an (H, W, 3) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        if img.dtype.kind not in "biu":
            raise ValueError(f"rgb must be uint8 (0-255), got dtype {img.dtype}")
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img[:, :, :3]


def _check(rgb: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = _check_image(rgb)
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] < 2:
        raise ValueError(f"probs must be an (L, H, W) array with L >= 2, got shape {p.shape}")
    if p.dtype.kind not in "biuf":
        raise ValueError(f"probs must be numeric, got dtype {p.dtype}")
    if img.shape[:2] != p.shape[1:]:
        raise ValueError(f"rgb is {img.shape[1]}x{img.shape[0]} but probs are {p.shape[2]}x{p.shape[1]} (W x H)")
    p = p.astype(np.float32, copy=False)
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return img, p


def _mean_field(img: torch.Tensor, p: torch.Tensor, params: RefineParams) -> torch.Tensor:
    """Marginals (L, H, W) of the dense CRF of image ``img`` (3, H, W) and probabilities ``p`` (L, H, W)."""
    L, H, W = p.shape
    N = H * W
    unary = torch.log(p.clamp(_PROB_EPS, 1.0 - _PROB_EPS)).reshape(L, N)  # -U
    q = torch.softmax(unary, dim=0)
    if params.iterations <= 0:
        return q.reshape(L, H, W)
    cell_px = max(1, int(round(params.cell * params.bilateral_sxy)))
    bilateral = _BilateralGrid(img, cell_px, params.bin_width, params.bilateral_sxy / cell_px)

    taps = _gauss_taps(params.gauss_sxy) if params.gauss_compat and params.gauss_sxy > 0 else None
    if taps is not None:  # the Gaussian kernel leaves the pixel itself out, as the lattice's normalisation does
        others = _separable(torch.ones((1, H, W), dtype=img.dtype, device=img.device), taps) - 1.0
        has = others > 1e-6  # False only without neighbours (a 1x1 image): no Gaussian message at all
        g_scale = torch.where(has, 1.0 / others.clamp_min(1e-6), torch.zeros_like(others))
        g_last = params.gauss_compat * has.reshape(1, N).to(img.dtype)
    # Messages are normalised averages of Q, so those of the last label are one minus the others' sum.
    free = L - 1
    for _ in range(params.iterations):
        head = q[:free]
        msg = params.bilateral_compat * bilateral(head)
        if taps is not None:
            g = (_separable(head.reshape(free, H, W), taps) - head.reshape(free, H, W)) * g_scale
            msg += params.gauss_compat * g.reshape(free, N)
        last = params.bilateral_compat - msg.sum(0, keepdim=True)
        if taps is not None:
            last += g_last
        q = torch.softmax(unary + torch.cat([msg, last]), dim=0)
    return q.reshape(L, H, W)


@torch.no_grad()
def refine_probs(rgb: np.ndarray, probs: np.ndarray, params: RefineParams = RefineParams(),
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Refined (L, H, W) float32 marginals (a torch tensor on ``device``) of (L, H, W) label probabilities.

    ``rgb``: (H, W, 3) uint8 RGB (grey and RGBA accepted); ``probs``: per-pixel label probabilities
    (clipped to [1e-5, 1 - 1e-5]; they need not sum to one exactly, e.g. an upsampled map). Images with a
    long side above ``params.max_side`` are refined at that size and the marginals upsampled.
    """
    img_np, p_np = _check(rgb, probs)
    L, H, W = p_np.shape
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if H == 0 or W == 0:
        return torch.zeros((L, H, W), device=dev)
    small = _reduced_size(H, W, params.max_side)
    if small is not None:
        img_np, p_np = _resize(img_np, small), np.stack([_resize(c, small) for c in p_np])
    # Own, writable float copies: torch must not wrap read-only arrays (a PIL view, a caller's frozen array).
    img = torch.from_numpy(img_np.astype(np.float32)).to(dev).permute(2, 0, 1)
    p_t = torch.from_numpy(p_np if p_np.flags.writeable and p_np.flags.c_contiguous else np.array(p_np, np.float32)).to(dev)
    q = _mean_field(img, p_t, params)
    if small is not None:
        del img
        q = F.interpolate(q[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return q


def _reduced_size(H: int, W: int, max_side: int) -> tuple[int, int] | None:
    """(h, w) with the long side reduced to ``max_side``, or None when the image is no larger."""
    if not max_side or max(H, W) <= max_side:
        return None
    scale = max_side / max(H, W)
    return max(1, round(H * scale)), max(1, round(W * scale))


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear (antialiased) resize of a uint8 image or a float map, with no full-size float copy."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size[1], size[0]), Image.BILINEAR))


def refine_labels(rgb: np.ndarray, probs: np.ndarray, params: RefineParams = RefineParams(),
                  device: torch.device | str | None = None) -> np.ndarray:
    """(H, W) int64 label map: argmax of :func:`refine_probs` (ties to the lower label)."""
    return refine_probs(rgb, probs, params, device).argmax(0).cpu().numpy()


def refine_foreground_torch(rgb: np.ndarray, fg_prob: np.ndarray, params: RefineParams = RefineParams(),
                            device: torch.device | str | None = None) -> np.ndarray:
    """(H, W) bool foreground of a (H, W) foreground probability: the 2-label case of :func:`refine_probs`."""
    fg = np.asarray(fg_prob)
    if fg.ndim != 2:
        raise ValueError(f"fg_prob must be a 2-D (H, W) array, got shape {fg.shape}")
    fg = fg.astype(np.float32, copy=False)
    H, W = fg.shape
    small = _reduced_size(H, W, params.max_side)
    if small is None:
        q = refine_probs(rgb, np.stack([1.0 - fg, fg]), params, device)
        return (q[1] > q[0]).cpu().numpy()
    # Large input: refine a reduced copy and upsample only the label difference (4 bytes per output pixel).
    img = _check_image(rgb)
    if img.shape[:2] != (H, W):
        raise ValueError(f"rgb is {img.shape[1]}x{img.shape[0]} but fg_prob is {W}x{H} (W x H)")
    if not np.isfinite(fg).all():
        raise ValueError("fg_prob contains NaN or infinite values")
    fg_small = _resize(fg, small)
    q = refine_probs(_resize(img, small), np.stack([1.0 - fg_small, fg_small]), params, device)
    diff = F.interpolate((q[1] - q[0])[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return (diff > 0).cpu().numpy()


class RefineFallbackWarning(UserWarning):
    """--refine densecrf was asked for but pydensecrf is not installed: the torch mean-field refines instead."""


_warned_fallback = False


def _warn_fallback_once(hint: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"pydensecrf is not installed, so the torch mean-field refiner (--refine meanfield) is used instead "
                      f"of the dense CRF; install it with `{hint}` for --refine densecrf", RefineFallbackWarning, stacklevel=3)


def _available(method: str) -> str:
    """The refiner that will run for ``method``: ``densecrf`` without pydensecrf installed warns once and
    becomes ``meanfield``; an unknown name raises ValueError."""
    if method not in REFINE_METHODS:
        raise ValueError(f"unknown refinement method {method!r}; use one of {', '.join(REFINE_METHODS)}")
    if method == "densecrf":
        from segcli.method.crf import INSTALL_HINT, crf_available

        if not crf_available():
            _warn_fallback_once(INSTALL_HINT)
            return "meanfield"
    return method


def refine_mask(rgb: np.ndarray, fg_prob: np.ndarray, method: str, iterations: int = 10, crf_max_side: int = 160,
                device: torch.device | str | None = None) -> np.ndarray:
    """(H, W) bool foreground of ``fg_prob`` refined by ``method`` (the one per-image refinement step).

    ``densecrf``: pydensecrf at long side ``crf_max_side`` (0 = full size); without pydensecrf installed it
    warns once and uses ``meanfield`` instead. ``meanfield``: :func:`refine_foreground_torch` with
    ``iterations`` iterations, on ``device``. ``none``: ``fg_prob > 0.5``.
    """
    method = _available(method)
    if method == "none":
        return np.asarray(fg_prob) > 0.5
    if method == "densecrf":
        from segcli.method.crf import CRFParams, refine_foreground_scaled

        return refine_foreground_scaled(rgb, fg_prob, CRFParams(iterations=iterations), crf_max_side)
    return refine_foreground_torch(rgb, fg_prob, RefineParams(iterations=iterations), device)


def refine_label_map(rgb: np.ndarray, probs: np.ndarray, method: str, iterations: int = 10, crf_max_side: int = 160,
                     device: torch.device | str | None = None) -> np.ndarray:
    """(H, W) int64 labels of (L, H, W) probabilities refined by ``method``: :func:`refine_mask` for L labels
    (the stuff map of ``--stuff N``), with the same choices and the same fallback when pydensecrf is missing."""
    method = _available(method)
    if method == "none":
        return np.asarray(probs).argmax(0)
    if method == "densecrf":
        from segcli.method.crf import CRFParams, refine_labels_scaled

        return refine_labels_scaled(rgb, probs, CRFParams(iterations=iterations), crf_max_side)
    return refine_labels(rgb, probs, RefineParams(iterations=iterations), device)
