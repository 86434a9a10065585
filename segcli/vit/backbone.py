"""Stage 1 of the pipeline: the frozen DINO / DINOv2 ViT backbone (timm), its weights and its input.

``load_backbone()`` builds the timm model (``dynamic_img_size=True``, no classifier head, eval mode, no
gradients) and fills it with either timm's pretrained weights (Hugging Face cache, the official file in torch
hub's checkpoint folder, else a download; fails fast with a :class:`ModelError` when offline and not cached) or
a local checkpoint file of any layout :mod:`segcli.vit.checkpoints` reads (DINO, DINOv2, DINOv3, timm,
safetensors, Leopart, STEGO, LOCA), whose architecture is read from the file when no name is given.
Checkpoints never execute code when read (see :mod:`segcli.vit.checkpoints`).

Feature extraction itself is in :mod:`segcli.vit.features`; :class:`FeatureBatch` is re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from segcli.vit.checkpoints import Checkpoint, open_checkpoint, read_checkpoint
from segcli.vit.checkpoints.base import first_line as _first_line
from segcli.vit.checkpoints.vit import fit_state_dict, parse as parse_vit
from segcli.vit.compat import import_timm
from segcli.errors import ModelError, UsageError
from segcli.vit.features import KINDS, FeatureBatch, compute_features, embed_crops, extract_features
from segcli.vit.preprocess import as_rgb_uint8, resize_normalise, target_size

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
    "resolve_precision",
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
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_WEIGHTS_HINT = "Download the checkpoint (see weights/README.md) and pass --weights FILE"
_HUB_PROBE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------- names


def resolve_backbone_name(name: str) -> str:
    """Short alias or timm ViT name -> canonical timm name (``arch.tag`` when timm knows a default tag).

    Any model of timm's ``vision_transformer`` module (e.g. ``vit_tiny_patch16_224`` for tests, the CLS-free
    ``*_gap_*`` register models) or ``eva`` module (DINOv3 ``vit_*_patch16_dinov3*``, the RoPE ViTs) is accepted.
    """
    raw = (name or "").strip()
    alias = ALIASES.get(raw.lower())
    if alias is not None:
        return alias
    timm = import_timm()
    from timm.models import get_pretrained_cfg, is_model_in_modules

    if raw and timm.is_model(raw) and is_model_in_modules(raw, ("vision_transformer", "eva")):
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


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True on x86 CPUs with bf16 arithmetic in hardware (AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo.

    There bf16 autocast made the ViT-S/16 forward 2.2-2.75x faster than fp32 (feature cosine >= 0.99996);
    elsewhere torch emulates bf16 and it is slower than fp32. ``cpuinfo``: the file's text (for tests).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no reliable flag; torch names only the widest vector ISA
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic a run uses: ``auto`` is bf16 on CUDA devices with bf16 (Ampere and later) and on CPUs with
    native bf16 (:func:`cpu_has_native_bf16`), fp32 elsewhere (MPS, older GPUs, other CPUs). The resolved value
    is what the feature cache key holds, so features of different arithmetic are never mixed."""
    p = (precision or "auto").strip().lower()
    if p not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if p == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return p


_check_precision = resolve_precision


# ------------------------------------------------------------------------------------------ backbone


