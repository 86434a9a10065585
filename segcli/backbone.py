"""Stage 1 of the pipeline: the frozen DINO / DINOv2 ViT backbone (timm), its weights and its input.

``load_backbone()`` builds the timm model (``dynamic_img_size=True``, no classifier head, eval mode, no
gradients) and fills it with either timm's pretrained weights (Hugging Face hub / torch hub cache; fails
fast with a :class:`ModelError` when offline and not cached) or a local checkpoint file: official DINO
``.pth`` (plain backbone or full training checkpoint), official DINOv2 ``.pth``, timm state dicts and
``.safetensors``.  Pickle-based files are always read with ``torch.load(weights_only=True)``.

Feature extraction itself is in :mod:`segcli.features`; :class:`FeatureBatch` is re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import torch

from segcli.compat import import_timm
from segcli.errors import ModelError, UsageError
from segcli.features import KINDS, FeatureBatch, compute_features, embed_crops, extract_features

__all__ = [
    "ALIASES",
    "DEFAULT_BACKBONE",
    "KINDS",
    "PRECISIONS",
    "Backbone",
    "FeatureBatch",
    "load_backbone",
    "read_checkpoint",
    "resize_normalise",
    "resolve_backbone_name",
    "select_device",
    "target_size",
]

ALIASES: dict[str, str] = {
    "dino-s16": "vit_small_patch16_224.dino",
    "dino-s8": "vit_small_patch8_224.dino",
    "dino-b16": "vit_base_patch16_224.dino",
    "dino-b8": "vit_base_patch8_224.dino",
    "dinov2-s14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-s14-reg": "vit_small_patch14_reg4_dinov2.lvd142m",
}
from segcli.config import DEFAULT_BACKBONE  # noqa: E402  (one definition, shared with the CLI)
PRECISIONS = ("fp32", "bf16", "fp16")

_WEIGHTS_HINT = "Download the checkpoint (see weights/README.md) and pass --weights FILE"
_HUB_PROBE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------- names


def resolve_backbone_name(name: str) -> str:
    """Short alias or timm ViT name -> canonical timm name (``arch.tag`` when timm knows a default tag).

    Any model of timm's ``vision_transformer`` module is accepted (e.g. ``vit_tiny_patch16_224`` for tests).
    """
    raw = (name or "").strip()
    alias = ALIASES.get(raw.lower())
    if alias is not None:
        return alias
    timm = import_timm()
    from timm.models import get_pretrained_cfg, is_model_in_modules

    if raw and timm.is_model(raw) and is_model_in_modules(raw, "vision_transformer"):
        try:
            cfg = get_pretrained_cfg(raw)
        except RuntimeError:  # arch exists, tag does not
            arch = raw.split(".", 1)[0]
            tags = [m.split(".", 1)[1] for m in timm.list_pretrained(arch + ".*")]
            raise ModelError(
                f"unknown pretrained tag in backbone {raw!r}: use {arch} with one of the tags "
                f"{', '.join(tags) or '(none)'}, or a short name ({', '.join(ALIASES)})"
            ) from None
        if "." not in raw and cfg is not None and getattr(cfg, "tag", None):
            return f"{raw}.{cfg.tag}"
        return raw
    raise ModelError(
        f"unknown backbone {raw!r}: use one of {', '.join(ALIASES)} "
        f"or a timm ViT name such as {DEFAULT_BACKBONE}"
    )


# ------------------------------------------------------------------------------------------- devices


def select_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA, then Apple MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    d = (device or "auto").strip().lower()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or re.fullmatch(r"cuda:\d+", d):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {d}: CUDA is not available here (CPU build of torch?); use --device cpu or auto")
        if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device(d)
    if d == "mps":
        if not mps_ok:
            raise UsageError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")


def _check_precision(precision: str, device: torch.device) -> str:
    p = (precision or "fp32").strip().lower()
    if p not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if p == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return p


# ----------------------------------------------------------------------------------------- images


def target_size(height: int, width: int, patch: int, short_side: int = 448, max_side: int | None = 1344) -> tuple[int, int]:
    """(H', W') for an image of ``height`` x ``width``: keep the aspect ratio, short side -> ``short_side``
    (up or down), long side at most ``max_side``, both rounded to a multiple of ``patch`` (at least one)."""
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    if short_side < 1:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    if max_side is not None and max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    cap = None if max_side is None else max(patch, (int(max_side) // patch) * patch)

    def snap(x: float) -> int:
        v = max(patch, int(round(x / patch)) * patch)
        return min(v, cap) if cap is not None else v

    return snap(height * scale), snap(width * scale)


def as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """Accept (H, W, 3) uint8 (also (H, W), (H, W, 1), (H, W, 4)); return contiguous (H, W, 3) uint8."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def resize_normalise(rgb: np.ndarray, height: int, width: int, mean, std) -> torch.Tensor:
    """uint8 RGB -> float32 (3, height, width): PIL bicubic resize (antialiased), then (x/255 - mean)/std."""
    from PIL import Image

    a = as_rgb_uint8(rgb)
    if a.shape[0] != height or a.shape[1] != width:
        a = np.array(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC))
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


