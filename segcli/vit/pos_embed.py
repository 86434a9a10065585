"""Position-grid resizing as each checkpoint family's own code does it.

A ViT trained at 224 px has a 14x14 (or 28x28) grid of learned position embeddings; any other input size needs
a resized grid, and the resize is part of the model's function: features differ by up to 0.08 between two
reasonable choices at 448x672.  So the family's own resize is used, chosen by the checkpoint
(:attr:`segcli.vit.checkpoints.base.Checkpoint.pos_interp`):

* ``'dino'`` -- DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino), which Leopart and
  STEGO (and MaskDistill) inherit: bicubic ``F.interpolate`` of the patch grid with *scale factor*
  ``(g + 0.1) / g0`` per axis (the +0.1 avoids a floating-point off-by-one; see dino issue #8), no antialiasing,
  the CLS position unchanged, and no resize at all when the grid is already square and of the trained size;
* ``'bilinear'`` -- ``jax.image.resize`` as JAX-trained ViTs (LOCA) do (:func:`segcli.vit.backbone._bilinear_pos_embed`);
* ``None`` -- timm's own size-based bicubic, antialiased resize (DINOv2 and models whose upstream is timm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["dino_interpolate", "dino_pos_embed", "supports_dino_resize"]


def dino_interpolate(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's resize of a (1, 1 + g0*g0, C) table (CLS first) to a rows x cols patch grid -> (1, 1 + rows*cols, C)."""
    n = pos_embed.shape[1] - 1
    if n == rows * cols and rows == cols:
        return pos_embed
    g0 = math.sqrt(n)
    side = int(g0)
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / g0, (cols + 0.1) / g0), mode="bicubic")
    if tuple(grid.shape[-2:]) != (rows, cols):  # DINO asserts the same
        raise ValueError(f"DINO position resize gave a {tuple(grid.shape[-2:])} grid for {rows}x{cols} patches")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def supports_dino_resize(model: torch.nn.Module) -> bool:
    """A timm VisionTransformer laid out like DINO's: one CLS token sharing the square position table, no registers."""
    pos = getattr(model, "pos_embed", None)
    if pos is None or getattr(model, "cls_token", None) is None or getattr(model, "reg_token", None) is not None:
        return False
    if getattr(model, "no_embed_class", False) or int(getattr(model, "num_prefix_tokens", 1)) != 1:
        return False
    n = pos.shape[1] - 1
    return int(math.isqrt(n)) ** 2 == n and hasattr(model, "_pos_embed")


def dino_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (dynamic image size: x is (B, H, W, C)) with DINO's resize."""
    B, H, W, C = x.shape
    pos = dino_interpolate(self.pos_embed, H, W)
    x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
    return self.pos_drop(x + pos)