class Backbone:
    """A loaded, frozen ViT.  Build it with :func:`load_backbone`."""

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device, weights_id: str, precision: str = "fp32",
                 system: str = "timm", head: torch.nn.Module | None = None, probe: torch.Tensor | None = None,
                 weights_source: str = "", pos_interp: str | None = None):
        self.model = model
        # How the position grid is resized for other input sizes (segcli.vit.pos_embed): part of the features' identity.
        self.pos_interp = pos_interp
        self.name = name
        self.device = device
        self.weights_id = weights_id
        self.precision = precision
        # Where the weights came from (a file path or timm's hub id) and which system made them.
        self.system = system
        self.weights_source = weights_source
        # The system's own feature head (STEGO's code projection) and unsupervised cluster probe, if any.
        self.head = head
        self.probe = probe
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        # No CLS token (LOCA, *_gap_* register models, MAE/SAM-style encoders): the image descriptor is the mean
        # of the patch tokens and CLS attention is replaced by a training-free saliency (segcli.vit.features).
        self.has_cls = getattr(model, "cls_token", None) is not None
        cfg = getattr(model, "pretrained_cfg", None) or {}
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean = tuple(float(v) for v in (cfg.get("mean") or IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in (cfg.get("std") or IMAGENET_DEFAULT_STD))
        self.compiled = False
        self.runtime = "torch"  # or "openvino" (segcli.vit.openvino_runtime.use_openvino)

    def compile(self, cache_dir: str | Path | None = None) -> None:
        """torch.compile the transformer blocks (``--compile``), with inductor's on-disk cache in ``cache_dir``
        (unless $TORCHINDUCTOR_CACHE_DIR is set), so later runs reuse the compiled kernels.

        Every block but the last is compiled: the last one keeps its eager forward, where the forward pre-hook
        that captures the attention input (:mod:`segcli.vit.features`) is registered per call, which a compiled
        module would have to recompile for. Compiled kernels fuse operations and round differently, so the
        feature cache keeps compiled features apart (see :class:`segcli.engines.feature_source.FeatureSource`).
        The first batch of every new input shape pays the compilation (seconds to minutes; inductor then
        switches to dynamic shapes).
        """
        import os

        if cache_dir is not None:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            # torch fills the variable with its default (a /tmp folder) once it has looked; keep a user's own.
            current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser().absolute())
        for block in list(self.model.blocks)[:-1]:
            block.compile(dynamic=None)
        self.compiled = True

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

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch on the backbone's device. On CUDA through pinned memory with a non-blocking copy, so the
        transfer overlaps with work already queued on the device instead of stalling the host thread."""
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def extract(self, batch: torch.Tensor, kind: str = "keys", proposal_heads: int = 5) -> FeatureBatch:
        """Features of a normalised batch (B, 3, H, W) (any device); one forward pass, inference mode."""
        self._adapt_threads()
        return compute_features(self, batch, kind=kind, proposal_heads=proposal_heads)

    def extract_image(self, rgb: np.ndarray, short_side: int = 448, kind: str = "keys", max_side: int | None = 1344) -> FeatureBatch:
        """prepare + extract for one image (B = 1)."""
        return extract_features(self, rgb, short_side=short_side, kind=kind, max_side=max_side)

    def embed_crops(self, crops: list[np.ndarray], size: int = 224, batch_size: int = 32) -> np.ndarray:
        """(n, embed_dim) float32 L2-normalised CLS tokens (mean patch tokens without a CLS token) of RGB uint8
        crops resized to size x size."""
        self._adapt_threads()
        return embed_crops(self, crops, size=size, batch_size=batch_size)

    def _adapt_threads(self) -> None:
        """On the CPU, before each batch: torch takes the cores no other process is running on, unless
        --threads / OMP_NUM_THREADS fixed the count (:func:`segcli.vit.runtime.adapt_threads`; results do not
        depend on it). A GPU forward does not wait on CPU threads, so there nothing changes."""
        if self.device.type == "cpu":
            from segcli.vit.runtime import adapt_threads

            adapt_threads()

    def fingerprint(self) -> str:
        """Short stable hash of the backbone name and weights identity (a cache key)."""
        ident = f"{self.name}\n{self.weights_id}" + (f"\npos:{self.pos_interp}" if self.pos_interp else "")
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- weights


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """Content hash of a checkpoint directory (Orbax): every regular file, by relative path and bytes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


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


# Official file names under which torch.hub (and the official repos' own loaders) store these weights in
# $TORCH_HOME/hub/checkpoints; globs where the name carries a hash.
_HUB_FILES: dict[str, tuple[str, ...]] = {
    "vit_small_patch16_224.dino": ("dino_deitsmall16_pretrain.pth",),
    "vit_small_patch8_224.dino": ("dino_deitsmall8_pretrain.pth",),
    "vit_base_patch16_224.dino": ("dino_vitbase16_pretrain.pth",),
    "vit_base_patch8_224.dino": ("dino_vitbase8_pretrain.pth",),
    **{f"vit_{size}_patch14_dinov2.lvd142m": (f"dinov2_vit{s}14_pretrain.pth",)
       for size, s in (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))},
    **{f"vit_{size}_patch14_reg4_dinov2.lvd142m": (f"dinov2_vit{s}14_reg4_pretrain.pth",)
       for size, s in (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))},
    **{f"vit_{size}_patch16_dinov3.lvd1689m": (f"dinov3_vit{s}_pretrain_lvd1689m*.pth",)
       for size, s in (("small", "s16"), ("small_plus", "s16plus"), ("base", "b16"), ("large", "l16"),
                       ("huge_plus", "h16plus"))},
}


def torch_hub_candidates(name: str, model: torch.nn.Module | None = None) -> list[Path]:
    """Files already in torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints) that hold ``name``."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    patterns = list(_HUB_FILES.get(name, ()))
    url = ((getattr(model, "pretrained_cfg", None) or {}).get("url") or "") if model is not None else ""
    if url:
        patterns.append(url.rstrip("/").rsplit("/", 1)[-1])
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(p for p in folder.glob(pattern) if p.is_file() and p not in found)
    return found


def _hf_cached_file(repo_id: str) -> str | None:
    """The file of ``repo_id`` in the Hugging Face cache that timm reads, if present."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return hit
    return None


