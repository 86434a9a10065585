"""The fitted model: what `cluster-dataset` writes and `segment --model` reads.

Stored as safetensors (plain arrays plus a JSON header), so loading a model file can never execute code,
unlike a pickle. It holds centroids and decisions only, never features: kilobytes to a few MB.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli import __version__
from segcli.config import SegmentConfig
from segcli.errors import ModelError, UsageError
from segcli.foreground import LevelModel
from segcli.outputs import atomic_write

FORMAT = "segcli-model"
# 2: stuff classes (--stuff N >= 2). Files without stuff are still written as version 1, so an older segcli
# keeps reading them, and refuses ("upgrade segcli") the files it could not label correctly.
FORMAT_VERSION = 2


@dataclass
class SegModel:
    config: SegmentConfig
    weights_id: str  # the backbone fingerprint the features came from ("features:<dir>" for --features)
    feature_dim: int
    dataset: LevelModel
    category_centroids: np.ndarray  # (C, Dcls) float32, L2-normalised CLS space
    categories: list[LevelModel]  # one per category
    class_centroids: np.ndarray  # (n_classes, De) float32; row i is class id i + 1
    part_centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    part_classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (P,) class id 1.. per part
    stuff_centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (N, D); row i = stuff id i
    version: str = __version__

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "dataset_centroids": self.dataset.centroids.astype(np.float32),
            "dataset_foreground": self.dataset.foreground.astype(np.uint8),
            "category_centroids": self.category_centroids.astype(np.float32),
            "category_level_centroids": np.stack([c.centroids for c in self.categories]).astype(np.float32),
            "category_level_foreground": np.stack([c.foreground for c in self.categories]).astype(np.uint8),
            "class_centroids": self.class_centroids.astype(np.float32),
            "part_centroids": self.part_centroids.astype(np.float32),
            "part_classes": self.part_classes.astype(np.int64),
            "stuff_centroids": self.stuff_centroids.astype(np.float32),
        }

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION if self.config.n_stuff else 1),
            "segcli_version": self.version,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "weights_id": self.weights_id,
            "feature_dim": str(self.feature_dim),
        }

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in self.tensors().items()}, metadata=self.metadata())

    def digest(self) -> str:
        """Identity of the fitted state, used to key per-image results computed with it.

        Hashes the arrays and the sorted metadata rather than the file bytes: safetensors writes its JSON
        header in a per-process random order, so the same model can serialise to different bytes.
        """
        h = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for name, arr in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"model path {path} is a folder; give a file name such as {path / 'model.segcli'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        atomic_write(path, lambda fh: fh.write(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SegModel":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            raw = path.read_bytes()
            arrays = load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8: 8 + header_len]).get("__metadata__", {})
        except (SafetensorError, ValueError, OSError, json.JSONDecodeError, Exception) as exc:  # noqa: BLE001
            raise ModelError(f"{path} is not a segcli model file or is damaged ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise ModelError(f"{path} is not a segcli model file (made by `segcli cluster-dataset --out`)")
        if int(meta.get("format_version", "0")) > FORMAT_VERSION:
            raise ModelError(f"{path} was written by a newer segcli ({meta.get('segcli_version')}); upgrade segcli")
        try:
            config = SegmentConfig.from_dict(json.loads(meta["config"]))
            cat_c, cat_f = arrays["category_level_centroids"], arrays["category_level_foreground"].astype(bool)
            stuff = arrays.get("stuff_centroids", np.zeros((0, 0), np.float32))
            if config.n_stuff and (stuff.ndim != 2 or len(stuff) not in (0, config.n_stuff)
                                   or (len(stuff) and stuff.shape[1] != int(meta["feature_dim"]))):
                raise ValueError(f"stuff centroids of shape {stuff.shape} for --stuff {config.stuff}")
            return cls(
                config=config,
                weights_id=meta["weights_id"],
                feature_dim=int(meta["feature_dim"]),
                dataset=LevelModel(arrays["dataset_centroids"], arrays["dataset_foreground"].astype(bool)),
                category_centroids=arrays["category_centroids"],
                categories=[LevelModel(cat_c[i], cat_f[i]) for i in range(cat_c.shape[0])],
                class_centroids=arrays["class_centroids"],
                part_centroids=arrays["part_centroids"],
                part_classes=arrays["part_classes"],
                stuff_centroids=stuff,
                version=meta.get("segcli_version", "?"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{path}: model file is incomplete ({exc})") from None
