"""``--engine ray`` from Python: a :class:`~segcli.pipeline.Segmenter` whose passes run on Ray Data.

The actors, tasks and their calling convention are the engine's (:mod:`segcli.engines.ray`); this module only
wires them into the Segmenter's passes, which is why it sits at the top beside :mod:`segcli.pipeline`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from segcli.io import storage
from segcli.config import SegmentConfig
from segcli.engines.ray import (ACTOR_BATCH_MIN, MAX_RESTARTS, TASK_BATCH, CropActor, FeatureActor, WorkerSpec, absolute,
                               bind, finish_task, item_rows, raise_fatal, regions_task, retry_args, unpack)
from segcli.engines.ray_cluster import RayOptions
from segcli.errors import BadImageError, SegcliError, UsageError
from segcli.pipeline import RunSummary, Segmenter

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
        worker["cache_dir"] = absolute(self.source.cache_root)
        for name in ("weights", "features_dir"):
            if worker.get(name) is not None:
                worker[name] = absolute(storage.location(worker[name]))
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
        with retry_args():
            return ds.map_batches(
                bind(cls, spec), batch_size=self.actor_batch, batch_format="numpy",
                compute=self.ray.data.ActorPoolStrategy(size=self.workers),
                num_cpus=self.options.cpus_per_worker / share, num_gpus=self.gpus_per_worker / share,
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)

    def _tasks(self, ds, fn: Callable, spec: WorkerSpec):
        """A per-image CPU task stage (1 CPU per task)."""
        with retry_args():
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
                from segcli.vit.checkpoints.base import first_line

                raise RuntimeError(f"the Ray job failed: {type(exc).__name__}: {first_line(exc, 300)}") from exc

    def _rows_of(self, items: list) -> list[dict[str, Any]]:
        """Rows of the items not skipped yet, each with its index in ``items``."""
        return item_rows(items, [i for i, item in enumerate(items) if item.key not in self.skipped])

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
        from segcli.method import steps

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
        from segcli.method import steps

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

    def _write_masks(self, todo: list, out: Path, ov: Path | None, legend=None) -> int:
        from segcli.method import steps

        found = self._region_pass(todo, "masks", "masks", need_features=steps.needs_features(self.model_),
                                  out=absolute(out), overlay=absolute(ov) if ov else None, legend=legend)
        return sum(1 for _ in found)