def _fetch_pretrained(model: torch.nn.Module, name: str) -> tuple[Checkpoint, str, str]:
    """timm's pretrained weights, as (checkpoint, weights id, where they came from).

    Without network first: the Hugging Face cache (timm's own copy), then the official file in torch hub's
    checkpoint folder; only then one download, if the hub answers at once.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")
    local = torch_hub_candidates(name, model)
    if not source and not local:
        raise ModelError(f"timm has no pretrained weights for {name}: pass --weights FILE")
    weights_id = f"timm-pretrained:{source}"
    label = f"the timm pretrained checkpoint of {name}"
    offline_msg = f"cannot download pretrained weights for {name} (offline?). {_WEIGHTS_HINT}"
    hf_constants = None
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError:  # pragma: no cover
        pass
    user_offline = bool(hf_constants and hf_constants.HF_HUB_OFFLINE)
    # 1. the Hugging Face cache alone, with the hub switched to offline mode (no request, no retries)
    if hf_constants is not None and source:
        saved = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
        try:
            raw = _timm_pretrained_state_dict(model)
            where = (_hf_cached_file(cfg["hf_hub_id"]) if cfg.get("hf_hub_id") else None) or source
            return parse_vit(raw, label), weights_id, f"{where} (Hugging Face cache)"
        except Exception:
            pass
        finally:
            hf_constants.HF_HUB_OFFLINE = saved
    # 2. the official checkpoint file a torch.hub.load() or an earlier tool left in $TORCH_HOME/hub/checkpoints
    if local:
        path = local[0]
        return open_checkpoint(path), f"sha256:{sha256_file(path)}", f"{path} (torch hub checkpoints folder)"
    if user_offline:
        raise ModelError(f"pretrained weights for {name} are not in the cache and HF_HUB_OFFLINE is set. {_WEIGHTS_HINT}")
    # 3. a cache miss: download, but only if the hub answers at once (huggingface_hub would retry ~45 s)
    if cfg.get("hf_hub_id") and not _hub_reachable():
        raise ModelError(offline_msg)
    try:
        raw = _timm_pretrained_state_dict(model)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"cannot download pretrained weights for {name} ({_first_line(err, 100)}). {_WEIGHTS_HINT}") from None
    return parse_vit(raw, label), weights_id, f"{source} (downloaded)"


# Keyword arguments of a layout's build that change the model's structure but not its size: they apply even
# when --backbone names the architecture.
_STRUCTURAL = ("class_token", "global_pool", "fc_norm", "act_layer", "norm_layer", "pretrained_cfg_overlay", "img_size")


def _pos_interp(ck: Checkpoint, timm_name: str, from_file: bool) -> str | None:
    """The family's own position-grid resize (segcli.vit.pos_embed): DINO's for DINO / Leopart / STEGO files and
    for timm's ``.dino`` weights, DINOv2's for DINOv2 files and timm's ``*_dinov2`` weights (with or without
    registers), bilinear for LOCA, timm's own otherwise."""
    if ck.pos_interp == "dino" and not from_file and not timm_name.endswith(".dino"):
        return None  # timm's pretrained weights of a non-DINO ViT: timm is the upstream
    return ck.pos_interp


