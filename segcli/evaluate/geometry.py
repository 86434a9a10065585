"""Bringing a prediction and its ground truth onto the same pixel grid.

``full`` protocol: the prediction is resized to the ground truth's size (nearest neighbour) when they differ.
``stego`` protocol (STEGO's evaluation transform, ``T.Resize(320, NEAREST)`` + ``T.CenterCrop(320)``): after that,
both sides are resized so the short side is 320 (nearest; the long side is ``int(320 * long / short)`` as
torchvision computes it) and centre-cropped to 320x320 (offsets ``int(round((size - 320) / 2))``). A prediction
that is already 320x320 while its ground truth is not is taken to be in that geometry already (it is counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segcli.errors import InputError

STEGO_SIZE = 320


def resize_short_side(img, size: int):
    """Resize a PIL image (nearest) so its short side is ``size``, like torchvision ``Resize(size)``."""
    from PIL import Image

    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.NEAREST)


def center_crop(img, size: int):
    """Centre crop to ``size`` x ``size`` (torchvision's offsets; the image must be at least that large)."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    if (w, h) == (size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def stego_transform(img, size: int = STEGO_SIZE):
    return center_crop(resize_short_side(img, size), size)


@dataclass
class Aligned:
    pred: object  # PIL images on the same grid
    gt: object
    resized: bool = False  # the prediction was resized to the ground truth's size
    precropped: bool = False  # stego protocol: the prediction was already 320x320


def align(pred, gt, protocol: str, strict_size: bool, pred_path: Path, gt_path: Path) -> Aligned:
    """Put ``pred`` on ``gt``'s grid (nearest resize, or an error with ``strict_size``), then apply the protocol."""
    from PIL import Image

    out = Aligned(pred, gt)
    if protocol == "stego" and pred.size == (STEGO_SIZE, STEGO_SIZE) and gt.size != pred.size:
        out.gt = stego_transform(gt)
        out.precropped = True
        return out
    if pred.size != gt.size:
        if strict_size:
            raise InputError(
                f"prediction {pred_path} is {pred.width}x{pred.height} but its ground truth {gt_path} is "
                f"{gt.width}x{gt.height} (--strict-size)"
            )
        out.pred = pred.resize(gt.size, Image.Resampling.NEAREST)
        out.resized = True
    if protocol == "stego":
        out.pred = stego_transform(out.pred)
        out.gt = stego_transform(out.gt)
    return out
