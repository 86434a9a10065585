"""Independent restatements of the upstream forward passes, written here from the upstream code (not segcli's,
not timm's): what segcli's features must equal.

* DINO ``vision_transformer.py`` (facebookresearch/dino @ 04c0ad9, read for issue 19): ``prepare_tokens`` (conv
  patch embedding, CLS prepended, ``interpolate_pos_encoding``), pre-LN blocks (qkv with bias, softmax(q k^T *
  d^-0.5), proj; fc1, exact GELU, fc2), final LayerNorm (eps 1e-6).  Leopart's ``src/vit.py`` and STEGO's
  ``dino/vision_transformer.py`` are copies of it.
* ``interpolate_pos_encoding`` exactly as upstream: ``B, nc, w, h = x.shape`` (so ``w`` is the *height*),
  ``w0 = w // patch + 0.1``, ``h0 = h // patch + 0.1``, bicubic ``F.interpolate`` with
  ``scale_factor=(w0 / sqrt(N), h0 / sqrt(N))`` and no antialiasing; unchanged when ``npatch == N and w == h``.
* LOCA (scenic projects/loca/vit.py): see :func:`loca_forward`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, patch: int, npatch: int, w: int, h: int) -> torch.Tensor:
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch
    h0 = h // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@torch.no_grad()
def dino_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """DINO ViT tokens after the final norm, (B, 1 + N, D), from a DINO-named state dict."""
    w_pe = sd["patch_embed.proj.weight"]
    patch, dim = w_pe.shape[-1], w_pe.shape[0]
    B, _, w, h = x.shape
    t = F.conv2d(x, w_pe, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)
    t = t + dino_interpolate_pos_encoding(sd["pos_embed"], patch, t.shape[1] - 1, w, h)
    ln = lambda z, pre: F.layer_norm(z, (dim,), sd[pre + ".weight"], sd[pre + ".bias"], eps=eps)  # noqa: E731
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        pre = f"blocks.{i}."
        z = ln(t, pre + "norm1")
        qkv = (z @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]).reshape(B, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        z = (att @ v).transpose(1, 2).reshape(B, -1, dim)
        t = t + z @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        z = ln(t, pre + "norm2")
        z = F.gelu(z @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        t = t + z @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        i += 1
    return ln(t, "norm")


@torch.no_grad()
def stego_code(state: dict[str, torch.Tensor], tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """STEGO's DinoFeaturizer code (projection_type 'nonlinear'): cluster1(f) + cluster2(f) on the final-norm
    patch tokens laid out as an image, (B, h, w, c)."""
    f = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    c1 = F.conv2d(f, state["net.cluster1.0.weight"], state["net.cluster1.0.bias"])
    c2 = F.conv2d(F.relu(F.conv2d(f, state["net.cluster2.0.weight"], state["net.cluster2.0.bias"])),
                  state["net.cluster2.2.weight"], state["net.cluster2.2.bias"])
    return (c1 + c2).permute(0, 2, 3, 1)


@torch.no_grad()
def loca_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """ViT4LOCA's encoder written out from its flax parameters (scenic projects/loca/vit.py): conv patch embed,
    2-D position grid resized bilinearly (half-pixel, as jax.image.resize upsamples), pre-LN blocks with
    eps 1e-6 and tanh GELU, encoder_norm."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    kernel = t(p["embedding"]["kernel"])  # (p, p, 3, D)
    patch, dim = kernel.shape[0], kernel.shape[-1]
    y = F.conv2d(x, kernel.permute(3, 2, 0, 1), t(p["embedding"]["bias"]), stride=patch)  # (1, D, h, w)
    h, w = y.shape[-2:]
    pos = t(p["posembed_input"]).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
    y = (y + pos).flatten(2).transpose(1, 2)
    ln = lambda z, q: F.layer_norm(z, (dim,), t(q["scale"]), t(q["bias"]), eps=1e-6)  # noqa: E731
    i = 0
    while f"encoderblock_{i}" in p:
        b = p[f"encoderblock_{i}"]
        a = b["MultiHeadDotProductAttention_0"]
        z = ln(y, b["LayerNorm_0"])
        q, k, v = (torch.einsum("bnd,dhk->bhnk", z, t(a[n]["kernel"])) + t(a[n]["bias"])[None, :, None] for n in ("query", "key", "value"))
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        y = y + torch.einsum("bhnk,hkd->bnd", att @ v, t(a["out"]["kernel"])) + t(a["out"]["bias"])
        m = b["MlpBlock_0"]
        z = ln(y, b["LayerNorm_1"])
        z = F.gelu(z @ t(m["Dense_0"]["kernel"]) + t(m["Dense_0"]["bias"]), approximate="tanh")
        y = y + z @ t(m["Dense_1"]["kernel"]) + t(m["Dense_1"]["bias"])
        i += 1
    return ln(y, p["encoder_norm"])
