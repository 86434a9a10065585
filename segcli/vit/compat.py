"""Workarounds for the Python environments segcli is installed into.

``import_timm()`` is the one place that imports :mod:`timm`; every other module gets timm through it.

Why: timm imports torchvision, and the torchvision wheel that package registries serve (0.28.0) is a CUDA
build.  Installed next to a CPU-only torch, ``import torchvision`` dies while registering its Python fake
kernels with ``RuntimeError: operator torchvision::nms does not exist`` because the compiled extension that
would define the ``torchvision::nms`` / ``torchvision::qnms`` operator schemas cannot be loaded.  segcli uses
nothing from torchvision (images go through PIL), so on exactly that error we define the two missing
schemas ourselves with ``torch.library`` (schema only, no kernel: calling them would still fail, which is
fine because nothing does), drop the half-imported torchvision modules and import again.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# The Library object must stay alive, or its definitions are removed again.
_TORCHVISION_FRAGMENT: Any = None

_MISSING_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _forget_torchvision() -> None:
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]


def _define_missing_torchvision_ops() -> None:
    global _TORCHVISION_FRAGMENT
    if _TORCHVISION_FRAGMENT is not None:
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_OPS:
        try:
            lib.define(schema)
        except RuntimeError:
            # already defined (by a working torchvision extension or another fragment): nothing to add
            pass
    _TORCHVISION_FRAGMENT = lib


def import_timm():
    """Import and return :mod:`timm`, repairing a CPU-torch / CUDA-torchvision mismatch if needed.

    Idempotent: once timm is imported, later calls return the cached module.
    """
    if "timm" in sys.modules and getattr(sys.modules["timm"], "create_model", None) is not None:
        return sys.modules["timm"]
    try:
        return importlib.import_module("timm")
    except RuntimeError as err:
        if "torchvision::" not in str(err) or "does not exist" not in str(err):
            raise
    # undo the half-finished imports, define the schemas torchvision expects, try again
    _forget_torchvision()
    for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[mod]
    _define_missing_torchvision_ops()
    return importlib.import_module("timm")
