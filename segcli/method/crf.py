"""Dense CRF refinement: two labels for the foreground map (docs/method.md, Refinement), L labels for the stuff map.

The CRF is the fully connected CRF of Krahenbuhl & Koltun (``pydensecrf``; on Python 3.11 install it as
``pip install pydensecrf2``, which imports as ``pydensecrf``). Defaults are the STEGO / MaskContrast values:
10 mean-field iterations, Gaussian kernel sxy=1 compat=3, bilateral kernel sxy=67 srgb=3 compat=4.

Unaries: ``-log p`` for the two labels, label 0 = background (``1 - fg_prob``), label 1 = foreground
(``fg_prob``), after clipping ``fg_prob`` to ``[1e-5, 1 - 1e-5]``. A pixel is foreground when its
foreground marginal is strictly larger than its background marginal (so ties go to background, as
``fg_prob > 0.5`` does).

Channel order: we pass the image as RGB, the order segcli reads it in (PIL). STEGO and MaskContrast pass
OpenCV's BGR. The bilateral kernel ``exp(-|dp|^2 / 2 sxy^2 - |dI|^2 / 2 srgb^2)`` uses one ``srgb`` for all
three channels, so the exact kernel -- and therefore the exact CRF -- is the same for either order. The
permutohedral-lattice filter that pydensecrf uses to approximate it is not exactly symmetric in the order
of the feature dimensions, so the two orders can differ on a few boundary pixels: measured on three
natural photographs at 500x375 (matplotlib's and scikit-learn's sample images), 0.09-0.17% of the pixels;
``tests/test_crf.py`` checks agreement within 1%. Cost: 500x375, 10 iterations, ~0.6-0.8 s on one CPU core.

If ``pydensecrf`` cannot be imported, :func:`refine_foreground` warns once per process (with the pip command)
and returns ``fg_prob > 0.5``.

:func:`refine_labels` is the same CRF (same :class:`CRFParams`, same kernels, same RGB handling) over L labels:
unaries ``-log p`` of an (L, H, W) probability map, each probability clipped to ``[1e-5, 1]``, result the
arg-max of the marginals (ties to the lowest label, as ``np.argmax`` of the unrefined map). The stuff
classes of ``--stuff`` use it. :func:`refine_labels_scaled` runs it with the long side reduced to
``--crf-max-side``, exactly as :func:`refine_foreground_scaled` does for two labels (one shared helper scales
image, maps and kernel widths). Without pydensecrf it warns once and returns the arg-max of the map.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CRFParams", "CRFUnavailableWarning", "crf_available", "refine_foreground", "refine_foreground_scaled",
    "refine_labels", "refine_labels_scaled", "INSTALL_HINT",
]

INSTALL_HINT = "pip install pydensecrf2"
_PROB_EPS = 1e-5
_warned_missing = False


class CRFUnavailableWarning(UserWarning):
    """pydensecrf is not installed: the CRF step is skipped (masks are thresholded at 0.5)."""


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    gauss_sxy: float = 1
    gauss_compat: float = 3
    bilateral_sxy: float = 67
    bilateral_srgb: float = 3
    bilateral_compat: float = 4


def _import_densecrf():
    """The ``pydensecrf.densecrf`` module, or None (not cached: a later install or a test patch is seen)."""
    try:
        import pydensecrf.densecrf as dcrf
    except (ImportError, OSError):
        return None
    return dcrf


def crf_available() -> bool:
    return _import_densecrf() is not None


def _warn_missing_once() -> None:
    global _warned_missing
    if _warned_missing:
        return
    _warned_missing = True
    warnings.warn(
        "pydensecrf is not installed, so the CRF refinement is skipped and the foreground score is "
        f"thresholded at 0.5 instead; install it with `{INSTALL_HINT}` (or pass --no-crf to silence this)",
        CRFUnavailableWarning,
        stacklevel=3,
    )


def _check_inputs(rgb: np.ndarray, fg_prob: np.ndarray, name: str = "fg_prob", ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    fg = np.asarray(fg_prob)
    if fg.ndim != ndim:
        shape = "(H, W)" if ndim == 2 else "(L, H, W)"
        raise ValueError(f"{name} must be a {ndim}-D {shape} array, got shape {fg.shape}")
    if fg.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {fg.dtype}")
    fg = fg.astype(np.float32, copy=False)
    if not np.isfinite(fg).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"rgb must be an (H, W, 3) image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.shape[:2] != fg.shape[-2:]:
        raise ValueError(f"rgb is {img.shape[1]}x{img.shape[0]} but {name} is {fg.shape[-1]}x{fg.shape[-2]} (W x H)")
    if img.dtype != np.uint8:
        if img.dtype.kind not in "biu":
            raise ValueError(f"rgb must be uint8 (0-255), got dtype {img.dtype}")
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img, fg


def refine_foreground(rgb: np.ndarray, fg_prob: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine a soft foreground map with a 2-label dense CRF; returns an (H, W) bool foreground mask.

    ``rgb``: (H, W, 3) uint8 image in RGB order (grey (H, W) and RGBA are accepted); ``fg_prob``: (H, W)
    foreground probability in [0, 1]. Without pydensecrf: one warning per process, then ``fg_prob > 0.5``.
    """
    img, fg = _check_inputs(rgb, fg_prob)
    dcrf = _import_densecrf()
    if dcrf is None:
        _warn_missing_once()
        return fg > 0.5
    h, w = fg.shape
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)
    p = np.clip(fg, _PROB_EPS, 1.0 - _PROB_EPS).reshape(1, -1)
    unary = np.ascontiguousarray(-np.log(np.concatenate([1.0 - p, p], axis=0)), dtype=np.float32)  # (2, H*W)
    q = _inference(dcrf, img, unary, params)
    return q[1] > q[0]


