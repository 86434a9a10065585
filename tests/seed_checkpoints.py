"""Random-weight checkpoints in the exact layouts of the seed systems (../shared/seed-systems.md 1.6, 2.5, 3.5).

Nothing is downloaded and no seed system's code is needed: the pickled Lightning objects of the real files
(omegaconf configs, Lightning attribute dicts, callback classes used as dict keys) are reproduced with
stand-in classes registered under the real module names only while the file is written, so the pickle names
exactly the globals a real file names (omegaconf.dictconfig.DictConfig, typing.Any, collections.defaultdict,
pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, ...), and nothing of them is importable when
segcli reads the file.

  save_leopart(path, wrapped=False, teacher=False)  flat {'model.<timm key>'} + projection_head + prototypes;
                                                   wrapped: a PL 1.4 checkpoint (class-keyed callbacks)
  save_stego(path, style='omegaconf'|'lightning-old') STEGO LitUnsupervisedSegmenter checkpoint
  save_loca(path, layout='loca'|'baseline')          flax msgpack TrainState / scenic baseline ViT tree
  save_malicious(path, layout, marker)               any pickled layout plus a payload that would touch marker
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tests.checkpoints import SMALL, TINY, random_state_dict, save_checkpoint

LEOPART = SMALL  # leopart_vits16.ckpt: ViT-S/16
STEGO = "vit_small_patch8_224.dino"  # STEGO's DinoFeaturizer on ViT-S/8 (the released files use ViT-B/8)
PICKLED_LAYOUTS = ("dino", "dino-train", "timm", "timm-wrapped", "leopart", "leopart-lightning",
                   "stego-omegaconf", "stego-lightning-old")


# ----------------------------------------------------------------------------------- stand-in classes


@contextlib.contextmanager
def fake_modules(spec: dict[str, dict[str, type]]):
    """Register throwaway modules (and their parents) so pickle can name the classes, then remove them."""
    added = []
    for modname, classes in spec.items():
        parts = modname.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        for cname, cls in classes.items():
            cls.__module__, cls.__qualname__, cls.__name__ = modname, cname, cname
            setattr(sys.modules[modname], cname, cls)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@dataclasses.dataclass
class Metadata:  # omegaconf.base.Metadata
    ref_type: typing.Any
    object_type: typing.Any
    optional: bool
    key: typing.Any
    flags: typing.Any = None
    flags_root: bool = False
    resolver_cache: typing.Any = None


@dataclasses.dataclass
class ContainerMetadata(Metadata):  # omegaconf.base.ContainerMetadata
    key_type: typing.Any = None
    element_type: typing.Any = None


class AnyNode:  # omegaconf.nodes.AnyNode
    def __init__(self, value, key, parent=None):
        self._metadata = Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key, flags={})
        self._parent = parent
        self._val = value


class DictConfig:  # omegaconf.dictconfig.DictConfig: pickled as NEWOBJ + BUILD(__dict__), like omegaconf's
    def __init__(self, content: dict):
        self.__dict__["_metadata"] = ContainerMetadata(
            ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={}, flags_root=False,
            resolver_cache=defaultdict(dict), key_type=typing.Any, element_type=typing.Any)
        self.__dict__["_parent"] = None
        self.__dict__["_flags_cache"] = None
        self.__dict__["_content"] = {k: AnyNode(v, k, self) for k, v in content.items()}

    def __getstate__(self):
        return dict(self.__dict__)


class AttributeDict(dict):  # pytorch_lightning.utilities.parsing.AttributeDict
    pass


class ModelCheckpoint:  # pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (used as a dict key)
    pass


class ReadOnlyList(list):  # sacred.config.custom_containers.ReadOnlyList (sacred 0.8.7)
    """Pickles as sacred's does: ``ReadOnlyContainer.__reduce__`` is ``(cls, (self.__copy__(),))`` and
    ``ReadOnlyList.__copy__`` is ``[*self]``, so the file names the class and calls it with a plain list.
    (sacred is not a segcli dependency; the opcodes were checked identical to sacred 0.8.7's own pickling.)"""

    def __reduce__(self):
        return self.__class__, ([*self],)


class ReadOnlyDict(dict):  # sacred.config.custom_containers.ReadOnlyDict: __copy__ is {**self}
    def __reduce__(self):
        return self.__class__, ({**self},)


_SACRED = {"sacred.config.custom_containers": {"ReadOnlyList": ReadOnlyList, "ReadOnlyDict": ReadOnlyDict}}

_OMEGACONF = {
    "omegaconf.dictconfig": {"DictConfig": DictConfig},
    "omegaconf.base": {"Metadata": Metadata, "ContainerMetadata": ContainerMetadata},
    "omegaconf.nodes": {"AnyNode": AnyNode},
}
_LIGHTNING = {
    "pytorch_lightning.utilities.parsing": {"AttributeDict": AttributeDict},
    "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": ModelCheckpoint},
}


