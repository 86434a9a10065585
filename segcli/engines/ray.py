"""``--engine ray``: the per-image stages on Ray Data, the fits on the driver.

One implementation of the method, two schedulers: every per-image step here is the function the local engine
calls (segcli.method.steps and FeatureSource); only where it runs differs. A pass is one Ray Data job over the sorted
input, ``ray.data.from_items([{index, key, path}, ...])``, streamed through

* **backbone actors** (``map_batches`` with an actor pool, one backbone per actor, loaded once in the actor's
  constructor through :class:`FeatureSource`): features through the same on-disk cache and keys as the local
  engine (an actor's finished entries stay when the driver dies), and, for the fit, the patch sample drawn right
  there, seeded by the image's index in the sorted input as :meth:`Segmenter.fit` draws it;
* **per-image CPU tasks**: foreground fusion, refinement, regions up to the crops; labels and PNG/overlay writes;
  the fits' per-image samples and part graphs;
* **crop actors** (a second actor pool, a second backbone per worker): the region crops' CLS embeddings; the
  completed region bundles go to the same region cache as the local engine's.

The driver keeps the items, the bounded fit samples, the region embeddings (as the local engine does) and the
fits themselves (dataset, category, class k-means; part merging). Results come back in any order and are put in
input order before they are used, so the model and the masks are byte-identical to the local engine's.

Per-image results cross process boundaries as ``.npz`` bytes (:func:`pack`), read back with
``allow_pickle=False``: every array arrives with its dtype and shape, whatever Arrow would make of it.

Threads: every actor and task runs torch with the driver's thread count (``--threads`` or torch's default
there), because the backbone's fp16 features depend on it (one value in ~768 differed with 1 thread instead of 2).
"""

from __future__ import annotations

import functools
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from segcli.io import storage
from segcli.config import SegmentConfig
from segcli.errors import BadImageError, SegcliError

# Rows per backbone-actor call (FeatureSource buckets them by input shape inside the call) and per CPU task.
ACTOR_BATCH_MIN = 16
TASK_BATCH = 4
# Bounded retries: an actor or task that dies (a killed process, a lost node) is restarted and its batch run
# again; a batch that keeps killing its worker ends the run instead of looping.
MAX_RESTARTS = 4


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as ``.npz`` bytes (no pickles), to pass through Ray Data unchanged."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor or task needs to rebuild the driver's stages: small and picklable.

    ``source``: the FeatureSource keyword arguments of the run (weights, device, precision, cache_dir, ...);
    ``threads``: torch's thread count on the driver, used by every worker.
    """

    config: SegmentConfig
    source: dict[str, Any]
    threads: int
    model: Any = None  # the fitted SegModel for region passes (None while fitting the levels)
    extra: dict[str, Any] = field(default_factory=dict)  # per pass: quota, sample stream, part centroids, outputs


def set_threads(threads: int) -> None:
    """torch's thread count of the local engine (Ray sets OMP_NUM_THREADS to a worker's CPUs otherwise)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def absolute(place) -> str:
    """A location as every worker reads it: a URI as is, a local path made absolute (workers may start in
    another directory)."""
    return str(place) if storage.is_remote(place) else str(Path(place).absolute())