def _inference(dcrf, img: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """Marginals (L, H, W) of the dense CRF with unaries (L, H*W) on the image (H, W, 3) uint8."""
    h, w = img.shape[:2]
    n_labels = unary.shape[0]
    # pydensecrf wants C-contiguous *writable* buffers (a read-only PIL view raises "buffer source array is
    # read-only"), so copy unless the array already is both.
    if not (img.flags.c_contiguous and img.flags.writeable):
        img = np.array(img, dtype=np.uint8, order="C", copy=True)
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=img,
        compat=params.bilateral_compat,
    )
    return np.asarray(crf.inference(int(params.iterations)), dtype=np.float32).reshape(n_labels, h, w)


def refine_labels(rgb: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine an L-label probability map with a dense CRF; returns the (H, W) int64 label map.

    ``rgb``: (H, W, 3) uint8 image in RGB order; ``probs``: (L, H, W) per-label probabilities (each pixel's
    column need not sum exactly to 1: the unaries are ``-log`` of the clipped values). Without pydensecrf:
    one warning per process, then ``probs.argmax(0)``.
    """
    img, p = _check_inputs(rgb, probs, "probs", ndim=3)
    n_labels, h, w = p.shape
    if n_labels == 0:
        raise ValueError("probs needs at least one label")
    if n_labels == 1 or h == 0 or w == 0:
        return np.zeros((h, w), dtype=np.int64)
    dcrf = _import_densecrf()
    if dcrf is None:
        _warn_missing_once()
        return p.argmax(0)
    unary = np.ascontiguousarray(-np.log(np.clip(p, _PROB_EPS, 1.0)).reshape(n_labels, -1), dtype=np.float32)
    return _inference(dcrf, img, unary, params).argmax(0)


def _scaled(rgb: np.ndarray, maps: list[np.ndarray], params: CRFParams, max_side: int | None):
    """(scale, small rgb, small maps, scaled params) for running a CRF with the long side at ``max_side``.

    scale is 1.0 (and nothing is resized) when the image is already small enough.
    """
    H, W = maps[0].shape
    scale = 1.0 if not max_side else min(1.0, max_side / max(H, W))
    if scale >= 1.0:
        return scale, rgb, maps, params
    from PIL import Image

    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    small_rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BILINEAR))
    small = [np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((w, h), Image.BILINEAR)) for m in maps]
    scaled = dataclasses.replace(params, gauss_sxy=params.gauss_sxy * scale, bilateral_sxy=params.bilateral_sxy * scale)
    return scale, small_rgb, small, scaled


def _upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (h, w) map to size (H, W)."""
    from PIL import Image

    H, W = size
    return np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((W, H), Image.BILINEAR))


def refine_foreground_scaled(rgb: np.ndarray, fg_prob: np.ndarray, params: CRFParams = CRFParams(),
                             max_side: int | None = 160) -> np.ndarray:
    """:func:`refine_foreground` run with the long side reduced to ``max_side``, result at full size.

    The dense CRF costs about 1 s per VOC image at full size, three times a ViT-S/16 forward pass on a CPU,
    while its job here (snapping a 16-px-patch mask to colour edges) needs far fewer pixels. Both spatial
    standard deviations are scaled with the image, so the kernels cover the same part of the picture; the
    refined mask is upsampled bilinearly (as a 0/1 map, thresholded at 0.5) to the input size.
    """
    scale, small_rgb, (small_prob,), scaled = _scaled(rgb, [fg_prob], params, max_side)
    if scale >= 1.0:
        return refine_foreground(rgb, fg_prob, params)
    small = refine_foreground(small_rgb, small_prob, scaled).astype(np.float32)
    return _upsample_map(small, fg_prob.shape) > 0.5


def refine_labels_scaled(rgb: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(),
                         max_side: int | None = 160) -> np.ndarray:
    """:func:`refine_labels` run with the long side reduced to ``max_side``, result (H, W) at full size.

    Same scaling as :func:`refine_foreground_scaled` (image and every label's map resized bilinearly, both
    kernel widths scaled); the refined labels come back as one 0/1 map per label, each upsampled
    bilinearly, and the arg-max of those (the L-label form of "threshold the upsampled mask at 0.5").
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be a 3-D (L, H, W) array, got shape {probs.shape}")
    scale, small_rgb, small_probs, scaled = _scaled(rgb, list(probs), params, max_side)
    if scale >= 1.0 or len(probs) < 2:
        return refine_labels(rgb, probs, params)
    small = refine_labels(small_rgb, np.stack(small_probs), scaled)
    size = probs.shape[1:]
    up = np.stack([_upsample_map((small == label).astype(np.float32), size) for label in range(len(probs))])
    return up.argmax(0)