def _build_model(name: str, build: dict | None = None) -> torch.nn.Module:
    """The architecture without weights: on the meta device (no time spent on random init) when possible."""
    timm = import_timm()
    kwargs = dict(pretrained=False, dynamic_img_size=True, num_classes=0, **(build or {}))
    try:
        return timm.create_model(name, device="meta", **kwargs)
    except Exception:
        try:
            return timm.create_model(name, **kwargs)
        except Exception as err:
            raise ModelError(f"cannot build backbone {name} ({_first_line(err)})") from None


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (DINOv3's RoPE periods, zero k_bias) are in no checkpoint: after a meta-device
    build, allocate them and let timm compute them."""
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if not left:
        return
    for name in left:
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._buffers[attr] = torch.empty_like(mod._buffers[attr], device="cpu")
    from timm.models._manipulate import reinit_non_persistent_buffers

    reinit_non_persistent_buffers(model)


def _bilinear_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` with the position grid resized bilinearly (half-pixel centres,
    antialiased only when shrinking), as ``jax.image.resize(..., 'bilinear')`` does in JAX-trained ViTs."""
    import torch.nn.functional as F

    B, H, W, C = x.shape
    gh, gw = self.patch_embed.grid_size
    npt = 0 if self.no_embed_class else self.num_prefix_tokens
    prefix, grid = self.pos_embed[:, :npt], self.pos_embed[:, npt:]
    if (H, W) != (gh, gw):
        g = grid.reshape(1, gh, gw, C).permute(0, 3, 1, 2).float()
        g = F.interpolate(g, size=(H, W), mode="bilinear", align_corners=False, antialias=H < gh or W < gw)
        grid = g.permute(0, 2, 3, 1).reshape(1, H * W, C).to(self.pos_embed.dtype)
    x = x.reshape(B, H * W, C)
    to_cat = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = x + grid
        return self.pos_drop(torch.cat(to_cat + [x], dim=1) if to_cat else x)
    x = torch.cat(to_cat + [x], dim=1) if to_cat else x
    return self.pos_drop(x + torch.cat([prefix, grid], dim=1))


def _check_structure(model: torch.nn.Module, name: str) -> None:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    projections = attn is not None and (
        isinstance(getattr(attn, "qkv", None), torch.nn.Linear)
        or all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
    )
    if not projections or not hasattr(attn, "head_dim") or not hasattr(attn, "num_heads"):
        raise ModelError(f"backbone {name} has no q/k/v attention in its last block: use a DINO / DINOv2 / DINOv3 ViT such as {DEFAULT_BACKBONE}")


def _check_finite(state_dict: dict[str, torch.Tensor], label: str) -> None:
    """Refuse weights holding NaN or infinite values: they would give NaN features and fail much later, deep
    inside clustering, instead of here with the tensor's name."""
    for key, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{label} holds NaN or infinite values (first in {key}); the checkpoint is damaged")


def load_backbone(
    name: str | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Backbone:
    """Build a frozen backbone.

    ``weights=None``: timm's pretrained weights for ``name`` (default :data:`DEFAULT_BACKBONE`; cache, then
    torch hub's checkpoint folder, else download).  With a ``weights`` file and ``name=None`` the architecture
    (and the system: DINO, DINOv2, DINOv3, Leopart, STEGO, LOCA) is read from the file.
    """
    dev = select_device(device)
    prec = _check_precision(precision, dev)
    ck: Checkpoint | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        ck = open_checkpoint(path)
        label = f"weights file {path}"
        if name is None or name == ck.arch:  # the architecture the file itself names
            if ck.arch is None:
                raise ModelError(f"{label}: its tensor shapes match no known ViT architecture: pass --backbone")
            timm_name = ck.arch
        else:
            timm_name = resolve_backbone_name(name)
        build = ck.build if timm_name == ck.arch else {k: v for k, v in ck.build.items() if k in _STRUCTURAL}
    else:
        timm_name = resolve_backbone_name(name or DEFAULT_BACKBONE)
        label, build = f"the timm pretrained checkpoint of {timm_name}", {}
    model = _build_model(timm_name, build)
    _check_structure(model, timm_name)
    source = ""
    if ck is None:
        ck, weights_id, source = _fetch_pretrained(model, timm_name)
    else:
        weights_id, source = None, str(Path(weights).expanduser())  # hashed below, once the file is known to fit
    sd = fit_state_dict(ck.state_dict, model, timm_name, label)
    _check_finite(sd, label)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:  # pragma: no cover - fit_state_dict already checked keys and shapes
        raise ModelError(f"{label} does not fit {timm_name} ({_first_line(err)})") from None
    del sd
    _materialise_buffers(model)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - a timm model with a buffer timm cannot recompute
        raise ModelError(f"backbone {timm_name} is not supported: {left[0]} is not in any checkpoint")
    pos_interp = _pos_interp(ck, timm_name, from_file=weights is not None)
    if pos_interp == "bilinear" and hasattr(model, "_pos_embed") and getattr(model, "pos_embed", None) is not None:
        import types

        model._pos_embed = types.MethodType(_bilinear_pos_embed, model)
    elif pos_interp == "dino":
        import types

        from segcli.vit.pos_embed import dino_pos_embed, supports_dino_resize

        if supports_dino_resize(model):
            model._pos_embed = types.MethodType(dino_pos_embed, model)
        else:
            pos_interp = None
    elif pos_interp == "dinov2":
        import types

        from segcli.vit.pos_embed import dinov2_pos_embed, supports_dinov2_resize

        if supports_dinov2_resize(model):
            model._pos_embed = types.MethodType(dinov2_pos_embed, model)
        else:
            pos_interp = None
    if weights_id is None:
        wpath = Path(weights).expanduser()
        weights_id = f"sha256:{sha256_dir(wpath) if wpath.is_dir() else sha256_file(wpath)}"
    model.eval()
    model.requires_grad_(False)
    model.to(dev)
    head = ck.head.to(dev).eval() if ck.head is not None else None
    return Backbone(model, timm_name, dev, weights_id, prec, system=ck.system, head=head, probe=ck.probe,
                    weights_source=source, pos_interp=pos_interp)
