"""Leopart (Ziegler & Asano, CVPR 2022) backbones: ``leopart_vits16.ckpt``, ``leopart_vitb8.ckpt``.

The released files are flat ``{'model.<timm ViT key>': tensor}`` dicts holding the fine-tuned ViT plus
Leopart's ``projection_head.*`` and ``prototypes.*``; Lightning training checkpoints wrap the same in
``{'state_dict': ...}`` next to an EMA ``teacher.*`` copy.  Like Leopart's own loader
(``experiments/utils.py::get_backbone_weights``) we keep the ``model.*`` (student) keys, strip the prefix found
through the ``cls_token`` key and drop every key holding ``head`` or ``prototypes``.  Leopart evaluates with the
last block's tokens after the final norm, so that is the default feature of these files.
"""

from __future__ import annotations

from segcli.vit.checkpoints.base import Checkpoint, tensor_dict
from segcli.vit.checkpoints.vit import infer_arch


def _tensors(raw: dict) -> dict:
    inner = raw.get("state_dict") if isinstance(raw.get("state_dict"), dict) else raw
    return tensor_dict(inner)


def matches(raw: dict) -> bool:
    sd = _tensors(raw)
    has_model = any(k.startswith("model") and k.endswith("cls_token") for k in sd)
    return has_model and any(k.startswith("model") and ("prototypes" in k or "projection_head" in k) for k in sd)


def parse(raw: dict, label: str) -> Checkpoint | None:
    if not matches(raw):
        return None
    sd = {k: v for k, v in _tensors(raw).items() if k.startswith("model")}
    prefix = next(k for k in sd if k.endswith("cls_token"))[: -len("cls_token")]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if "head" not in k and "prototypes" not in k}
    # Leopart's src/vit.py is DINO's: DINO's position-grid resize
    return Checkpoint(system="leopart", state_dict=sd, arch=infer_arch(sd), feature="tokens", pos_interp="dino")
