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

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from segcli.config import SegmentConfig
from segcli.engines.ray_cluster import RayOptions
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


def _rows(items, indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The input rows of a pass: each image's index in the pass's item list, its key and its path."""
    indices = range(len(items)) if indices is None else indices
    return [{"index": int(i), "key": items[i].key, "path": str(items[i].path)} for i in indices]


def _items(batch: dict[str, np.ndarray]):
    from segcli.images import ImageItem

    return [ImageItem(path=Path(str(p)), key=str(k)) for k, p in zip(batch["key"], batch["path"])]


class _Warnings:
    """Warnings of a worker's stages (a damaged cache entry recomputed), sent back with its next output rows."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def take(self) -> str:
        text, self.messages = "\n".join(self.messages), []
        return text


class FeatureActor:
    """A backbone actor: one FeatureSource (one backbone, the run's feature cache) for the actor's lifetime.

    ``spec.extra["mode"]``: ``extract`` (cache only), ``sample`` (the fit's patch sample of each image, drawn here,
    seeded by the image's index in the sorted input: :func:`segcli.steps.fit_sample`), ``features`` (the
    features themselves, for the per-image tasks downstream). The class is bound to its pass's spec by
    :func:`bind` (a class attribute, not a constructor argument: Ray keeps no object-store reference to restart
    the actor from).
    """

    spec: WorkerSpec | None = None

    def __init__(self) -> None:
        from segcli.features_source import FeatureSource

        spec = self.spec
        set_threads(spec.threads)
        self.warnings = _Warnings()
        self.source = FeatureSource(spec.config, warn=self.warnings, **spec.source)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from segcli.steps import fit_sample

        extra = self.spec.extra
        mode = extra["mode"]
        out: dict[str, list] = {"index": [], "error": [], "digest": [], "blob": [], "warn": []}
        items = _items(batch)
        for index, (item, f) in zip(batch["index"], self.source.features(items)):
            out["index"].append(int(index))
            if isinstance(f, BadImageError):
                out["error"].append(str(f))
                out["digest"].append("")
                out["blob"].append(b"")
            else:
                out["error"].append("")
                out["digest"].append(self.source.item_id(item))
                if mode == "sample":
                    out["blob"].append(pack(fit_sample(f, extra["quota"], self.spec.config.seed, int(index))))
                elif mode == "features":
                    out["blob"].append(pack(f.arrays()))
                else:
                    out["blob"].append(b"")
            out["warn"].append(self.warnings.take())
        return out


def bind(cls: type, spec: WorkerSpec) -> type:
    """``cls`` with its pass's spec as a class attribute (what Ray Data instantiates in each actor)."""
    return type(cls.__name__, (cls,), {"spec": spec, "__module__": cls.__module__})