class Evil:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------- Leopart


def _randn(g: torch.Generator, *shape: int, scale: float = 0.02) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g)


def leopart_tensors(name: str = LEOPART, seed: int = 0, teacher: bool = False) -> tuple[dict, dict]:
    """(file tensors, the timm state dict the backbone must hold)."""
    sd = random_state_dict(name, seed)
    dim = sd["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(seed + 11)
    head = {
        "projection_head.0.weight": _randn(g, 2048, dim), "projection_head.0.bias": _randn(g, 2048),
        "projection_head.2.weight": _randn(g, 2048, 2048), "projection_head.2.bias": _randn(g, 2048),
        "projection_head.4.weight": _randn(g, 256, 2048), "projection_head.4.bias": _randn(g, 256),
        "prototypes.weight": _randn(g, 300, 256),
    }
    out = {f"model.{k}": v for k, v in {**sd, **head}.items()}
    if teacher:  # Leopart's EMA teacher: must not be the one that gets loaded
        out.update({f"teacher.{k}": v + 1.0 for k, v in {**sd, **head}.items()})
    return out, sd


def save_leopart(path: Path, wrapped: bool = False, teacher: bool = False, name: str = LEOPART, seed: int = 0,
                 payload: object = None) -> dict:
    tensors, sd = leopart_tensors(name, seed, teacher)
    if not wrapped:
        obj = dict(tensors)
        if payload is not None:
            obj["payload"] = payload
        torch.save(obj, path)
        return sd
    with fake_modules({**_LIGHTNING, **_SACRED}):
        # Leopart is a sacred experiment: its config lists / dicts reach the LightningModule (and so
        # hyper_parameters) as sacred's read-only containers; its on_train_batch_start sets each param group's
        # weight_decay from a numpy cosine schedule (numpy float64 under pickle protocol 2).
        wd_schedule = np.linspace(0.04, 0.5, 20)
        obj = {
            "epoch": 49, "global_step": 12345, "pytorch-lightning_version": "1.4.9", "state_dict": tensors,
            "callbacks": {ModelCheckpoint: {"monitor": "val/loss", "best_model_score": torch.tensor(0.31),
                                            "best_model_path": "ckpt/epoch=49.ckpt", "current_score": torch.tensor(0.31),
                                            "dirpath": "ckpt/", "payload": payload}},
            "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                                  "param_groups": [{"lr": 1e-4, "weight_decay": wd_schedule[7], "betas": (0.9, 0.999),
                                                    "eps": 1e-8, "amsgrad": False, "params": [0]},
                                                   {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999),
                                                    "eps": 1e-8, "amsgrad": False, "params": [1]}]}],
            "lr_schedulers": [{"last_epoch": 49, "_step_count": 50, "base_lrs": [1e-4, 1e-4], "_last_lr": [1e-4, 1e-4]}],
            "hparams_name": "kwargs",
            "hyper_parameters": {"arch": "vit-small", "patch_size": 16, "num_prototypes": 300, "projection_feat_dim": 256,
                                 "crops_scale": ReadOnlyList([ReadOnlyList([0.25, 1.0]), ReadOnlyList([0.05, 0.25])]),
                                 "nmb_crops": ReadOnlyList([2, 4]), "val_iters": ReadOnlyList([10]),
                                 "optimizer": ReadOnlyDict(name="adamw", lr_heads=1e-4)},
        }
        torch.save(obj, path)
    return sd


# ------------------------------------------------------------------------------------------- STEGO


