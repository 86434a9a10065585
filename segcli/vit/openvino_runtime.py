"""``--openvino``: the backbone's forward on OpenVINO's CPU runtime (an optional extra: ``pip install openvino``).

Why: on the 2-core test machine (AVX512-BF16, no AMX) OpenVINO's bf16 ViT-S/16 forward was several times
faster than torch's fp32 and bf16-autocast forwards at the same thread count, with features at cosine
>= 0.9999 of fp32 (benchmarks/bench_runtime.py, docs/incoming/issue21.md). It is opt-in, never a dependency.

How: the timm ViT is traced into an OpenVINO model, once per input size (any batch size), whose outputs are
the final-norm tokens and the last block's attention input. segcli's feature code then runs unchanged: the
forward pre-hooks of the last attention module (its feature capture, :mod:`segcli.vit.features`) are called with
that input, and the keys, CLS attention and proposal are built from it in fp32 exactly as for torch. The
converted models are saved in the cache folder (``<cache>/openvino/<backbone fingerprint>-<H>x<W>.xml``) and
OpenVINO caches its compiled kernels there too, so only the first run at an input size pays the conversion.
Only the plain timm ``VisionTransformer`` blocks (DINO, DINOv2, their register variants) are supported; RoPE
ViTs (DINOv3) keep torch. Features differ from torch's by rounding, so the feature cache keeps them apart.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from segcli.errors import UsageError

INSTALL_HINT = "pip install openvino"


def import_openvino():
    """The openvino module, or a one-line UsageError saying how to install it."""
    try:
        import openvino
    except Exception as err:  # ImportError, or a broken install (missing shared library)
        raise UsageError(f"--openvino needs the OpenVINO runtime, which is not usable here ({type(err).__name__}); "
                         f"install it with '{INSTALL_HINT}' or run without --openvino") from None
    return openvino


def check_supported(model: torch.nn.Module, name: str) -> None:
    """Refuse models whose forward this module cannot reproduce (one line, before any work)."""
    blocks = getattr(model, "blocks", None)
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "norm")
    if blocks is None or not len(blocks) or any(not hasattr(model, n) for n in needed) \
            or getattr(model, "rope", None) is not None or type(model).__name__ != "VisionTransformer" \
            or any(not all(hasattr(b, n) for n in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")) for b in blocks):
        raise UsageError(f"--openvino supports the plain timm ViTs (DINO, DINOv2); {name} is not one: run without --openvino")


class _Traced(torch.nn.Module):
    """timm ``VisionTransformer.forward_features`` with the last block's attention input as a second output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for block in m.blocks[:-1]:
            x = block(x)
        last = m.blocks[-1]
        attn_in = last.norm1(x)
        x = x + last.ls1(last.attn(attn_in))
        x = x + last.ls2(last.mlp(last.norm2(x)))
        return m.norm(x), attn_in


class OpenVINOForward:
    """Stands in for ``model.forward_features``: the OpenVINO model of the batch's input size, then segcli's
    capture hooks on the last attention module with the attention input it returned."""

    def __init__(self, model: torch.nn.Module, fingerprint: str, cache_dir: Path, threads: int | None = None) -> None:
        ov = import_openvino()
        self.ov = ov
        self.model = model
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir)
        self.core = ov.Core()
        # No precision hint: OpenVINO's CPU plugin runs bf16 where the CPU has it natively (AVX512-BF16, AMX)
        # and fp32 elsewhere, which is the choice --precision auto makes for torch.
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(self.cache_dir / "kernels")}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.traced = _Traced(model).eval()
        self.compiled: dict[tuple[int, int], Any] = {}
        self.convert_s = 0.0

    def _compiled(self, height: int, width: int):
        """The compiled model of one input size (any batch size): converted and saved once, then read back."""
        key = (height, width)
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            xml = self.cache_dir / f"{self.fingerprint}-{height}x{width}.xml"
            if xml.is_file() and xml.with_suffix(".bin").is_file():
                ov_model = self.core.read_model(str(xml))
            else:
                # The trace fixes the input size (timm's position-embedding resize warns about exactly that).
                with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ov_model = self.ov.convert_model(self.traced, example_input=torch.zeros(1, 3, height, width))
                ov_model.reshape({0: [-1, 3, height, width]})
                # Written under a temporary name, then renamed: a run killed mid-save leaves no half model.
                tmp = xml.with_name(xml.stem + ".tmp.xml")
                self.ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
                tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
                tmp.replace(xml)
            self.compiled[key] = self.core.compile_model(ov_model, "CPU", self.config)
            self.convert_s += time.perf_counter() - t0
        return self.compiled[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        result = self._compiled(int(x.shape[2]), int(x.shape[3]))(x.float().cpu().numpy())
        out, attn_in = (torch.from_numpy(result[i].copy()) for i in range(2))
        attn = self.model.blocks[-1].attn
        for hook in list(attn._forward_pre_hooks.values()):  # segcli's feature capture (segcli.vit.features)
            hook(attn, (attn_in,), {})
        return out


def use_openvino(backbone, cache_dir: Path) -> None:
    """Run ``backbone``'s forward on OpenVINO from now on (CPU only); see the module docstring."""
    if backbone.device.type != "cpu":
        raise UsageError(f"--openvino runs the backbone on the CPU; this run uses {backbone.device}: add --device cpu")
    check_supported(backbone.model, backbone.name)
    from segcli.vit import runtime

    backbone.model.forward_features = OpenVINOForward(backbone.model, backbone.fingerprint(), cache_dir,
                                                      threads=runtime._fixed_threads)
    backbone.precision = "fp32"  # torch's own code around OpenVINO (keys, attention) stays fp32; OpenVINO runs bf16
    backbone.runtime = "openvino"
