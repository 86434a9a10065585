"""Stage 2 of the pipeline: patch features, CLS token and CLS attention from the last ViT block.

One forward pass of :meth:`model.forward_features` per batch.  A forward pre-hook on the last block's
attention module captures its input (and, for timm's ``EvaAttention``, the rotary embedding it is given);
from it we rebuild, exactly as the module does, the per-head queries, keys and values (q/k/v projection
with its bias, ``q_norm``/``k_norm``, then RoPE on the patch tokens for DINOv3 and the other RoPE ViTs) and
the CLS-to-token attention ``softmax(q_cls * head_dim**-0.5 @ k^T)``.  (A hook on ``attn.qkv`` would miss
RoPE, and never fires for the ``*_qkvb`` models, whose forward calls ``F.linear`` directly.)  The forward
output itself (after the final norm) gives the CLS token and the ``tokens`` features; STEGO's head turns
those tokens into its ``code``.  Prefix tokens (CLS and register tokens) are dropped from the patch grid.

ViTs without a CLS token (LOCA, timm's ``*_gap_*`` register models, MAE/SAM-style encoders): the image
descriptor is the mean of the final-norm patch tokens (timm's ``global_pool='avg'``), and where CLS attention
served as saliency we use a training-free substitute, :func:`pca_saliency` (the image's first principal
component of its patch features, oriented away from the image border).

Model loading lives in :mod:`segcli.vit.backbone`; this module only needs a loaded backbone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from segcli.vit.backbone import Backbone

from segcli.config import FEATURE_KINDS as KINDS  # noqa: E402  (one list, shared with the config)
from segcli.method.proposal import object_proposals  # noqa: E402
from segcli.vit.preprocess import resize_normalise  # noqa: E402


@dataclass
class FeatureBatch:
    """Features of a batch of images, all float32 on the CPU.

    feats: (B, h, w, D) per-patch features, L2-normalised along D (D = embed_dim for keys/queries/values
        of the standard ViTs: all heads concatenated per patch).
    cls:   (B, embed_dim) CLS token after the final norm (not normalised); for ViTs without a CLS token the
        mean of the final-norm patch tokens.
    attn:  (B, h, w) CLS-to-patch attention of the last block, averaged over heads.  The softmax runs over
        all tokens (prefix tokens included) and the prefix columns are then dropped, so every map sums to
        at most 1.  Without a CLS token: :func:`pca_saliency` (non-negative, sums to 1).
    proposal: (B, h, w) bool MaskDistill object proposal (:mod:`segcli.method.proposal`), None for a model
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
def capture_attention_input(model: torch.nn.Module) -> Iterator[dict]:
    """While active, ``store['x']`` / ``store['rope']`` receive the last block's attention input and rotary
    embedding (None for ViTs without RoPE)."""
    store: dict = {}

    def hook(_module, args, kwargs):
        store["x"] = args[0] if args else kwargs["x"]
        store["rope"] = args[1] if len(args) > 1 else kwargs.get("rope")

    handle = model.blocks[-1].attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def split_qkv(attn_module: torch.nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused qkv projection (B, N, 3*H*d) -> q, k, v each (B, H, N, d), float32, q/k norms applied (no RoPE)."""
    B, N, _ = qkv.shape
    heads, head_dim = attn_module.num_heads, attn_module.head_dim
    qkv = qkv.float().reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    return q.float(), k.float(), v.float()


def project_qkv(attn_module: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention input (B, N, C) -> q, k, v each (B, H, N, d), float32, exactly as the module computes
    them: fused ``qkv`` (with DINOv3-qkvb's separate q/k/v biases) or separate projections, q/k norms, and RoPE
    on the tokens after the module's prefix tokens."""
    B, N, _ = x.shape
    heads, head_dim = attn_module.num_heads, attn_module.head_dim
    qkv_layer = getattr(attn_module, "qkv", None)
    if qkv_layer is not None:
        q_bias = getattr(attn_module, "q_bias", None)
        if q_bias is not None:
            qkv = F.linear(x, qkv_layer.weight, torch.cat((q_bias, attn_module.k_bias, attn_module.v_bias)))
        else:
            qkv = qkv_layer(x)
        q, k, v = split_qkv(attn_module, qkv)
    else:
        q, k, v = (getattr(attn_module, n)(x).float().reshape(B, N, heads, head_dim).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q, k = attn_module.q_norm(q).float(), attn_module.k_norm(k).float()
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        npt = int(getattr(attn_module, "num_prefix_tokens", 0))
        half = bool(getattr(attn_module, "rotate_half", False))
        rope = rope.float()
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    return q, k, v.float()


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the CLS query (token 0) to all N tokens, per head: (B, H, N), rows sum to 1."""
    # Only the CLS row, never N x N; an element-wise product and sum rather than a batched matmul, whose
    # kernel choice depends on the batch size: this way an image's map is bit-identical in any batch.
    logits = ((q[:, :, :1] * scale) * k).sum(dim=-1)  # (B, H, N)
    return logits.softmax(dim=-1)


def _heads_to_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d): heads concatenated per token."""
    B, H, N, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, H * d)


def border_mask(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w,) bool, True on the outermost ring of patches."""
    m = torch.zeros(h, w, dtype=torch.bool, device=device)
    m[0, :] = m[-1, :] = True
    m[:, 0] = m[:, -1] = True
    return m.reshape(-1)


def pca_saliency(feats: torch.Tensor) -> torch.Tensor:
    """Training-free saliency for ViTs without a CLS token: (B, h, w, D) patch features -> (B, h, w).

    Per image, the patch features are centred and projected on their first principal component (the
    saliency DINOv2's authors use to separate objects from background); the component's sign is arbitrary, so
    it is oriented away from the border (border patches get the lower mean score: backgrounds touch the
    frame).  Scores are shifted to start at 0 and divided by their sum, so each map is non-negative and sums
    to 1 like a CLS attention row over the patches.  A map with no variation is uniform.
    """
    B, h, w, D = feats.shape
    X = feats.reshape(B, h * w, D).float()
    X = X - X.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(X, full_matrices=False)
    score = (X @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # (B, h*w)
    ring = border_mask(h, w, feats.device)
    if bool((~ring).any()):
        flip = score[:, ring].mean(dim=1) > score[:, ~ring].mean(dim=1)
        score = torch.where(flip[:, None], -score, score)
    score = score - score.min(dim=1, keepdim=True).values
    total = score.sum(dim=1, keepdim=True)
    uniform = torch.full_like(score, 1.0 / (h * w))
    return torch.where(total > 1e-12, score / total.clamp_min(1e-12), uniform).reshape(B, h, w)


def image_descriptor(backbone: "Backbone", tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) final-norm tokens -> (B, D): the CLS token, or the mean patch token without one."""
    if backbone.has_cls:
        return tokens[:, 0]
    return tokens[:, backbone.num_prefix_tokens:].mean(dim=1)


def _flip_averaged_code(backbone: "Backbone", batch: torch.Tensor, out: torch.Tensor, n_prefix: int, h: int,
                        w: int) -> torch.Tensor:
    """STEGO's code as STEGO's evaluation computes it: the mean of the image's code and the horizontally
    mirrored code of its mirror image, ``(code(x) + flip(code(flip(x)))) / 2`` (eval_segmentation.py), before
    the cluster probe normalises it.  Costs a second backbone pass; prefix tokens keep the first pass's code."""
    model = backbone.model
    code = backbone.head(out).float()
    with backbone.autocast():
        mirrored = model.forward_features(batch.flip(-1))
    code2 = backbone.head(mirrored.float()).float()
    B = batch.shape[0]
    grid2 = code2[:, n_prefix:].reshape(B, h, w, -1).flip(2).reshape(B, h * w, -1)
    return torch.cat([code[:, :n_prefix], (code[:, n_prefix:] + grid2) / 2], dim=1)


def compute_features(backbone: "Backbone", batch: torch.Tensor, kind: str = "keys", proposal_heads: int = 5) -> FeatureBatch:
    """Run the backbone once on a normalised batch (B, 3, H, W) and build its :class:`FeatureBatch`.

    H and W should be multiples of the patch size; any remainder rows/columns (bottom/right) are cropped.
    ``proposal_heads``: heads averaged for the proposal's CLS row (:func:`segcli.method.proposal.object_proposal`).
    """
    check_kind(kind)
    if kind == "code" and getattr(backbone, "head", None) is None:
        from segcli.errors import UsageError

        raise UsageError("--feature code is STEGO's code: it needs a STEGO checkpoint (--weights), this backbone has no code head")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}")
    model = backbone.model
    p = backbone.patch_size
    h, w = int(batch.shape[2]) // p, int(batch.shape[3]) // p
    if h < 1 or w < 1:
        raise ValueError(f"input {tuple(batch.shape[2:])} is smaller than one {p}x{p} patch")
    batch = batch[:, :, : h * p, : w * p].to(backbone.device, dtype=torch.float32)
    n_prefix = backbone.num_prefix_tokens
    has_cls = getattr(backbone, "has_cls", True)
    attn_module = model.blocks[-1].attn

    with torch.inference_mode():
        with capture_attention_input(model) as store, backbone.autocast():
            out = model.forward_features(batch)
            # q, k, v: (B, H, N, d) float32, after q/k norms (and RoPE on patch tokens), prefix tokens included
            q, k, v = project_qkv(attn_module, store.pop("x"), store.pop("rope", None))
        out = out.float()
        proposal = None  # MaskDistill's object proposal needs the CLS query and the unscaled keys
        if has_cls:
            proposal = object_proposals(q, k, (h, w), n_prefix, heads=proposal_heads)
        if kind == "keys":
            tok = _heads_to_patches(k)
        elif kind == "queries":
            tok = _heads_to_patches(q)
        elif kind == "values":
            tok = _heads_to_patches(v)
        elif kind == "code":
            tok = _flip_averaged_code(backbone, batch, out, n_prefix, h, w)
        else:
            tok = out
        B = batch.shape[0]
        if tok.shape[1] != n_prefix + h * w:  # pragma: no cover - a model that pads or pools tokens
            raise RuntimeError(f"{backbone.name}: got {tok.shape[1]} tokens, expected {n_prefix} + {h}x{w}")
        feats = F.normalize(tok[:, n_prefix:], dim=-1).reshape(B, h, w, -1)
        cls = image_descriptor(backbone, out)
        if has_cls:
            attn = cls_attention(q, k, float(attn_module.scale)).mean(dim=1)  # (B, N)
            attn_map = attn[:, n_prefix:].reshape(B, h, w)
        else:
            attn_map = pca_saliency(feats)
        feats, cls, attn_map, proposal = to_host(feats, cls, attn_map, proposal)
        return FeatureBatch(feats=feats, cls=cls, attn=attn_map, proposal=proposal)


def to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Device results as contiguous CPU tensors (float32 for floating point ones).

    On CUDA every copy is queued non-blocking into pinned memory and the host waits once for all of them,
    instead of one synchronising copy per tensor."""
    out: list[torch.Tensor | None] = []
    cuda = any(t is not None and t.device.type == "cuda" for t in tensors)
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if t.is_floating_point():
            t = t.float()
        if cuda and t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        else:
            out.append(t.to("cpu").contiguous())
    if cuda:
        torch.cuda.current_stream().synchronize()
    return out


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


def crop_side(patch_size: int, size: int) -> int:
    """The side of the crop forward's input: ``size`` rounded to a multiple of the patch (at least one patch)."""
    return max(patch_size, int(round(size / patch_size)) * patch_size)


def embed_crops(
    backbone: "Backbone", crops: list[np.ndarray], size: int = 224, batch_size: int = 32
) -> np.ndarray:
    """L2-normalised final-norm CLS tokens (n, embed_dim) float32 of RGB uint8 crops resized to size x size
    (the mean patch token for ViTs without a CLS token).

    A crop may also be a (3, side, side) tensor already resized and normalised, on any device (the device
    path's crops, :func:`segcli.method.regions.crop_batch`).

    ``size`` is rounded to a multiple of the patch size (at least one patch).
    """

    n = len(crops)
    out = np.zeros((n, backbone.embed_dim), dtype=np.float32)
    if n == 0:
        return out
    side = crop_side(backbone.patch_size, size)
    batch_size = max(1, int(batch_size))
    model = backbone.model
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            chunk = crops[start : start + batch_size]
            prepared = [c if isinstance(c, torch.Tensor) else resize_normalise(c, side, side, backbone.mean, backbone.std)
                        for c in chunk]
            x = torch.stack([t.to(backbone.device, non_blocking=True) for t in prepared])
            with backbone.autocast():
                tokens = model.forward_features(x)
            cls = F.normalize(image_descriptor(backbone, tokens.float()), dim=-1)
            out[start : start + len(chunk)] = cls.cpu().numpy()
    return out
