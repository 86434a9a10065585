"""``--engine ray``: the per-image stages on Ray Data, the fits on the driver.

One implementation of the method, two schedulers: every per-image step here is the function the local engine
calls (segcli.steps and FeatureSource); only where it runs differs. A pass is one Ray Data job over the sorted
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
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from segcli import storage
from segcli.config import SegmentConfig
from segcli.engines.ray_cluster import RayOptions
from segcli.errors import BadImageError, SegcliError, UsageError
from segcli.pipeline import RunSummary, Segmenter

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


def _absolute(place) -> str:
    """A location as every worker reads it: a URI as is, a local path made absolute (workers may start in
    another directory)."""
    return str(place) if storage.is_remote(place) else str(Path(place).absolute())


def _rows(items, indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
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
        from segcli.features_source import FeatureSource

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
    here with :func:`segcli.steps.fit_sample`, seeded by the image's index in the sorted input, and its CLS
    token), ``features`` (the features, for the per-image tasks downstream). With ``spec.extra["lookup"]`` (a
    pass that needs region bundles only) an image whose bundle is in the region cache skips the backbone.
    """

    @guarded
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from segcli import steps

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
    local engine's grouping across images), each bundle completed (:func:`segcli.steps.with_embeddings`) and
    written to the region cache."""

    @guarded
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from segcli import steps

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
    from segcli.cache import EntryStore

    return EntryStore(storage.location(spec.source["cache_dir"]), f"regions/{spec.extra['region_key']}", compressed=True, warn=warn)


def bind(cls: type, spec: WorkerSpec) -> type:
    """``cls`` with its pass's spec as a class attribute (what Ray Data instantiates in each actor)."""
    return type(cls.__name__, (cls,), {"spec": spec, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


# ------------------------------------------------------------------------------------ per-image CPU tasks


def _task_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _item(row: dict[str, Any]):
    from segcli.images import ImageItem

    return ImageItem(path=storage.location(str(row["path"])), key=str(row["key"]))


def _features(row: dict[str, Any]):
    from segcli.cache import ImageFeatures

    return ImageFeatures.from_arrays(unpack(row["feat"])) if len(row["feat"]) else None


@guarded
def regions_task(batch: dict[str, np.ndarray], spec: WorkerSpec) -> dict[str, list]:
    """Each image's region step up to the crops (:func:`segcli.steps.regions_step`, on this worker's CPU): a cached
    bundle is passed through; a fresh one without crops is written to the region cache here, one with crops
    after the crop forward (:class:`CropActor`)."""
    from segcli import steps

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
    class fit), ``sample`` (:func:`segcli.steps.patch_sample`), ``parts`` (:func:`segcli.steps.part_graph`),
    ``masks`` (:func:`segcli.steps.mask_step`: labels, PNG and overlay written here). Returns small rows."""
    from segcli import steps

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
                                    overlay=storage.location(extra["overlay"]) if extra["overlay"] else None, device="cpu")
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
def _retry_args():
    """Ray 2.60 takes the retry bounds only as ``ray_remote_args``, which it flags as deprecated (to be replaced
    in 2.64): keep the bounds (Ray Data's own default is to retry forever) without the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        yield


class RaySegmenter(Segmenter):
    """A :class:`~segcli.pipeline.Segmenter` whose passes run on Ray Data (module docstring); fits, model and
    outputs are the local engine's, byte for byte.

    Needs a connected Ray session (:func:`segcli.engines.ray_cluster.ray_session`)::

        with ray_session(RayOptions()) as ray:
            seg = RaySegmenter(SegmentConfig(k=21), ray_options=RayOptions(), weights="dino.pth").fit(items)

    The driver loads the backbone on its CPU for its identity only (the model's ``weights_id``, STEGO's probe);
    the actors load their own on ``device``. Paths (cache, weights, features, outputs) are made absolute: on a
    cluster they must name the same files on every node (a shared file system).
    """

    # The workers of each stage (class attributes, so that a subclass can wrap one: the fault tests do).
    feature_actor: type = FeatureActor
    crop_actor: type = CropActor
    region_task: Callable = staticmethod(regions_task)
    finish_task: Callable = staticmethod(finish_task)

    def __init__(self, config: SegmentConfig | None = None, *, model=None, reporter=None,
                 ray_options: RayOptions | None = None, threads: int | None = None, **source_kwargs) -> None:
        import torch

        from segcli.engines.ray_cluster import import_ray

        self.ray = import_ray(getattr(ray_options, "address", None))
        if not self.ray.is_initialized():
            from segcli.errors import UsageError

            raise UsageError("RaySegmenter needs a connected Ray session: use segcli.engines.ray_cluster.ray_session")
        self.options = ray_options or RayOptions()
        self.threads = int(threads or torch.get_num_threads())
        driver = {**source_kwargs, "device": "cpu", "precision": "fp32", "compile": False, "decode_workers": 0}
        super().__init__(config, model=model, reporter=reporter, **driver)
        worker = dict(source_kwargs)
        worker["cache_dir"] = _absolute(self.source.cache_root)
        for name in ("weights", "features_dir"):
            if worker.get(name) is not None:
                worker[name] = _absolute(storage.location(worker[name]))
        self.worker_source = worker
        gpus = float(self.ray.cluster_resources().get("GPU", 0))
        device = str(worker.get("device", "auto")).lower()
        if self.options.gpus_per_worker is not None:
            self.gpus_per_worker = float(self.options.gpus_per_worker)
        else:
            self.gpus_per_worker = 1.0 if gpus and self.source.folder is None and device not in ("cpu", "mps") else 0.0
        self.workers = self.options.workers or (max(1, int(gpus // self.gpus_per_worker)) if self.gpus_per_worker else 1)
        self.actor_batch = max(ACTOR_BATCH_MIN, 2 * int(worker.get("batch_size", 8)))
        self._check_capacity()

    def _check_capacity(self) -> None:
        """Refuse (exit 2, one line) an actor pool the whole cluster cannot hold: Ray Data waits for every actor of
        the pool, forever when they do not fit (one actor per node is checked by ray_cluster.check_resources)."""
        total = self.ray.cluster_resources()
        for flag, key, each in (("--cpus-per-worker", "CPU", self.options.cpus_per_worker),
                                ("--gpus-per-worker", "GPU", self.gpus_per_worker)):
            have = float(total.get(key, 0))
            if each and self.workers * each > have + 1e-9:
                raise UsageError(f"--workers {self.workers} x {flag} {each:g} = {self.workers * each:g} {key}s, but the "
                                 f"Ray cluster has {have:g}; Ray would wait forever: ask for fewer")

    # ------------------------------------------------------------------ Ray Data plumbing
    def _spec(self, model=None, **extra) -> WorkerSpec:
        return WorkerSpec(self.config, self.worker_source, self.threads, model, extra)

    def _actors(self, ds, cls: type, spec: WorkerSpec, share: int):
        """An actor-pool stage: ``--workers`` actors of ``cls``; a worker's CPUs and GPUs are split between the
        ``share`` actor pools of a pass (features and crops), so both fit on the worker's device."""
        with _retry_args():
            return ds.map_batches(
                bind(cls, spec), batch_size=self.actor_batch, batch_format="numpy",
                compute=self.ray.data.ActorPoolStrategy(size=self.workers),
                num_cpus=self.options.cpus_per_worker / share, num_gpus=self.gpus_per_worker / share,
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)

    def _tasks(self, ds, fn: Callable, spec: WorkerSpec):
        """A per-image CPU task stage (1 CPU per task)."""
        with _retry_args():
            return ds.map_batches(fn, fn_kwargs={"spec": spec}, batch_size=TASK_BATCH, batch_format="numpy",
                                  num_cpus=1, max_retries=MAX_RESTARTS)

    def _run(self, rows: list[dict[str, Any]], build: Callable, description: str) -> Iterator[dict[str, Any]]:
        """Run one pass over ``rows`` (``build`` adds its stages to the dataset); its output rows as they arrive,
        with each worker's warnings reported and the progress advanced."""
        if not rows:
            return
        ds = build(self.ray.data.from_items(rows))
        with self.reporter.progress(description, len(rows)) as advance:
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                        if str(row.get("fatal", "")):
                            raise_fatal(str(row["fatal"]))
                        for line in filter(None, str(row.get("warn", "")).split("\n")):
                            self.reporter.warn(line)
                        advance(1)
                        yield row
            except SegcliError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray's errors span many lines of remote tracebacks
                from segcli.checkpoints.base import first_line

                raise RuntimeError(f"the Ray job failed: {type(exc).__name__}: {first_line(exc, 300)}") from exc

    def _rows_of(self, items: list) -> list[dict[str, Any]]:
        """Rows of the items not skipped yet, each with its index in ``items``."""
        return _rows(items, [i for i, item in enumerate(items) if item.key not in self.skipped])

    def _ok(self, items: list, row: dict[str, Any]) -> bool:
        """False (and the image reported and skipped) when the row carries an error."""
        if str(row["error"]):
            self._skip(items[int(row["index"])], BadImageError(str(row["error"])))
            return False
        return True

    # ------------------------------------------------------------------ passes
    def extract(self, items: list) -> RunSummary:
        t0 = time.perf_counter()
        spec = self._spec(mode="extract")
        rows = self._run(self._rows_of(items), lambda ds: self._actors(ds, self.feature_actor, spec, 1), "features")
        n = sum(1 for row in rows if self._ok(items, row))
        return RunSummary(written=n, skipped=dict(self.skipped), seconds=time.perf_counter() - t0,
                          timings=self.timings.as_dict())

    def _fit_samples(self, items: list) -> tuple[list, list[dict[str, np.ndarray]]]:
        from segcli import steps

        spec = self._spec(mode="sample", quota=steps.fit_quota(self.config.max_samples, len(items)))
        samples = {}
        for row in self._run(self._rows_of(items), lambda ds: self._actors(ds, self.feature_actor, spec, 1), "features"):
            if self._ok(items, row):
                samples[int(row["index"])] = unpack(row["feat"])
        order = sorted(samples)
        return [items[i] for i in order], [samples[i] for i in order]

    def _region_pass(self, items: list, description: str, finish: str, need_features: bool = True,
                     **extra) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """One region pass (module docstring): (index in ``items``, finish result) of every usable image, in
        any order; images that fail are reported and skipped."""
        crops = self.config.assign == "cls"
        spec = self._spec(self.model_, mode="features", lookup=not need_features, need_features=need_features,
                          region_key=self._region_key(), finish=finish, **extra)
        share = 2 if crops else 1

        def build(ds):
            ds = self._actors(ds, self.feature_actor, spec, share)
            ds = self._tasks(ds, self.region_task, spec)
            if crops:
                ds = self._actors(ds, self.crop_actor, spec, share)
            return self._tasks(ds, self.finish_task, spec)

        for row in self._run(self._rows_of(items), build, description):
            if self._ok(items, row):
                yield int(row["index"]), (unpack(row["result"]) if len(row["result"]) else {})

    def _sample_patches(self, items: list, description: str, foreground: bool, stream: int) -> list[np.ndarray]:
        from segcli import steps

        quota = steps.fit_quota(self.config.max_samples, len(items))
        found = {i: r["sample"] for i, r in self._region_pass(items, description, "sample", foreground=foreground,
                                                              stream=stream, quota=quota)}
        return [found[i] for i in sorted(found) if len(found[i])]

    def _region_embeddings(self, items: list) -> dict[str, np.ndarray]:
        found = self._region_pass(items, "regions", "emb", need_features=False)
        return {items[i].key: r["emb"] for i, r in found if len(r["emb"])}

    def _part_graph(self, items: list, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        adjacency = np.zeros((len(centroids), len(centroids)), dtype=np.int64)
        sizes = np.zeros(len(centroids), dtype=np.int64)
        for _, r in self._region_pass(items, "part graph", "parts", centroids=np.asarray(centroids)):
            adjacency += r["adjacency"]
            sizes += r["sizes"]
        return adjacency, sizes

    def _write_masks(self, todo: list, out: Path, ov: Path | None) -> int:
        from segcli import steps

        found = self._region_pass(todo, "masks", "masks", need_features=steps.needs_features(self.model_),
                                  out=_absolute(out), overlay=_absolute(ov) if ov else None)
        return sum(1 for _ in found)
