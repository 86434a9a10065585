"""LOCA (Caron et al., 2022; google-research/scenic ``projects/loca``) flax msgpack checkpoints.

A ViT with no CLS token: the patch grid plus a learned 2-D position grid ``posembed_input (1, 14, 14, D)``,
pre-LN blocks with tanh GELU (flax ``nn.gelu``), LayerNorm eps 1e-6, and ``encoder_norm`` at the end.  The
encoder is found by structure, so both trees seen in scenic work: LOCA's own TrainState
(``{params: {ToTokenSequence_0: {embedding, posembed_input}, encoderblock_i, encoder_norm, heads...},
ema_params: ...}``) and scenic's baseline ViT (``{embedding, Transformer: {posembed_input: {pos_embedding},
encoderblock_i, encoder_norm}, output_projection}``).  We read ``params`` (the student, the weights the
training step optimises and scenic saves for fine-tuning); ``ema_params`` (the EMA teacher) has the same
layout and is used only when a file has no ``params``.
It maps onto timm's ``VisionTransformer(class_token=False, fc_norm=False, act_layer='gelu_tanh')``; the
position grid is resized bilinearly, as ``jax.image.resize`` does, for other input sizes.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import torch

from segcli.vit.checkpoints.base import Checkpoint
from segcli.errors import ModelError

_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _find(tree, pred, depth: int = 0):
    """First dict in the tree (depth-first, keys in order) for which pred(dict) holds."""
    if not isinstance(tree, dict) or depth > 8:
        return None
    if pred(tree):
        return tree
    for v in tree.values():
        hit = _find(v, pred, depth + 1)
        if hit is not None:
            return hit
    return None


def _params(raw: dict) -> dict:
    for key in ("params", "ema_params"):
        if isinstance(raw.get(key), dict) and raw[key]:
            return raw[key]
    return raw


def matches(raw: dict) -> bool:
    return not any(isinstance(v, torch.Tensor) for v in raw.values()) and _find(_params(raw), lambda d: "encoderblock_0" in d) is not None


def _t(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.kind != "f":  # weights are floats; int / bool / complex arrays are not a model's weights
        raise ModelError(f"LOCA array of dtype {a.dtype} where floating-point weights are needed")
    return torch.from_numpy(np.array(a, dtype=np.float32))


def parse(raw: dict, label: str) -> Checkpoint | None:
    if not matches(raw):
        return None
    tree = _params(raw)
    enc = _find(tree, lambda d: "encoderblock_0" in d)
    emb = _find(tree, lambda d: isinstance(d.get("embedding"), dict) and np.ndim(d["embedding"].get("kernel")) == 4)
    pos_holder = _find(tree, lambda d: "posembed_input" in d)
    if emb is None or pos_holder is None or "encoder_norm" not in enc:
        raise ModelError(f"{label}: a flax ViT without a patch embedding, position embedding or encoder_norm")
    try:
        kernel = np.asarray(emb["embedding"]["kernel"])  # (p, p, 3, D)
        p, dim = int(kernel.shape[0]), int(kernel.shape[-1])
        pos = emb_pos = pos_holder["posembed_input"]
        if isinstance(pos, dict):
            emb_pos = np.asarray(pos["pos_embedding"])  # (1, N, D)
        emb_pos = np.asarray(emb_pos)
        cls = _find(tree, lambda d: np.ndim(d.get("cls")) == 3)
        n = emb_pos.shape[1] * emb_pos.shape[2] if emb_pos.ndim == 4 else emb_pos.shape[1]
        has_cls = cls is not None and emb_pos.ndim == 3 and int(round((n - 1) ** 0.5)) ** 2 == n - 1
        grid = int(round((n - int(has_cls)) ** 0.5))
        if grid * grid != n - int(has_cls):
            raise ModelError(f"{label}: position embedding of {n} entries is not a square grid")
        depth = 1 + max(int(m.group(1)) for k in enc if (m := re.fullmatch(r"encoderblock_(\d+)", k)))
        sd: dict[str, torch.Tensor] = {
            "patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
            "patch_embed.proj.bias": _t(emb["embedding"]["bias"]),
            "pos_embed": _t(emb_pos.reshape(1, -1, dim)),
            "norm.weight": _t(enc["encoder_norm"]["scale"]),
            "norm.bias": _t(enc["encoder_norm"]["bias"]),
        }
        if has_cls:
            sd["cls_token"] = _t(cls["cls"])
        heads = None
        for i in range(depth):
            b = enc[f"encoderblock_{i}"]
            att = b["MultiHeadDotProductAttention_0"]
            heads = int(np.shape(att["query"]["kernel"])[1])
            pre = f"blocks.{i}."
            sd[pre + "norm1.weight"], sd[pre + "norm1.bias"] = _t(b["LayerNorm_0"]["scale"]), _t(b["LayerNorm_0"]["bias"])
            sd[pre + "norm2.weight"], sd[pre + "norm2.bias"] = _t(b["LayerNorm_1"]["scale"]), _t(b["LayerNorm_1"]["bias"])
            sd[pre + "attn.qkv.weight"] = torch.cat([_t(np.asarray(att[n_]["kernel"]).reshape(dim, dim).T) for n_ in ("query", "key", "value")])
            sd[pre + "attn.qkv.bias"] = torch.cat([_t(np.asarray(att[n_]["bias"]).reshape(-1)) for n_ in ("query", "key", "value")])
            sd[pre + "attn.proj.weight"] = _t(np.asarray(att["out"]["kernel"]).reshape(dim, dim).T)
            sd[pre + "attn.proj.bias"] = _t(att["out"]["bias"])
            mlp = b["MlpBlock_0"]
            sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = _t(np.asarray(mlp["Dense_0"]["kernel"]).T), _t(mlp["Dense_0"]["bias"])
            sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = _t(np.asarray(mlp["Dense_1"]["kernel"]).T), _t(mlp["Dense_1"]["bias"])
            mlp_dim = int(np.shape(mlp["Dense_0"]["kernel"])[1])
    except ModelError as err:
        raise ModelError(str(err) if str(err).startswith(label) else f"{label}: {err}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise ModelError(f"{label}: unexpected LOCA/scenic ViT tree ({type(err).__name__}: {err})") from None
    size = _SIZES.get(dim)
    arch = f"vit_{size}_patch{p}_224" if size else None
    build = dict(
        img_size=grid * p, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_dim / dim,
        qkv_bias=True, class_token=has_cls, global_pool="token" if has_cls else "avg", fc_norm=False,
        act_layer="gelu_tanh", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        # LOCA's config normalises with the ImageNet mean/std (MEAN_RGB / STDDEV_RGB)
        pretrained_cfg_overlay=dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
    return Checkpoint(system="loca", state_dict=sd, arch=arch, build=build, pos_interp="bilinear", feature="tokens")
