"""Test helpers: random-weight ViT checkpoints in the layouts segcli accepts, and random backbones.

No pretrained weights are needed (or downloaded): every tensor is drawn from a seeded generator, so the same
(name, seed) always gives the same weights.  Typical use in other tests::

    from tests.checkpoints import checkpoint_file, random_backbone
    bb = random_backbone()                                  # ViT-S/16 DINO architecture, random weights, CPU
    path = checkpoint_file("vit_tiny_patch16_224", "safetensors")

Layouts written by :func:`save_checkpoint`:
  'dino'          official DINO .pth naming (a plain backbone state dict, like dino_deitsmall16_pretrain.pth);
                  for DINOv2 architectures the official DINOv2 naming (mask_token, register_tokens, pos_embed
                  with the CLS position, cls_token without it)
  'dino-train'    a full DINO training checkpoint as main_dino.py writes it (:func:`dino_training_checkpoint`):
                  teacher 'backbone.*', DDP student 'module.backbone.*', numpy float64 lr / weight_decay in the
                  optimizer's param groups (pickle protocol 2), argparse.Namespace args, DINO head, dino_loss
  'timm'          a plain timm state dict (torch.save)
  'timm-wrapped'  {'state_dict': timm state dict + a 1000-class head, 'epoch': ...}
  'safetensors'   the timm state dict as .safetensors
"""

from __future__ import annotations

import argparse
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

LAYOUTS = ("dino", "dino-train", "timm", "timm-wrapped", "safetensors")
SMALL = "vit_small_patch16_224.dino"
TINY = "vit_tiny_patch16_224"


def random_state_dict(name: str = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm-layout state dict (no head) for architecture ``name`` with seeded random values.

    The tensors are cached and shared between calls: do not modify them in place.
    """
    return dict(_random_state_dict(name, seed))


@functools.lru_cache(maxsize=8)
def _random_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    from segcli.vit.backbone import _build_model, resolve_backbone_name

    model = _build_model(resolve_backbone_name(name))  # meta device: shapes only
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        shape = tuple(t.shape)
        x = torch.randn(shape, generator=g)
        if k.rsplit(".", 1)[-1].startswith("gamma"):  # LayerScale (DINOv2 ls1.gamma, Eva/DINOv3 gamma_1)
            x = 0.1 + 0.05 * x
        elif t.ndim == 1 and "norm" in k and k.endswith("weight"):
            x = 1.0 + 0.1 * x
        elif k.endswith("bias"):
            x = 0.1 * x
        elif k in ("cls_token", "pos_embed", "reg_token"):
            x = 0.5 * x
        elif t.ndim >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            x = x * fan_in**-0.5
        out[k] = x.contiguous()
    return out


def _to_official_dinov2(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Inverse of timm's _convert_dinov2."""
    out = dict(sd)
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in sd:
        g = torch.Generator().manual_seed(seed + 1000)
        pos_cls = 0.5 * torch.randn(1, 1, dim, generator=g)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = sd["cls_token"] - pos_cls
        out["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    return out


def save_checkpoint(path: str | Path, layout: str, name: str = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random-weight checkpoint of ``name`` in ``layout`` to ``path``.

    Returns the timm-layout state dict it was derived from: what the loaded model must hold.  (For the
    DINOv2-with-registers 'dino' layout the CLS token round-trips through a subtraction and an addition,
    so compare it with a float tolerance.)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    path = Path(path)
    sd = random_state_dict(name, seed)
    if layout == "dino":
        obj = _to_official_dinov2(sd, seed) if "dinov2" in name else dict(sd)
        torch.save(obj, path)
    elif layout == "dino-train":
        obj = dino_training_checkpoint(sd, seed)
        torch.save(obj, path)  # torch's default pickle protocol 2, as DINO's utils.save_on_master
    elif layout == "timm":
        torch.save(sd, path)
    elif layout == "timm-wrapped":
        dim = sd["cls_token"].shape[-1]
        full = dict(sd)
        full["head.weight"] = torch.zeros(1000, dim)
        full["head.bias"] = torch.zeros(1000)
        torch.save({"state_dict": full, "epoch": 3, "arch": name}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd


def dino_training_checkpoint(sd: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """What DINO's main_dino.py saves (``checkpoint.pth``): the student is DistributedDataParallel-wrapped
    (``module.backbone.*``, ``module.head.*``), the ViT teacher is not (``backbone.*``, ``head.*``); the optimizer
    state is a real ``torch.optim.AdamW.state_dict()`` whose param groups hold the numpy float64 ``lr`` and
    ``weight_decay`` DINO's loop assigns from its cosine schedules (``lr_schedule[it]``, group 0 only for the
    weight decay); ``args`` is the argparse.Namespace; ``dino_loss`` holds the center buffer."""
    import numpy as np

    dim = sd["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(seed + 1)
    head = {
        "head.mlp.0.weight": torch.randn(64, dim, generator=g),
        "head.mlp.0.bias": torch.zeros(64),
        "head.last_layer.weight_g": torch.ones(128, 1),
        "head.last_layer.weight_v": torch.randn(128, 64, generator=g),
    }
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher.update(head)
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}  # must not be the one that gets loaded
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    lr_schedule, wd_schedule = np.linspace(5e-4, 1e-6, 10), np.linspace(0.04, 0.4, 10)
    for i, group in enumerate(opt.param_groups):
        group["lr"] = lr_schedule[3]
        if i == 0:
            group["weight_decay"] = wd_schedule[3]
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": opt.state_dict(),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005, data_path="/data"),
        "dino_loss": {"center": torch.zeros(1, 128)},
    }


_TMP: list[Path] = []


def _tmpdir() -> Path:
    if not _TMP:
        d = Path(tempfile.mkdtemp(prefix="segcli-test-ckpt-"))
        atexit.register(shutil.rmtree, d, True)
        _TMP.append(d)
    return _TMP[0]


@functools.lru_cache(maxsize=None)
def checkpoint_file(name: str = SMALL, layout: str = "timm", seed: int = 0) -> Path:
    """A checkpoint file (written once per process, removed at exit) for ``name``/``layout``/``seed``."""
    suffix = ".safetensors" if layout == "safetensors" else ".pth"
    path = _tmpdir() / f"{name}-{layout}-{seed}{suffix}"
    save_checkpoint(path, layout, name=name, seed=seed)
    return path


@functools.lru_cache(maxsize=None)
def random_backbone(name: str = SMALL, seed: int = 0, device: str = "cpu", precision: str = "fp32"):
    """A loaded :class:`segcli.vit.backbone.Backbone` with random weights (cached per process: do not modify)."""
    from segcli.vit.backbone import load_backbone

    return load_backbone(name, weights=checkpoint_file(name, "timm", seed), device=device, precision=precision)