def item_rows(items, indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The input rows of a pass: each image's index in the pass's item list, its key and its path."""
    indices = range(len(items)) if indices is None else indices
    return [{"index": int(i), "key": items[i].key, "path": str(items[i].path)} for i in indices]


class _Warnings:
    """Warnings of a worker's stages (a damaged cache entry recomputed), sent back with its next output rows."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def take(self) -> str:
        text, self.messages = "\n".join(self.messages), []
        return text


# The columns every stage of a pass passes on (blobs are .npz bytes, b"" when absent). ``error``: the image is
# unusable (reported and skipped); ``fatal``: "ClassName:message" of a segcli error that
# stops the run (a backbone an actor cannot load, an unwritable output), raised again on the driver.
ROW_COLUMNS = ("index", "key", "path", "skip", "error", "fatal", "digest", "feat", "bundle", "crops", "warn")


def _row_defaults() -> dict[str, Any]:
    return {"skip": False, "error": "", "fatal": "", "digest": "", "feat": b"", "bundle": b"", "crops": b"", "warn": ""}


def guarded(fn: Callable) -> Callable:
    """A stage's batch function whose segcli errors (other than a bad image) come back as ``fatal`` rows.

    Ray passes a worker's exception to the driver as text inside its own exception types, so its class and
    one-line message would be lost; as data they reach :meth:`RaySegmenter._run`, which raises them again.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegcliError as exc:
            if isinstance(exc, BadImageError):
                raise
            batch = next(a for a in args if isinstance(a, dict))
            rows = [{**_row_defaults(), "index": int(i), "key": str(k), "path": str(p),
                     "fatal": f"{type(exc).__name__}:{exc}"}
                    for i, k, p in zip(batch["index"], batch["key"], batch["path"])]
            return _columns(rows) if fn.__name__ != "finish_task" else {
                "index": [r["index"] for r in rows], "error": [""] * len(rows), "fatal": [r["fatal"] for r in rows],
                "result": [b""] * len(rows), "warn": [""] * len(rows)}

    return run


def raise_fatal(text: str) -> None:
    """Raise the segcli error a worker sent back as ``ClassName:message``."""
    from segcli import errors

    name, _, message = text.partition(":")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SegcliError)):
        cls = SegcliError
    raise cls(message)


class BackboneActor:
    """A backbone actor: one FeatureSource (one backbone on the actor's device, the run's feature cache) for the
    actor's lifetime, built once in the constructor.

    The class is bound to its pass's spec by :func:`bind` (a class attribute, not a constructor argument, so Ray
    holds no object-store reference it needs to restart the actor) and called on batches of rows.
    """

    spec: WorkerSpec | None = None

    def __init__(self) -> None:
        from segcli.engines.feature_source import FeatureSource

        spec = self.spec
        set_threads(spec.threads)
        self.warnings = _Warnings()
        self.init_error: SegcliError | None = None
        try:
            self.source = FeatureSource(spec.config, warn=self.warnings, **spec.source)
        except SegcliError as exc:
            # Raised from the first call instead: Ray restarts an actor whose constructor fails and reports only
            # a traceback, while an error of a call reaches the driver as itself (one line, its exit code).
            self.init_error = exc

    def check(self) -> None:
        if self.init_error is not None:
            raise self.init_error


class FeatureActor(BackboneActor):
    """Features of each row's image, through the run's feature cache (same keys as the local engine).

    ``spec.extra["mode"]``: ``extract`` (the cache only), ``sample`` (the fit's patch sample of the image, drawn
    here with :func:`segcli.method.steps.fit_sample`, seeded by the image's index in the sorted input, and its CLS
    token), ``features`` (the features, for the per-image tasks downstream). With ``spec.extra["lookup"]`` (a
    pass that needs region bundles only) an image whose bundle is in the region cache skips the backbone.
    """

    @guarded
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from segcli.method import steps

        self.check()
        extra = self.spec.extra
        mode = extra["mode"]
        rows = [{**_row_defaults(), "index": int(i), "key": str(k), "path": str(p)}
                for i, k, p in zip(batch["index"], batch["key"], batch["path"])]
        if extra.get("lookup"):
            store = _region_store(self.spec, self.warnings)
            for row in rows:
                try:
                    row["digest"] = self.source.item_id(_item(row))
                except BadImageError:
                    continue  # reported by the features pass below
                bundle = store.load(row["digest"], steps.REGION_SPECS, None, check=steps.check_region_bundle)
                if bundle is not None:
                    row["bundle"], row["skip"] = pack(bundle), True
        todo = {r["key"]: r for r in rows if not r["skip"]}
        # Run the generator to its end: only then has it waited for its last cache writes (a zip with the rows
        # would stop it one step early, and closing it drops the writes still queued).
        for item, f in self.source.features([_item(r) for r in todo.values()]):
            row = todo[item.key]
            if isinstance(f, BadImageError):
                row["error"] = str(f)
                continue
            row["digest"] = self.source.item_id(item)
            if mode == "sample":
                row["feat"] = pack(steps.fit_sample(f, extra["quota"], self.spec.config.seed, row["index"]))
            elif mode == "features":
                row["feat"] = pack(f.arrays())
        rows[-1]["warn"] = self.warnings.take()
        return _columns(rows)


class CropActor(BackboneActor):
    """The region crops of every row of the batch in one crop forward (:meth:`FeatureSource.embed_crops`, the
    local engine's grouping across images), each bundle completed (:func:`segcli.method.steps.with_embeddings`) and
    written to the region cache."""

    @guarded
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from segcli.method import steps

        self.check()
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        crops = {int(r["index"]): _crop_list(unpack(r["crops"])) for r in rows if len(r["crops"])}
        flat = [c for cs in crops.values() for c in cs]
        emb = self.source.embed_crops(flat) if flat else None
        store = _region_store(self.spec, self.warnings)
        start = 0
        results = []
        for row in rows:
            cs = crops.get(int(row["index"]))
            if cs:
                bundle = steps.with_embeddings(unpack(row["bundle"]), emb[start:start + len(cs)])
                start += len(cs)
                store.save(str(row["digest"]), bundle)
                row = {**row, "bundle": pack(bundle), "crops": b""}
            results.append({k: row[k] for k in ROW_COLUMNS})
        results[-1]["warn"] = "\n".join(filter(None, [str(results[-1]["warn"]), self.warnings.take()]))
        return _columns(results)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ROW_COLUMNS}


def _crop_list(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [arrays[f"crop{i}"] for i in range(len(arrays))]


def _region_store(spec: WorkerSpec, warn: Callable[[str], None]):
    """The run's region cache (the local engine's EntryStore, same folder and keys)."""
    from segcli.io.cache import EntryStore

    return EntryStore(storage.location(spec.source["cache_dir"]), f"regions/{spec.extra['region_key']}", compressed=True, warn=warn)


def bind(cls: type, spec: WorkerSpec) -> type:
    """``cls`` with its pass's spec as a class attribute (what Ray Data instantiates in each actor)."""
    return type(cls.__name__, (cls,), {"spec": spec, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


# ------------------------------------------------------------------------------------ per-image CPU tasks


def _task_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _item(row: dict[str, Any]):
    from segcli.io.images import ImageItem

    return ImageItem(path=storage.location(str(row["path"])), key=str(row["key"]))


def _features(row: dict[str, Any]):
    from segcli.io.cache import ImageFeatures

    return ImageFeatures.from_arrays(unpack(row["feat"])) if len(row["feat"]) else None


@guarded
def regions_task(batch: dict[str, np.ndarray], spec: WorkerSpec) -> dict[str, list]:
    """Each image's region step up to the crops (:func:`segcli.method.steps.regions_step`, on this worker's CPU): a cached
    bundle is passed through; a fresh one without crops is written to the region cache here, one with crops
    after the crop forward (:class:`CropActor`)."""
    from segcli.method import steps

    set_threads(spec.threads)
    notes = _Warnings()
    store = _region_store(spec, notes)
    model = spec.model
    results = []
    for row in _task_rows(batch):
        row = dict(row)
        if not row["error"] and not row["fatal"] and not len(row["bundle"]):
            f = _features(row)
            try:
                # A pass that looked its bundles up already (FeatureActor) read this one once: absent or damaged.
                cached = None if spec.extra.get("lookup") else store.load(
                    str(row["digest"]), steps.REGION_SPECS, {"h": f.grid[0], "w": f.grid[1]}, check=steps.check_region_bundle)
                bundle, crops, fresh = steps.regions_step(_item(row), f, cached, model=model, device="cpu")
            except BadImageError as exc:
                row["error"] = str(exc)
            else:
                row["bundle"] = pack(bundle)
                if crops:
                    row["crops"] = pack({f"crop{i}": c for i, c in enumerate(crops)})
                elif fresh:
                    store.save(str(row["digest"]), bundle)
        if not spec.extra["need_features"]:
            row["feat"] = b""
        results.append({k: row[k] for k in ROW_COLUMNS})
    results[-1]["warn"] = "\n".join(filter(None, [str(results[-1]["warn"]), notes.take()]))
    return _columns(results)


@guarded
def finish_task(batch: dict[str, np.ndarray], spec: WorkerSpec) -> dict[str, list]:
    """The last per-image step of a pass, by ``spec.extra["finish"]``: ``emb`` (the region embeddings, for the
    class fit), ``sample`` (:func:`segcli.method.steps.patch_sample`), ``parts`` (:func:`segcli.method.steps.part_graph`),
    ``masks`` (:func:`segcli.method.steps.mask_step`: labels, PNG and overlay written here). Returns small rows."""
    from segcli.method import steps

    set_threads(spec.threads)
    extra, model = spec.extra, spec.model
    out: dict[str, list] = {"index": [], "error": [], "fatal": [], "result": [], "warn": []}
    for row in _task_rows(batch):
        error, result = str(row["error"]), b""
        if not error and not row["fatal"]:
            bundle, f = unpack(row["bundle"]), _features(row)
            try:
                if extra["finish"] == "emb":
                    result = pack({"emb": bundle["emb"]})
                elif extra["finish"] == "sample":
                    result = pack({"sample": steps.patch_sample(f, bundle["fg_grid"], extra["foreground"], extra["quota"],
                                                                model.config.seed, extra["stream"], int(row["index"]))})
                elif extra["finish"] == "parts":
                    adjacency, sizes = steps.part_graph(f, bundle["fg_grid"], extra["centroids"])
                    result = pack({"adjacency": adjacency, "sizes": sizes})
                else:
                    steps.mask_step(_item(row), f, bundle, model=model, out=storage.location(extra["out"]),
                                    overlay=storage.location(extra["overlay"]) if extra["overlay"] else None, device="cpu",
                                    legend=extra.get("legend"))
            except BadImageError as exc:
                error = str(exc)
        out["index"].append(int(row["index"]))
        out["error"].append(error)
        out["fatal"].append(str(row["fatal"]))
        out["result"].append(result)
        out["warn"].append(str(row["warn"]))
    return out


# ------------------------------------------------------------------------------------------------ driver


@contextmanager
def retry_args():
    """Ray 2.60 takes the retry bounds only as ``ray_remote_args``, which it flags as deprecated (to be replaced
    in 2.64): keep the bounds (Ray Data's own default is to retry forever) without the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        yield
