"""The plain ViT layouts: official DINO ``.pth`` (backbone or full training checkpoint), official DINOv2,
official DINOv3, timm state dicts (also wrapped) and safetensors, plus the shared step that fits any
backbone state dict to a timm model.  Also reads the architecture from the tensor shapes.
"""

from __future__ import annotations

import re

import torch

from segcli.vit.checkpoints.base import Checkpoint, block_count, first_line, tensor_dict
from segcli.errors import ModelError

__all__ = ["fit_state_dict", "infer_arch", "parse", "strip_to_backbone"]

_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}


def strip_to_backbone(sd: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Find the ViT inside (by its patch embedding) and strip 'module.', 'backbone.', 'teacher.' etc."""
    suffix = "patch_embed.proj.weight"
    prefixes = sorted({k[: -len(suffix)] for k in sd if k.endswith(suffix)}, key=lambda s: ("teacher" not in s, len(s)))
    if not prefixes:
        raise ModelError(f"{label} is not a ViT checkpoint (no {suffix} among its {len(sd)} tensors)")
    prefix = prefixes[0]
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # classifier / DINO projection heads are not part of the backbone (the model has num_classes=0)
    return {k: v for k, v in sd.items() if not re.match(r"(head|head_dist|pre_logits)\.", k)}


def _registers(sd: dict[str, torch.Tensor]) -> int:
    for k in ("register_tokens", "reg_token", "storage_tokens"):
        if k in sd and sd[k].ndim == 3:
            return int(sd[k].shape[1])
    return 0


def system_of(sd: dict[str, torch.Tensor]) -> str:
    """'dinov3', 'dinov2' or 'vit' (DINO and other timm ViTs) from key names."""
    if "storage_tokens" in sd or "rope_embed.periods" in sd or ("pos_embed" not in sd and "blocks.0.gamma_1" in sd):
        return "dinov3"
    if "mask_token" in sd or "blocks.0.ls1.gamma" in sd:
        return "dinov2"
    return "vit"


def infer_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """The timm model (with its pretrained tag, for the input normalisation) whose shapes these tensors have."""
    from segcli.vit.compat import import_timm

    pe = sd.get("patch_embed.proj.weight")
    if pe is None or pe.ndim != 4 or int(pe.shape[0]) not in _SIZES:
        return None
    size, p, depth = _SIZES[int(pe.shape[0])], int(pe.shape[-1]), block_count(sd)
    system = system_of(sd)
    if system == "dinov3":
        qkvb = "blocks.0.attn.q_bias" in sd or "blocks.0.attn.qkv.bias" in sd
        arch, tag = f"vit_{size}_patch{p}_dinov3{'_qkvb' if qkvb else ''}", "lvd1689m"
    elif system == "dinov2":
        reg = _registers(sd)
        arch, tag = f"vit_{size}_patch{p}{f'_reg{reg}' if reg else ''}_dinov2", "lvd142m"
    else:
        arch, tag = f"vit_{size}_patch{p}_224", "dino"
    timm = import_timm()
    if not timm.is_model(arch):
        return None
    if depth != len(timm.create_model(arch, pretrained=False, num_classes=0, device="meta").blocks):
        return None
    return f"{arch}.{tag}" if timm.list_pretrained(f"{arch}.{tag}") else arch


def parse(raw: dict, label: str) -> Checkpoint | None:
    """Any plain ViT checkpoint (the fallback layout)."""
    tensors = tensor_dict(raw)
    if not tensors:
        return None
    sd = strip_to_backbone(tensors, label)
    system = system_of(sd)
    return Checkpoint(system="dino" if system == "vit" else system, state_dict=sd, arch=infer_arch(sd))


def _filter_fn(model: torch.nn.Module):
    """timm's own conversion of foreign layouts (official DINOv2 / DINOv3 names) for this model's family."""
    if type(model).__name__ == "Eva":
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn


def fit_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module, name: str, label: str) -> dict[str, torch.Tensor]:
    """A backbone state dict (any supported naming) -> one that loads strictly into ``model``."""
    want_pe = model.patch_embed.proj.weight.shape
    got_pe = sd["patch_embed.proj.weight"].shape
    if len(got_pe) == 4 and tuple(got_pe[-2:]) != tuple(want_pe[-2:]):
        raise ModelError(
            f"{label} has patch size {got_pe[-1]} but {name} uses {want_pe[-1]}: "
            f"choose the matching --backbone (or leave --backbone out to read it from the file)"
        )
    got_reg = _registers(sd)
    reg_token = getattr(model, "reg_token", None)
    want_reg = int(getattr(model, "num_reg_tokens", 0) or (reg_token.shape[1] if reg_token is not None else 0))
    if got_reg != want_reg:
        raise ModelError(
            f"{label} has {got_reg or 'no'} register tokens but {name} has {want_reg or 'none'}: "
            f"choose the matching --backbone (dinov2-s14-reg for 4 registers, dinov2-s14 without)"
        )
    try:
        sd = _filter_fn(model)(dict(sd), model)
    except Exception as err:
        raise ModelError(f"{label} cannot be converted for {name} ({first_line(err)})") from None
    sd = {k: v for k, v in sd.items() if not re.match(r"(head|head_dist)\.", k)}

    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    bad_shape = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatches, e.g. {k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise ModelError(f"{label} does not fit {name}: " + "; ".join(parts))
    out = {}
    for k, ref in want.items():
        v = sd[k]
        if v.is_floating_point() or ref.is_floating_point():
            v = v.to(ref.dtype if ref.is_floating_point() else v.dtype)
        out[k] = v.contiguous()
    return out
