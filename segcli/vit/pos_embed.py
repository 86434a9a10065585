"""Position-grid resizing as each checkpoint family's own code does it.

A ViT trained at 224 px has a 14x14 (or 28x28) grid of learned position embeddings; any other input size needs
a resized grid, and the resize is part of the model's function: features differ by up to 0.08 between two
reasonable choices at 448x672.  So the family's own resize is used, chosen by the checkpoint
(:attr:`segcli.vit.checkpoints.base.Checkpoint.pos_interp`):

* ``'dino'`` -- DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino), which Leopart and
  STEGO (and MaskDistill) inherit: bicubic ``F.interpolate`` of the patch grid with *scale factor*
  ``(g + 0.1) / g0`` per axis (the +0.1 avoids a floating-point off-by-one; see dino issue #8), no antialiasing,
  the CLS position unchanged, and no resize at all when the grid is already square and of the trained size;
* ``'dinov2'`` -- DINOv2's ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2) with the
  hub models' ``interpolate_offset=0.1`` and ``interpolate_antialias=False``: the same formula as DINO's (scale
  factor ``(g + 0.1) / M`` per axis, bicubic, no antialiasing, CLS position unchanged, no resize for the square
  trained grid), computed in float32 and cast back to the table's dtype.  Registers (the ``reg4`` models) get no
  position embedding: DINOv2 inserts them after adding it.  timm lays these models out with
  ``no_embed_class=True`` (its ``pos_embed`` has no CLS row; the CLS position is folded into ``cls_token`` by its
  checkpoint filter), which gives the same tokens;
* ``'bilinear'`` -- ``jax.image.resize`` as JAX-trained ViTs (LOCA) do (:func:`segcli.vit.backbone._bilinear_pos_embed`);
* ``None`` -- timm's own size-based bicubic, antialiased resize (models whose upstream is timm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["dino_interpolate", "dino_pos_embed", "dinov2_interpolate", "dinov2_pos_embed", "supports_dino_resize",
           "supports_dinov2_resize"]


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


def dinov2_interpolate(pos_embed: torch.Tensor, rows: int, cols: int, prefix: int = 1) -> torch.Tensor:
    """DINOv2's resize of a (1, prefix + M*M, C) table to a rows x cols patch grid -> (1, prefix + rows*cols, C).

    ``prefix`` is 1 for the plain layout (CLS position first) and 0 for timm's register layout (no CLS row)."""
    n = pos_embed.shape[1] - prefix
    if n == rows * cols and rows == cols:
        return pos_embed
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"DINOv2 position table of {n} patches is not square")
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    grid = pe[:, prefix:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(float(rows + 0.1) / m, float(cols + 0.1) / m), mode="bicubic",
                         antialias=False)
    if tuple(grid.shape[-2:]) != (rows, cols):  # DINOv2 asserts the same
        raise ValueError(f"DINOv2 position resize gave a {tuple(grid.shape[-2:])} grid for {rows}x{cols} patches")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pe[:, :prefix], grid], dim=1).to(pos_embed.dtype)


def supports_dinov2_resize(model: torch.nn.Module) -> bool:
    """A timm VisionTransformer laid out like DINOv2's: one CLS token, a square table with its CLS row, or (with
    registers) timm's ``no_embed_class`` table of the patch grid alone."""
    pos = getattr(model, "pos_embed", None)
    if pos is None or getattr(model, "cls_token", None) is None or not hasattr(model, "_pos_embed"):
        return False
    reg = getattr(model, "reg_token", None)
    n_reg = 0 if reg is None else int(reg.shape[1])
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    if int(getattr(model, "num_prefix_tokens", 1)) != 1 + n_reg or (n_reg and not no_embed_class):
        return False
    n = pos.shape[1] - (0 if no_embed_class else 1)
    return int(math.isqrt(n)) ** 2 == n


def dinov2_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (dynamic image size: x is (B, H, W, C)) with DINOv2's resize."""
    B, H, W, C = x.shape
    x = x.reshape(B, H * W, C)
    prefix = [self.cls_token.expand(B, -1, -1)]
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(B, -1, -1))
    if self.no_embed_class:  # timm's register layout: the CLS position is already in cls_token
        x = torch.cat(prefix + [x + dinov2_interpolate(self.pos_embed, H, W, prefix=0)], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + dinov2_interpolate(self.pos_embed, H, W, prefix=1)
    return self.pos_drop(x)