def stego_tensors(name: str = STEGO, seed: int = 0, code: int = 70, n_classes: int = 27, extra: int = 0) -> tuple[dict, dict]:
    """(state_dict of LitUnsupervisedSegmenter, the timm state dict of its frozen ViT)."""
    sd = random_state_dict(name, seed)
    dim = sd["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(seed + 21)
    state = {f"net.model.{k}": v for k, v in sd.items()}
    state.update({
        "net.cluster1.0.weight": _randn(g, code, dim, 1, 1, scale=dim**-0.5), "net.cluster1.0.bias": _randn(g, code),
        "net.cluster2.0.weight": _randn(g, dim, dim, 1, 1, scale=dim**-0.5), "net.cluster2.0.bias": _randn(g, dim),
        "net.cluster2.2.weight": _randn(g, code, dim, 1, 1, scale=dim**-0.5), "net.cluster2.2.bias": _randn(g, code),
        "train_cluster_probe.clusters": torch.randn(n_classes, code, generator=g),
        "cluster_probe.clusters": torch.randn(n_classes + extra, code, generator=g),
        "linear_probe.weight": _randn(g, n_classes, code, 1, 1), "linear_probe.bias": _randn(g, n_classes),
        "decoder.weight": _randn(g, dim, code, 1, 1), "decoder.bias": _randn(g, dim),
    })
    return state, sd


_STEGO_CFG = {"arch": "dino", "model_type": "vit_small", "dino_patch_size": 8, "dino_feat_type": "feat",
              "projection_type": "nonlinear", "dim": 70, "extra_clusters": 0, "dropout": True, "continuous": True}


def save_stego(path: Path, style: str = "omegaconf", name: str = STEGO, seed: int = 0, payload: object = None,
               **kw) -> tuple[dict, dict]:
    """'omegaconf': PL 1.6 (string-keyed callbacks, hyper_parameters {'n_classes', 'cfg': DictConfig}, loops);
    'lightning-old': PL <= 1.4 (callbacks keyed by the ModelCheckpoint class, an AttributeDict of hparams)."""
    state, sd = stego_tensors(name, seed, **kw)
    cfg = dict(_STEGO_CFG, payload=payload) if payload is not None else dict(_STEGO_CFG)
    with fake_modules({**_OMEGACONF, **_LIGHTNING}):
        common = {"epoch": 5, "global_step": 7000, "state_dict": state, "optimizer_states": [], "lr_schedulers": [],
                  "hparams_name": "kwargs"}
        score = torch.tensor(0.41)
        if style == "omegaconf":
            obj = dict(common, **{"pytorch-lightning_version": "1.6.3",
                                  "callbacks": {"ModelCheckpoint{'monitor': 'test/cluster/mIoU'}": {"best_model_score": score}},
                                  "loops": {"fit_loop": {"state_dict": {}}},
                                  "hyper_parameters": {"n_classes": 27, "cfg": DictConfig(cfg)}})
        elif style == "lightning-old":
            obj = dict(common, **{"pytorch-lightning_version": "1.4.9",
                                  "callbacks": {ModelCheckpoint: {"best_model_score": score, "dirpath": "checkpoints/"}},
                                  "hyper_parameters": AttributeDict(n_classes=27, cfg=cfg)})
        else:
            raise ValueError(style)
        torch.save(obj, path)
    return state, sd


# -------------------------------------------------------------------------------------------- LOCA


def loca_params(dim: int = 384, depth: int = 12, heads: int = 6, mlp: int = 1536, patch: int = 16, grid: int = 14,
                seed: int = 0) -> dict:
    """The encoder of ViT4LOCA with random weights, flax names and shapes (seed-systems.md 3.2)."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        scale = scale if scale is not None else (np.prod(shape[:-1]) if len(shape) > 1 else 1) ** -0.5
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    hd = dim // heads
    enc = {}
    for i in range(depth):
        enc[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": 1 + w(dim, scale=0.1), "bias": w(dim, scale=0.1)},
            "MultiHeadDotProductAttention_0": {
                **{n: {"kernel": w(dim, heads, hd, scale=dim**-0.5), "bias": w(heads, hd, scale=0.1)} for n in ("query", "key", "value")},
                "out": {"kernel": w(heads, hd, dim, scale=dim**-0.5), "bias": w(dim, scale=0.1)},
            },
            "LayerNorm_1": {"scale": 1 + w(dim, scale=0.1), "bias": w(dim, scale=0.1)},
            "MlpBlock_0": {"Dense_0": {"kernel": w(dim, mlp), "bias": w(mlp, scale=0.1)},
                           "Dense_1": {"kernel": w(mlp, dim), "bias": w(dim, scale=0.1)}},
        }
    enc["encoder_norm"] = {"scale": 1 + w(dim, scale=0.1), "bias": w(dim, scale=0.1)}
    return {
        "embedding": {"kernel": w(patch, patch, 3, dim, scale=(3 * patch * patch) ** -0.5), "bias": w(dim, scale=0.1)},
        "posembed_input": w(1, grid, grid, dim, scale=0.5),
        **enc,
    }


def _ext_pack(x):  # flax.serialization._msgpack_ext_pack
    import msgpack

    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
    if isinstance(x, np.generic):
        a = np.asarray(x)
        return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
    raise TypeError(type(x))


def save_loca(path: Path, layout: str = "loca", seed: int = 0, **kw) -> dict:
    """'loca': LOCA's TrainState {params: {ToTokenSequence_0, encoderblock_i, encoder_norm, heads}, ema_params, ...};
    'baseline': scenic's baseline ViT {embedding, Transformer: {posembed_input: {pos_embedding}, ...}, output_projection}.
    Returns the encoder params (the reference for a forward pass)."""
    import msgpack

    p = loca_params(seed=seed, **kw)
    dim = p["encoder_norm"]["scale"].shape[0]
    rng = np.random.default_rng(seed + 1)
    blocks = {k: v for k, v in p.items() if k.startswith("encoderblock_") or k == "encoder_norm"}
    if layout == "loca":
        head = {"Dense_0": {"kernel": rng.standard_normal((dim, 64)).astype(np.float32)},
                "prototypes": {"kernel": rng.standard_normal((64, 128)).astype(np.float32)}}
        params = {"ToTokenSequence_0": {"embedding": p["embedding"], "posembed_input": p["posembed_input"]},
                  **blocks, "projection_head_for_clustering_prediction": head}
        ema = {k: v for k, v in params.items()}
        ema["encoder_norm"] = {k: v + 1.0 for k, v in params["encoder_norm"].items()}  # must not be used
        tree = {"opt_state": None, "ema_params": ema, "params": params, "state": None, "ema_state": None,
                "global_step": np.int64(100000), "rng": np.array([0, 42], dtype=np.uint32), "metadata": {}}
    elif layout == "baseline":
        n = p["posembed_input"].shape[1] * p["posembed_input"].shape[2]
        tree = {"embedding": p["embedding"],
                "Transformer": {"posembed_input": {"pos_embedding": p["posembed_input"].reshape(1, n, dim)}, **blocks},
                "output_projection": {"kernel": rng.standard_normal((dim, 10)).astype(np.float32), "bias": np.zeros(10, np.float32)}}
    else:
        raise ValueError(layout)
    Path(path).write_bytes(msgpack.packb(tree, default=_ext_pack, use_bin_type=True))
    return p


# --------------------------------------------------------------------------------------- malicious


def save_malicious(path: Path, layout: str, marker: Path) -> None:
    """A file in ``layout`` (small ViT-Ti weights where the layout allows) that carries an os.system payload."""
    evil = Evil(marker)
    if layout in ("dino", "timm"):
        sd = random_state_dict(TINY)
        torch.save(dict(sd, payload=evil), path)
    elif layout in ("dino-train", "timm-wrapped"):
        save_checkpoint(path, layout, name=TINY)
        obj = torch.load(path, weights_only=False)
        obj["payload"] = evil
        torch.save(obj, path)
    elif layout == "leopart":
        save_leopart(path, name=TINY, payload=evil)
    elif layout == "leopart-lightning":
        save_leopart(path, wrapped=True, teacher=True, name=TINY, payload=evil)
    elif layout == "stego-omegaconf":
        save_stego(path, "omegaconf", name=TINY, payload=evil)
    elif layout == "stego-lightning-old":
        save_stego(path, "lightning-old", name=TINY, payload=evil)
    else:
        raise ValueError(layout)
