"""Stage 2 of the pipeline: patch features, CLS token and CLS attention from the last ViT block.

One forward pass of :meth:`model.forward_features` per batch.  A forward hook on the last block's
``attn.qkv`` linear layer captures the fused query/key/value projection; from it we rebuild, exactly as
timm's ``Attention`` does, the per-head queries, keys and values (``q_norm``/``k_norm`` applied) and the
CLS-to-token attention ``softmax(q_cls * head_dim**-0.5 @ k^T)``.  The forward output itself (after the
final norm) gives the CLS token and the ``tokens`` features.  Prefix tokens (CLS and, for DINOv2 with
registers, the register tokens) are dropped from the patch grid.

Model loading lives in :mod:`segcli.backbone`; this module only needs a loaded backbone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from segcli.backbone import Backbone

from segcli.config import FEATURE_KINDS as KINDS  # noqa: E402  (one list, shared with the config)
from segcli.proposal import object_proposals  # noqa: E402


@dataclass
class FeatureBatch:
    """Features of a batch of images, all float32 on the CPU.

    feats: (B, h, w, D) per-patch features, L2-normalised along D (D = embed_dim for keys/queries/values
        of the standard ViTs: all heads concatenated per patch).
    cls:   (B, embed_dim) CLS token after the final norm (not normalised).
    attn:  (B, h, w) CLS-to-patch attention of the last block, averaged over heads.  The softmax runs over
        all tokens (prefix tokens included) and the prefix columns are then dropped, so every map sums to
        at most 1.
    proposal: (B, h, w) bool MaskDistill object proposal (:mod:`segcli.proposal`), None for a model
        without a CLS token.
    """

    feats: torch.Tensor
    cls: torch.Tensor
    attn: torch.Tensor
    proposal: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): the patch grid."""
        return int(self.feats.shape[1]), int(self.feats.shape[2])

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        from segcli.errors import UsageError

        raise UsageError(f"unknown feature kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


@contextlib.contextmanager
def capture_qkv(model: torch.nn.Module) -> Iterator[dict]:
    """Context manager: while active, ``store['qkv']`` receives the last block's ``attn.qkv`` output."""
    store: dict = {}

    def hook(_module, _inputs, output):
        store["qkv"] = output

    handle = model.blocks[-1].attn.qkv.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def split_qkv(attn_module: torch.nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused qkv projection (B, N, 3*H*d) -> q, k, v each (B, H, N, d), float32, q/k norms applied."""
    B, N, _ = qkv.shape
    heads, head_dim = attn_module.num_heads, attn_module.head_dim
    qkv = qkv.float().reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    return q.float(), k.float(), v.float()


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the CLS query (token 0) to all N tokens, per head: (B, H, N), rows sum to 1."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N): only the CLS row, never N x N
    return logits.softmax(dim=-1)[:, :, 0]


def _heads_to_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d): heads concatenated per token."""
    B, H, N, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, H * d)


def compute_features(backbone: "Backbone", batch: torch.Tensor, kind: str = "keys", proposal_heads: int = 5) -> FeatureBatch:
    """Run the backbone once on a normalised batch (B, 3, H, W) and build its :class:`FeatureBatch`.

    H and W should be multiples of the patch size; any remainder rows/columns (bottom/right) are cropped.
    ``proposal_heads``: heads averaged for the proposal's CLS row (:func:`segcli.proposal.object_proposal`).
    """
    check_kind(kind)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}")
    model = backbone.model
    p = backbone.patch_size
    h, w = int(batch.shape[2]) // p, int(batch.shape[3]) // p
    if h < 1 or w < 1:
        raise ValueError(f"input {tuple(batch.shape[2:])} is smaller than one {p}x{p} patch")
    batch = batch[:, :, : h * p, : w * p].to(backbone.device, dtype=torch.float32)
    n_prefix = backbone.num_prefix_tokens
    attn_module = model.blocks[-1].attn

    with torch.inference_mode():
        with capture_qkv(model) as store, backbone.autocast():
            out = model.forward_features(batch)
        out = out.float()
        q, k, v = split_qkv(attn_module, store.pop("qkv"))
        attn = cls_attention(q, k, float(attn_module.scale)).mean(dim=1)  # (B, N)
        proposal = None  # MaskDistill's object proposal needs the CLS query and the unscaled keys
        if getattr(model, "cls_token", None) is not None:
            proposal = object_proposals(q, k, (h, w), n_prefix, heads=proposal_heads)
        if kind == "keys":
            tok = _heads_to_patches(k)
        elif kind == "queries":
            tok = _heads_to_patches(q)
        elif kind == "values":
            tok = _heads_to_patches(v)
        else:
            tok = out
        B = batch.shape[0]
        if tok.shape[1] != n_prefix + h * w:  # pragma: no cover - a model that pads or pools tokens
            raise RuntimeError(f"{backbone.name}: got {tok.shape[1]} tokens, expected {n_prefix} + {h}x{w}")
        feats = F.normalize(tok[:, n_prefix:], dim=-1).reshape(B, h, w, -1)
        cls = out[:, 0]
        attn_map = attn[:, n_prefix:].reshape(B, h, w)
        return FeatureBatch(
            feats=feats.to("cpu", torch.float32).contiguous(),
            cls=cls.to("cpu", torch.float32).contiguous(),
            attn=attn_map.to("cpu", torch.float32).contiguous(),
            proposal=proposal,
        )


def extract_features(
    backbone: "Backbone",
    rgb: np.ndarray,
    short_side: int = 448,
    kind: str = "keys",
    max_side: int | None = 1344,
) -> FeatureBatch:
    """Features of one RGB uint8 image (H, W, 3): :meth:`Backbone.prepare` then one forward pass (B = 1)."""
    x = backbone.prepare(rgb, short_side=short_side, max_side=max_side)
    return compute_features(backbone, x.unsqueeze(0), kind=kind)


def embed_crops(
    backbone: "Backbone", crops: list[np.ndarray], size: int = 224, batch_size: int = 32
) -> np.ndarray:
    """L2-normalised final-norm CLS tokens (n, embed_dim) float32 of RGB uint8 crops resized to size x size.

    ``size`` is rounded to a multiple of the patch size (at least one patch).
    """
    from segcli.backbone import resize_normalise  # local: backbone imports this module

    n = len(crops)
    out = np.zeros((n, backbone.embed_dim), dtype=np.float32)
    if n == 0:
        return out
    p = backbone.patch_size
    side = max(p, int(round(size / p)) * p)
    batch_size = max(1, int(batch_size))
    model = backbone.model
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            chunk = crops[start : start + batch_size]
            x = torch.stack([resize_normalise(c, side, side, backbone.mean, backbone.std) for c in chunk])
            x = x.to(backbone.device)
            with backbone.autocast():
                tokens = model.forward_features(x)
            cls = F.normalize(tokens[:, 0].float(), dim=-1)
            out[start : start + len(chunk)] = cls.cpu().numpy()
    return out