# ------------------------------------------------------------------------------------------ backbone


class Backbone:
    """A loaded, frozen ViT.  Build it with :func:`load_backbone`."""

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device, weights_id: str, precision: str = "fp32"):
        self.model = model
        self.name = name
        self.device = device
        self.weights_id = weights_id
        self.precision = precision
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean = tuple(float(v) for v in (cfg.get("mean") or IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in (cfg.get("std") or IMAGENET_DEFAULT_STD))

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, patch={self.patch_size}, dim={self.embed_dim}, device={self.device}, weights={self.weights_id!r})"

    def autocast(self):
        """Autocast context for the chosen precision (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def input_size(self, height: int, width: int, short_side: int = 448, max_side: int | None = 1344) -> tuple[int, int]:
        """The (H', W') that :meth:`prepare` resizes an image of this size to."""
        return target_size(height, width, self.patch_size, short_side, max_side)

    def prepare(self, rgb: np.ndarray, short_side: int = 448, max_side: int | None = 1344) -> torch.Tensor:
        """uint8 (H, W, 3) -> normalised float32 (3, H', W') on the CPU; see :func:`target_size`."""
        a = as_rgb_uint8(rgb)
        h, w = self.input_size(a.shape[0], a.shape[1], short_side, max_side)
        return resize_normalise(a, h, w, self.mean, self.std)

    def extract(self, batch: torch.Tensor, kind: str = "keys", proposal_heads: int = 5) -> FeatureBatch:
        """Features of a normalised batch (B, 3, H, W) (any device); one forward pass, inference mode."""
        return compute_features(self, batch, kind=kind, proposal_heads=proposal_heads)

    def extract_image(self, rgb: np.ndarray, short_side: int = 448, kind: str = "keys", max_side: int | None = 1344) -> FeatureBatch:
        """prepare + extract for one image (B = 1)."""
        return extract_features(self, rgb, short_side=short_side, kind=kind, max_side=max_side)

    def embed_crops(self, crops: list[np.ndarray], size: int = 224, batch_size: int = 32) -> np.ndarray:
        """(n, embed_dim) float32 L2-normalised CLS tokens of RGB uint8 crops resized to size x size."""
        return embed_crops(self, crops, size=size, batch_size=batch_size)

    def fingerprint(self) -> str:
        """Short stable hash of the backbone name and weights identity (a cache key)."""
        return hashlib.sha256(f"{self.name}\n{self.weights_id}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- weights


def _first_line(err: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8
    except OSError:
        return False


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file into a dict, safely: safetensors, or ``torch.load(weights_only=True)``.

    Every failure is a one-line :class:`ModelError` naming the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"weights file {p} not found: check the --weights path")
    if p.is_dir():
        raise ModelError(f"weights path {p} is a directory: pass the checkpoint file itself")
    if p.suffix.lower() == ".safetensors" or _looks_like_safetensors(p):
        try:
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        except Exception as err:  # safetensors raises its own error types, OSError, ...
            raise ModelError(f"weights file {p} is not a readable safetensors file ({_first_line(err)})") from None
    try:
        # Full DINO training checkpoints carry an argparse.Namespace of their arguments: plain data,
        # so it is allow-listed; anything else that is not tensors/containers/primitives is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and m:
            raise ModelError(
                f"weights file {p} holds Python objects ({m.group(1)}) that segcli's safe loader "
                "(weights_only=True) refuses: use a plain state-dict or .safetensors checkpoint"
            ) from None
        raise ModelError(f"weights file {p} is corrupt, truncated or not a PyTorch checkpoint ({_first_line(err)})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"weights file {p} is not a state-dict checkpoint (it holds a {type(obj).__name__})")
    return obj


def _tensor_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Unwrap {'teacher'|'state_dict'|'model'|'module'|'student': ...} wrappers down to the tensors."""
    for _ in range(4):
        if any(isinstance(v, torch.Tensor) for v in obj.values()) and not any(
            isinstance(obj.get(k), dict) for k in ("teacher", "state_dict", "model")
        ):
            break
        for key in ("teacher", "state_dict", "model", "module", "student"):  # DINO releases the teacher
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                obj = inner
                break
        else:
            break
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_to_backbone(sd: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
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


def _fit_state_dict(raw: dict, model: torch.nn.Module, name: str, label: str) -> dict[str, torch.Tensor]:
    """Any supported checkpoint layout -> a state dict that loads strictly into ``model``."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _strip_to_backbone(_tensor_dict(raw), label)
    want_pe = model.patch_embed.proj.weight.shape
    got_pe = sd["patch_embed.proj.weight"].shape
    if len(got_pe) == 4 and tuple(got_pe[-2:]) != tuple(want_pe[-2:]):
        raise ModelError(
            f"{label} has patch size {got_pe[-1]} but {name} uses {want_pe[-1]}: "
            f"choose the matching --backbone"
        )
    got_reg = next((int(sd[k].shape[1]) for k in ("register_tokens", "reg_token") if k in sd and sd[k].ndim == 3), 0)
    want_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    if got_reg != want_reg:
        raise ModelError(
            f"{label} has {got_reg or 'no'} register tokens but {name} has {want_reg or 'none'}: "
            f"choose the matching --backbone (dinov2-s14-reg for 4 registers, dinov2-s14 without)"
        )
    try:
        sd = checkpoint_filter_fn(dict(sd), model)
    except Exception as err:
        raise ModelError(f"{label} cannot be converted for {name} ({_first_line(err)})") from None
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


class _Captured(Exception):
    """Carries the raw pretrained state dict out of timm's loader (see :func:`_fetch_pretrained`)."""

    def __init__(self, state_dict):
        super().__init__("captured")
        self.state_dict = state_dict


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One quick request to the Hugging Face endpoint, no retries (honours proxies and HF_ENDPOINT)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def _timm_pretrained_state_dict(model: torch.nn.Module) -> dict:
    from timm.models._builder import load_pretrained

    def capture(state_dict, _model=None):
        raise _Captured(state_dict)

    try:
        load_pretrained(model, model.pretrained_cfg, num_classes=0, filter_fn=capture, strict=False)
    except _Captured as c:
        return c.state_dict
    raise RuntimeError("timm returned no state dict")  # pragma: no cover - custom-load models


def _fetch_pretrained(model: torch.nn.Module, name: str) -> tuple[dict, str]:
    """timm's pretrained weights: local cache first (no network), then one download if the hub answers."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")
    if not source:
        raise ModelError(f"timm has no pretrained weights for {name}: pass --weights FILE")
    weights_id = f"timm-pretrained:{source}"
    offline_msg = f"cannot download pretrained weights for {name} (offline?). {_WEIGHTS_HINT}"
    hf_constants = None
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError:  # pragma: no cover
        pass
    user_offline = bool(hf_constants and hf_constants.HF_HUB_OFFLINE)
    # 1. the cache alone, with the hub switched to offline mode (no request, no retries)
    if hf_constants is not None:
        saved = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
        try:
            return _timm_pretrained_state_dict(model), weights_id
        except Exception:
            pass
        finally:
            hf_constants.HF_HUB_OFFLINE = saved
    if user_offline:
        raise ModelError(f"pretrained weights for {name} are not in the cache and HF_HUB_OFFLINE is set. {_WEIGHTS_HINT}")
    # 2. a cache miss: download, but only if the hub answers at once (huggingface_hub would retry ~45 s)
    if cfg.get("hf_hub_id") and not _hub_reachable():
        raise ModelError(offline_msg)
    try:
        return _timm_pretrained_state_dict(model), weights_id
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"cannot download pretrained weights for {name} ({_first_line(err, 100)}). {_WEIGHTS_HINT}") from None


def _build_model(name: str) -> torch.nn.Module:
    """The architecture without weights: on the meta device (no time spent on random init) when possible."""
    timm = import_timm()
    kwargs = dict(pretrained=False, dynamic_img_size=True, num_classes=0)
    try:
        return timm.create_model(name, device="meta", **kwargs)
    except Exception:
        try:
            return timm.create_model(name, **kwargs)
        except Exception as err:
            raise ModelError(f"cannot build backbone {name} ({_first_line(err)})") from None


def _check_structure(model: torch.nn.Module, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if getattr(model, "cls_token", None) is None:
        raise ModelError(f"backbone {name} has no CLS token: use a DINO / DINOv2 ViT such as {DEFAULT_BACKBONE}")
    if attn is None or not isinstance(getattr(attn, "qkv", None), torch.nn.Linear) or not hasattr(attn, "head_dim"):
        raise ModelError(f"backbone {name} has no fused qkv attention in its last block: use a DINO / DINOv2 ViT such as {DEFAULT_BACKBONE}")


def _check_finite(state_dict: dict[str, torch.Tensor], label: str) -> None:
    """Refuse weights holding NaN or infinite values: they would give NaN features and fail much later, deep
    inside clustering, instead of here with the tensor's name."""
    for key, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{label} holds NaN or infinite values (first in {key}); the checkpoint is damaged")


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Backbone:
    """Build a frozen backbone.  ``weights=None``: timm's pretrained weights (cache, else download)."""
    timm_name = resolve_backbone_name(name)
    dev = select_device(device)
    prec = _check_precision(precision, dev)
    model = _build_model(timm_name)
    _check_structure(model, timm_name)
    if weights is None:
        raw, weights_id = _fetch_pretrained(model, timm_name)
        label = f"the timm pretrained checkpoint of {timm_name}"
    else:
        path = Path(weights).expanduser()
        raw = read_checkpoint(path)
        label = f"weights file {path}"
        weights_id = None  # hashed below, only once the file is known to fit
    sd = _fit_state_dict(raw, model, timm_name, label)
    del raw
    _check_finite(sd, label)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:  # pragma: no cover - _fit_state_dict already checked keys and shapes
        raise ModelError(f"{label} does not fit {timm_name} ({_first_line(err)})") from None
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - a timm model with non-persistent buffers
        raise ModelError(f"backbone {timm_name} is not supported: {left[0]} is not in any checkpoint")
    if weights_id is None:
        weights_id = f"sha256:{sha256_file(Path(weights).expanduser())}"
    model.eval()
    model.requires_grad_(False)
    model.to(dev)
    return Backbone(model, timm_name, dev, weights_id, prec)
