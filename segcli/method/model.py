"""The fitted model: what `cluster-dataset` writes and `segment --model` reads.

Stored as safetensors (plain arrays plus a JSON header), so loading a model file can never execute code,
unlike a pickle. It holds centroids and decisions only, never features: kilobytes to a few MB. The path may be
an object-store URI (``s3://``, ``gs://``; :mod:`segcli.io.storage`): the file is uploaded whole, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli import __version__
from segcli.io import storage
from segcli.io.arrays import ArrayCheckError, ArraySpec, check_arrays
from segcli.config import SegmentConfig
from segcli.errors import ModelError, OutputError, UsageError
from segcli.method.foreground import LevelModel
from segcli.io.outputs import MAX_LABEL_ID, atomic_write

FORMAT = "segcli-model"
# The newest format this segcli reads. A file records the oldest reader that can use it: 1 for
# --prior levels (readable by every segcli), 2 for --prior maskdistill/vote (older readers would ignore the
# prior and silently fall back to the three levels, so they must refuse the file instead); 2 also for stuff
# classes (--stuff N >= 2), which an older segcli could not label correctly.
FORMAT_VERSION = 2


def expected_arrays(config: SegmentConfig, feature_dim: int) -> tuple[dict[str, ArraySpec], dict[str, int]]:
    """The arrays a model file of this configuration holds, and the sizes known in advance: the one place that
    says what a model file must contain (an array added to the model adds its spec here).

    Named sizes: D feature dim; Dcls CLS dim; G fitted categories; K classes; E class embedding size;
    P parts; Dp part centroid size; S stuff classes; Ds stuff centroid size. Their ranges are checked in :func:`check_model_arrays`.
    """
    f32, u8, i64 = ("float32",), ("uint8",), ("int64",)
    # --prior maskdistill fits no level: the dataset level is stored with no cluster and no category.
    dataset_k = 0 if config.prior == "maskdistill" else config.level_clusters("dataset")
    specs = {
        "dataset_centroids": ArraySpec((dataset_k, "D"), f32),
        "dataset_foreground": ArraySpec((dataset_k,), u8),
        "category_centroids": ArraySpec(("G", "Dcls"), f32),
        "category_level_centroids": ArraySpec(("G", config.level_clusters("category"), "D"), f32),
        "category_level_foreground": ArraySpec(("G", config.level_clusters("category")), u8),
        "class_centroids": ArraySpec(("K", "E"), f32),
        "part_centroids": ArraySpec(("P", "Dp"), f32),
        "part_classes": ArraySpec(("P",), i64),
        # Absent from files written before --stuff existed (read as no stuff).
        "stuff_centroids": ArraySpec(("S", "Ds"), f32, optional=True),
    }
    return specs, {"D": int(feature_dim)}


def check_model_arrays(arrays: dict[str, np.ndarray], config: SegmentConfig, feature_dim: int) -> None:
    """Every array's shape, dtype and values against the configuration; ArrayCheckError says what is wrong."""
    specs, dims = expected_arrays(config, feature_dim)
    d = check_arrays(arrays, specs, dims)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ArrayCheckError(msg)

    need(d["D"] >= 1 and d["Dcls"] >= 1, "empty feature or CLS dimension")
    if config.prior == "maskdistill":
        need(d["G"] == 0, f"{d['G']} categories, expected none with --prior maskdistill")
    else:
        need(1 <= d["G"] <= config.n_categories, f"{d['G']} categories, expected 1..{config.n_categories}")
    need(d["K"] <= config.n_things, f"{d['K']} class centroids, expected at most {config.n_things} thing classes")
    if d["K"]:
        want = {"pooled": d["D"], "cls": d["Dcls"]}.get(config.assign)
        need(want is None or d["E"] == want, f"class centroids have size {d['E']}, expected {want} for --assign {config.assign}")
    pc = arrays["part_classes"]
    if config.assign == "probe":
        # STEGO's cluster probe labels patches 1..P whatever --k says (the probe's own number of clusters).
        need(d["P"] <= MAX_LABEL_ID, f"{d['P']} probe clusters, more than the {MAX_LABEL_ID} ids a label PNG holds")
        need(d["P"] == 0 or d["Dp"] == d["D"], f"part centroids have size {d['Dp']}, expected {d['D']}")
        need(not pc.size or (pc.min() >= 1 and pc.max() <= d["P"]), f"array 'part_classes' holds ids outside 1..{d['P']}")
    else:
        need(d["P"] <= config.n_parts, f"{d['P']} part centroids, expected at most --parts {config.n_parts}")
        need(d["P"] == 0 or d["Dp"] == d["D"], f"part centroids have size {d['Dp']}, expected {d['D']}")
        lo = config.thing_offset
        need(not pc.size or (pc.min() >= lo and pc.max() <= config.k - 1), f"array 'part_classes' holds ids outside {lo}..{config.k - 1}")
    for name in ("dataset_foreground", "category_level_foreground"):
        need(bool(np.isin(arrays[name], (0, 1)).all()), f"array {name!r} holds values other than 0 and 1")
    s = d.get("S", 0)
    if config.n_stuff:
        need(s in (0, config.n_stuff), f"{s} stuff centroids, expected {config.n_stuff} for --stuff {config.stuff}")
        need(s == 0 or d["Ds"] == d["D"], f"stuff centroids have size {d['Ds']}, expected {d['D']}")
    else:
        need(s == 0, f"{s} stuff centroids, expected none without --stuff")


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
        k, d = self.config.category_k, self.feature_dim  # shapes of an empty category list (--prior maskdistill)
        return {
            "dataset_centroids": self.dataset.centroids.astype(np.float32),
            "dataset_foreground": self.dataset.foreground.astype(np.uint8),
            "category_centroids": self.category_centroids.astype(np.float32),
            "category_level_centroids": np.stack([c.centroids for c in self.categories]).astype(np.float32)
            if self.categories else np.zeros((0, k, d), np.float32),
            "category_level_foreground": np.stack([c.foreground for c in self.categories]).astype(np.uint8)
            if self.categories else np.zeros((0, k), np.uint8),
            "class_centroids": self.class_centroids.astype(np.float32),
            "part_centroids": self.part_centroids.astype(np.float32),
            "part_classes": self.part_classes.astype(np.int64),
            "stuff_centroids": self.stuff_centroids.astype(np.float32),
        }

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": "1" if self.config.prior == "levels" and not self.config.n_stuff else str(FORMAT_VERSION),
            "segcli_version": self.version,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "weights_id": self.weights_id,
            "feature_dim": str(self.feature_dim),
        }

    def to_bytes(self) -> bytes:
        """The file's bytes: safetensors, with its JSON header's keys sorted, so that the same model always gives
        the same bytes (safetensors itself writes the header in a per-process random order)."""
        from safetensors.numpy import save

        return _sorted_header(save({k: np.ascontiguousarray(v) for k, v in self.tensors().items()},
                                   metadata=self.metadata()))

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

    def save(self, path: str | Path | storage.ObjectPath) -> Path | storage.ObjectPath:
        """Write the model file atomically. It is checked first exactly as :meth:`load` checks it, so a file
        segcli writes always loads (a model that would not is a bug, reported instead of written)."""
        path = storage.location(path)
        check_model_out(path)
        try:
            check_model_arrays(self.tensors(), self.config, self.feature_dim)
        except ArrayCheckError as exc:
            raise RuntimeError(f"the fitted model does not pass its own file check: {exc}") from None
        storage.makedirs(path.parent)
        data = self.to_bytes()
        atomic_write(path, lambda fh: fh.write(data))
        return path

    @classmethod
    def load(cls, path: str | Path | storage.ObjectPath) -> "SegModel":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = storage.location(path)
        if not storage.is_file(path):
            if storage.is_dir(path):
                raise ModelError(f"--model {path} is a folder: give the model file itself (made by `segcli cluster-dataset --out FILE`)")
            if not storage.is_remote(path) and storage.not_regular(path):
                storage.check_regular(path, ModelError)
            raise ModelError(f"model file not found: {path}")
        try:
            raw = storage.read_bytes(path, ModelError)
            arrays = load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8: 8 + header_len]).get("__metadata__", {})
        except ModelError:  # an object that could not be downloaded: the store's own reason
            raise
        except (SafetensorError, ValueError, OSError, json.JSONDecodeError, Exception) as exc:  # noqa: BLE001
            raise ModelError(f"{path} is not a segcli model file or is damaged ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise ModelError(f"{path} is not a segcli model file (made by `segcli cluster-dataset --out`)")
        try:
            version = int(meta.get("format_version", ""))
        except (TypeError, ValueError):
            raise ModelError(f"{path}: bad format version {meta.get('format_version')!r} (damaged model file)") from None
        if version > FORMAT_VERSION:
            raise ModelError(f"{path} was written by a newer segcli ({meta.get('segcli_version')}); upgrade segcli")
        if version < 1:
            raise ModelError(f"{path}: bad format version {version} (damaged model file)")
        try:
            config = SegmentConfig.from_dict(json.loads(meta["config"]))
            feature_dim = int(meta["feature_dim"])
            weights_id = meta["weights_id"]
        except (KeyError, ValueError, TypeError, AttributeError, UsageError) as exc:
            raise ModelError(f"{path}: model file has a bad or missing configuration ({exc})") from None
        try:
            check_model_arrays(arrays, config, feature_dim)
        except ArrayCheckError as exc:
            raise ModelError(f"{path}: model file does not match its configuration: {exc}") from None
        cat_c, cat_f = arrays["category_level_centroids"], arrays["category_level_foreground"].astype(bool)
        return cls(
            config=config,
            weights_id=weights_id,
            feature_dim=feature_dim,
            dataset=LevelModel(arrays["dataset_centroids"], arrays["dataset_foreground"].astype(bool)),
            category_centroids=arrays["category_centroids"],
            categories=[LevelModel(cat_c[i], cat_f[i]) for i in range(cat_c.shape[0])],
            class_centroids=arrays["class_centroids"],
            part_centroids=arrays["part_centroids"],
            part_classes=arrays["part_classes"],
            stuff_centroids=arrays.get("stuff_centroids", np.zeros((0, 0), np.float32)),
            version=meta.get("segcli_version", "?"),
        )


def is_model_file(path: Path | storage.ObjectPath) -> bool:
    """Whether ``path`` holds a segcli model file, from its safetensors header alone (a few KB read)."""
    try:
        head = storage.read_bytes(path) if storage.is_remote(path) else _read_head(path)
        n = int.from_bytes(head[:8], "little")
        if not 2 <= n <= len(head) - 8:
            return False
        return json.loads(head[8:8 + n]).get("__metadata__", {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - unreadable or not JSON: not a model file
        return False


def _read_head(path: Path, limit: int = 1 << 20) -> bytes:
    with storage.open_regular(path) as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(0) if n > limit else (n.to_bytes(8, "little") + f.read(n))


def check_model_out(path: Path | storage.ObjectPath) -> None:
    """Refuse a model destination before any work (the fit takes minutes; its file is written at the end):
    a folder, a path under a file, an unwritable folder, or an existing file that is not a segcli model
    (segcli replaces only its own model files, never a user's file of another kind)."""
    if storage.is_remote(path):
        if storage.is_dir(path):
            raise UsageError(f"model path {path} is a folder; give a file name such as {path / 'model.segcli'}")
        if storage.is_file(path) and not is_model_file(path):
            raise OutputError(f"--out {path} exists and is not a segcli model file: segcli replaces only its own "
                              "model files; remove it or choose another name")
        return
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise UsageError(f"model path {path} is a folder; give a file name such as {path / 'model.segcli'}")
    if os.path.lexists(path):
        if storage.not_regular(path) or not is_model_file(path):
            raise OutputError(f"--out {path} exists and is not a segcli model file: segcli replaces only its own "
                              "model files; remove it or choose another name")
        if not os.access(path.parent, os.W_OK):
            raise OutputError(f"cannot write the model file {path}: its folder is not writable")
        return
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write the model file {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the model file {path}: {folder} is not writable")


def _sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header re-serialised with sorted keys, padded with spaces to the same
    length (tensor offsets are relative to the end of the header, so the data is unchanged)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never expected (same content, compact separators): keep safetensors' own bytes
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]

