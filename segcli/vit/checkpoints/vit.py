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


# DINOv3 widths -> timm size names, without and with the SwiGLU feed-forward of the "plus" models
# (Meta's dinov3/hub/backbones.py: S 384 mlp, S+ 384 swiglu, B 768, L 1024 mlp, L+ 1024 swiglu, H+ 1280 swiglu,
# 7B 4096 swiglu64).  timm has no L+ model: it is timm's L with a SwiGLU feed-forward (DINOV3_BUILD).
_DINOV3 = {(384, False): "small", (384, True): "small_plus", (768, False): "base", (1024, False): "large",
           (1024, True): "large", (1280, True): "huge_plus", (4096, True): "7b"}
DINOV3_PLUS_BUILD = {(1024, True): dict(swiglu_mlp=True, swiglu_align_to=8)}


def _swiglu(sd: dict[str, torch.Tensor]) -> bool:
    """Meta's SwiGLU FFN (``mlp.w1/w2/w3``) or timm's (``mlp.fc1_g/fc1_x``)."""
    return "blocks.0.mlp.w1.weight" in sd or "blocks.0.mlp.fc1_g.weight" in sd


def dinov3_build(sd: dict[str, torch.Tensor]) -> dict:
    """Extra timm keyword arguments a DINOv3 file's architecture needs (L+: SwiGLU on timm's L)."""
    pe = sd.get("patch_embed.proj.weight")
    if pe is None or pe.ndim != 4:
        return {}
    return dict(DINOV3_PLUS_BUILD.get((int(pe.shape[0]), _swiglu(sd)), {}))


def infer_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """The timm model (with its pretrained tag, for the input normalisation) whose shapes these tensors have.

    Only shapes and key names are read (tests check the 7B and H+ layouts with meta tensors)."""
    from segcli.vit.compat import import_timm

    pe = sd.get("patch_embed.proj.weight")
    if pe is None or pe.ndim != 4:
        return None
    width, p, depth = int(pe.shape[0]), int(pe.shape[-1]), block_count(sd)
    system = system_of(sd)
    build: dict = {}
    if system == "dinov3":
        size = _DINOV3.get((width, _swiglu(sd)))
        if size is None:
            return None
        qkvb = "blocks.0.attn.q_bias" in sd or "blocks.0.attn.qkv.bias" in sd
        arch, tag = f"vit_{size}_patch{p}_dinov3{'_qkvb' if qkvb and size != '7b' else ''}", "lvd1689m"
        build = dinov3_build(sd)
    elif width not in _SIZES:
        return None
    elif system == "dinov2":
        size = _SIZES[width]
        reg = _registers(sd)
        arch, tag = f"vit_{size}_patch{p}{f'_reg{reg}' if reg else ''}_dinov2", "lvd142m"
    else:
        size = _SIZES[width]
        arch, tag = f"vit_{size}_patch{p}_224", "dino"
    timm = import_timm()
    if not timm.is_model(arch):
        return None
    if depth != len(timm.create_model(arch, pretrained=False, num_classes=0, device="meta", **build).blocks):
        return None
    return f"{arch}.{tag}" if timm.list_pretrained(f"{arch}.{tag}") else arch


def parse(raw: dict, label: str) -> Checkpoint | None:
    """Any plain ViT checkpoint (the fallback layout)."""
    tensors = tensor_dict(raw)
    if not tensors:
        return None
    sd = strip_to_backbone(tensors, label)
    system = system_of(sd)
    if system == "vit":  # DINO's ViT (and timm's): DINO's own position-grid resize (see segcli.vit.pos_embed)
        return Checkpoint(system="dino", state_dict=sd, arch=infer_arch(sd), pos_interp="dino")
    if system == "dinov2":  # official DINOv2 files and timm's *_dinov2 weights: DINOv2's own resize
        return Checkpoint(system=system, state_dict=sd, arch=infer_arch(sd), pos_interp="dinov2")
    return Checkpoint(system=system, state_dict=sd, arch=infer_arch(sd), build=dinov3_build(sd) if system == "dinov3" else {})


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
    _check_dropped_biases(sd, model, name, label)
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
        if ref.is_floating_point() and not v.is_floating_point():
            raise ModelError(f"{label}: tensor {k} holds {str(v.dtype).replace('torch.', '')} values, but {name} needs "
                             "floating-point weights (the checkpoint is damaged or not a model's weights)")
        if v.is_floating_point() or ref.is_floating_point():
            v = v.to(ref.dtype if ref.is_floating_point() else v.dtype)
        out[k] = v.contiguous()
    return out


def _check_dropped_biases(sd: dict[str, torch.Tensor], model: torch.nn.Module, name: str, label: str) -> None:
    """timm's DINOv3 conversion silently drops Meta's ``attn.qkv.bias`` when the model has no q/v bias (it only
    prints).  That is exact only when the biases are zero (the distilled B/L/H+ files); otherwise it loses
    weights (S/16: tokens differ by 0.16), so it is an error naming the key and the model that keeps them."""
    if type(model).__name__ != "Eva" or any(n.endswith("attn.q_bias") or n.endswith("attn.qkv.bias") or
                                             n.endswith("q_proj.bias") for n, _ in model.named_parameters()):
        return
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias") and v.device.type != "meta" and bool(v.abs().max() > 0):
            raise ModelError(f"{label} has non-zero q/v biases ({k}) that {name} has no place for: use "
                             f"{name.split('.')[0]}_qkvb or leave --backbone out to read the architecture from the file")
