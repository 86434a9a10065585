"""The backbone's input geometry: which size an image is resized to, and how it is normalised.

Apart from :mod:`segcli.vit.backbone` so that the feature code (:mod:`segcli.vit.features`, region crops) can
prepare inputs without importing the model loader that imports it.
"""

from __future__ import annotations

import numpy as np
import torch


def target_size(height: int, width: int, patch: int, short_side: int = 448, max_side: int | None = 1344) -> tuple[int, int]:
    """(H', W') for an image of ``height`` x ``width``: keep the aspect ratio, short side -> ``short_side``
    (up or down), long side at most ``max_side``, both rounded to a multiple of ``patch`` (at least one)."""
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    if short_side < 1:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    if max_side is not None and max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    cap = None if max_side is None else max(patch, (int(max_side) // patch) * patch)

    def snap(x: float) -> int:
        v = max(patch, int(round(x / patch)) * patch)
        return min(v, cap) if cap is not None else v

    return snap(height * scale), snap(width * scale)


def as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """Accept (H, W, 3) uint8 (also (H, W), (H, W, 1), (H, W, 4)); return contiguous (H, W, 3) uint8."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def resize_normalise(rgb: np.ndarray, height: int, width: int, mean, std) -> torch.Tensor:
    """uint8 RGB -> float32 (3, height, width): PIL bicubic resize (antialiased), then (x/255 - mean)/std."""
    from PIL import Image

    a = as_rgb_uint8(rgb)
    if a.shape[0] != height or a.shape[1] != width:
        a = np.array(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC))
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)
