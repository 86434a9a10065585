"""Where a run gets each image's features: the backbone through the on-disk cache, or a folder of files
computed elsewhere (``--features DIR``). Both yield the same :class:`ImageFeatures`, so everything after
this stage is identical whichever source is used.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from segcli.io import storage
from segcli.io.cache import CACHE_FORMAT, FeatureCache, FeatureFolder, ImageFeatures, has_proposal
from segcli.config import FEATURE_FIELDS, SegmentConfig
from segcli.errors import BadImageError, InputError, ModelError, SegcliError, UsageError
from segcli.io.images import ImageItem, content_digest, image_digest, load_image
from segcli.timings import Timings


def default_cache_dir() -> Path:
    """$SEGCLI_CACHE (a path or an s3:// / gs:// URI), else $XDG_CACHE_HOME/segcli, else ~/.cache/segcli."""
    if os.environ.get("SEGCLI_CACHE"):
        return storage.location(os.environ["SEGCLI_CACHE"])
    return _home_cache_dir()


def _home_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segcli"


class FeatureSource:
    """Features per image, computed at most once per (image content, backbone, weights, settings)."""

    def __init__(
        self,
        config: SegmentConfig,
        *,
        features_dir: str | Path | None = None,
        weights: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
        openvino: bool = False,
        cache_dir: str | Path | None = None,
        batch_size: int = 8,
        decode_workers: int | None = None,
        lookahead: int | None = None,
        timings: Timings | None = None,
        backbone=None,
        warn: Callable[[str], None] | None = None,
        feature_cache: bool = True,
    ) -> None:
        self.config = config
        # False: features are recomputed by every pass instead of written to and read from the cache (on a GPU
        # a forward is cheaper than the npz I/O; region bundles are still cached).
        self.feature_cache = bool(feature_cache)
        # The sizes every image's features must share (feature dim D, CLS dim C): fixed by the first features
        # the run reads or computes; a later file that differs is reported and skipped (a cache entry: redone).
        self.dims: dict[str, int] = {}
        self.warn = warn or (lambda message: None)
        self.cache_root = storage.location(cache_dir) if cache_dir else default_cache_dir()
        if storage.is_remote(self.cache_root):  # a missing bucket or no credentials: one line before any work
            storage.check_writable(self.cache_root)
        self.batch_size = max(1, int(batch_size))
        # Background decode threads (None: default_decode_workers(); 0: decode in the calling thread) and the
        # number of images the scheduler may hold at once (None: default_lookahead(batch_size)).
        self.decode_workers = default_decode_workers() if decode_workers is None else max(0, int(decode_workers))
        self.lookahead = max(self.batch_size, int(lookahead) if lookahead is not None else default_lookahead(self.batch_size))
        self.timings = timings or Timings()
        self._digests: dict[str, str] = {}
        self.last_batch_sizes: list[int] = []  # device batch sizes of the last features() pass (statistics)
        self.folder = FeatureFolder(storage.location(features_dir)) if features_dir else None
        self.backbone = backbone
        if self.folder is None and self.backbone is None:
            from segcli.vit.backbone import load_backbone

            with self.timings("load model"):
                self.backbone = load_backbone(config.backbone, weights=weights, device=device, precision=precision)
        if self.backbone is not None:
            _check_proposal_heads(config, self.backbone)
        if compile and self.backbone is not None:
            # torch's kernel cache needs a local folder: with an object-store cache it stays in the default one.
            local = next(c for c in (self.cache_root, default_cache_dir(), _home_cache_dir()) if not storage.is_remote(c))
            self.backbone.compile(local / "inductor")
        if openvino and self.backbone is not None:
            from segcli.vit.openvino_runtime import use_openvino

            local = next(c for c in (self.cache_root, default_cache_dir(), _home_cache_dir()) if not storage.is_remote(c))
            use_openvino(self.backbone, local / "openvino")
        if self.folder is not None:
            if not storage.is_dir(self.folder.root):
                raise UsageError(f"features folder not found: {self.folder.root}")
            # Any folder in the documented format: a model fitted on one can label another (dims are checked).
            self.identity = "features-folder"
            self.cache = None
        else:
            self.identity = self.backbone.fingerprint()
            # Precision is part of the key: bf16 features must never be mixed with fp32 ones.
            # So is torch.compile (its fused kernels round differently): same settings, same bytes.
            compiled = "-compiled" if getattr(self.backbone, "compiled", False) else ""
            compiled += "-openvino" if getattr(self.backbone, "runtime", "torch") == "openvino" else ""
            namespace = f"{self.identity}-{config.digest(*FEATURE_FIELDS)}-{self.backbone.precision}{compiled}-v{CACHE_FORMAT}"
            self.cache = FeatureCache(self.cache_root, namespace, warn=lambda message: self.warn(message))

    @property
    def has_backbone(self) -> bool:
        return self.backbone is not None

    def item_id(self, item: ImageItem) -> str:
        """Content identity of an image's inputs, the key of every per-image cache entry."""
        if item.key not in self._digests:
            with self.timings("hash"):
                try:
                    d = image_digest(item.path)
                    if self.folder is not None:
                        d = hashlib.sha256((d + content_digest(self.folder.path(item.key))).encode()).hexdigest()
                except OSError as exc:
                    raise BadImageError(f"{item.path}: cannot read ({exc.strerror or exc})") from None
            self._digests[item.key] = d
        return self._digests[item.key]

    def is_cached(self, item: ImageItem) -> bool:
        if self.folder is not None:
            return True
        if not self.feature_cache:
            return False
        try:
            return storage.is_file(self.cache.path(self.item_id(item)))
        except BadImageError:
            return False

    def features(self, items: Iterable[ImageItem]) -> Iterator[tuple[ImageItem, ImageFeatures | BadImageError]]:
        """Features of each item in input order, or the error that makes it unusable.

        The schedule (docs/performance.md, "Keeping an accelerator busy"): cached features are read in this thread; images
        that need the backbone are decoded and preprocessed by ``decode_workers`` background threads, ahead of
        the device, while the device stage runs; the decoded inputs are bucketed by backbone input shape over
        a lookahead window of ``lookahead`` images (bounded memory whatever the dataset size), and a bucket
        goes to the device as soon as it holds ``batch_size`` images, so batches are full wherever the window
        holds enough images of one shape. A partial batch runs only when the window is full (or the input
        ended), nothing in it is still decoding, and the oldest image is still waiting in its bucket. Each result is written to the cache at
        once (by the workers), so an interrupted extraction resumes where it stopped. Results are yielded in
        input order and do not depend on the bucketing: a feature row never depends on the other images of
        its batch (tested byte for byte for any ``batch_size`` and ``decode_workers``).
        """
        plan = _Schedule(self)
        try:
            yield from plan.run(items)
        finally:
            plan.close()

    def _admit(self, item: ImageItem) -> "_Slot":
        """An item entering the window: resolved at once (features file, cache hit, unreadable), else to decode."""
        slot = _Slot(item)
        try:
            if self.folder is not None:
                with self.timings("feature io"):
                    slot.result = self._fix_dims(self.folder.load(item.key, item.path, self.dims))
                return slot
            digest = self.item_id(item)
            if not self.feature_cache:
                return slot
            with self.timings("feature io"):
                cached = self.cache.load(digest, self.dims)
            if cached is not None:
                slot.result = self._fix_dims(cached)
        except BadImageError as exc:
            slot.result = exc
        return slot

    def _prepare(self, item: ImageItem):
        """Decode and preprocess one image for the backbone: the host work done ahead of the device.

        Returns (the normalised (3, H', W') float32 tensor, the decoded image), or the BadImageError that makes
        the image unusable. The decoded image goes on with the features, so the region step needs no second
        decode.
        Runs in a decode worker (or inline with ``decode_workers=0``); timings are per-stage CPU seconds summed
        over the workers.
        """
        try:
            with self.timings("load images"):
                img = load_image(item.path, self.config.work_max_side)
            with self.timings("preprocess"):
                return self.backbone.prepare(img.rgb, self.config.short_side, self.config.max_side), img
        except BadImageError as exc:
            return exc

    def _device_batch(self, slots: list["_Slot"]) -> list[ImageFeatures]:
        """One backbone forward over a batch of same-shape inputs (the device stage), results on the host."""
        import torch

        batch = torch.stack([s.tensor for s in slots])
        for s in slots:
            s.tensor = None  # the batch holds the data now; free each image's copy as early as possible
        with self.timings("forward"):
            try:
                fb = self.backbone.extract(self.backbone.to_device(batch), kind=self.config.feature_kind,
                                           proposal_heads=self.config.proposal_heads)
            except Exception as exc:
                if not getattr(self.backbone, "compiled", False) or isinstance(exc, (KeyboardInterrupt, SegcliError)):
                    raise
                from segcli.vit.checkpoints.base import first_line

                raise ModelError(f"--compile: torch.compile failed ({first_line(exc, 160)}); run without --compile") from None
        return [ImageFeatures(
            feats=fb.feats[i].numpy().astype(np.float16),
            cls=fb.cls[i].numpy().astype(np.float32),
            attn=fb.attn[i].numpy().astype(np.float16),
            proposal=None if fb.proposal is None else fb.proposal[i].numpy().astype(bool),
        ) for i in range(len(slots))]

    def _save(self, item: ImageItem, f: ImageFeatures) -> None:
        if not self.feature_cache:
            return
        with self.timings("feature io"):
            self.cache.save(self.item_id(item), f)

    def check_proposals(self, items: list[ImageItem]) -> None:
        """Fail before any work when ``--prior maskdistill``/``vote`` cannot get a proposal for these images.

        A backbone without a CLS token has no proposal; a ``--features`` folder must hold a ``proposal``
        array in every file (missing files are left to the per-image checks, which skip them).
        """
        if self.folder is None:
            if getattr(self.backbone.model, "cls_token", None) is None:
                raise UsageError(f"--prior {self.config.prior} needs a CLS token, which {self.backbone.name} has not; "
                                 "use --prior levels")
            return
        # One rule for unusable feature files, whatever the prior: a file that is damaged, or lacks what this
        # run needs, is reported and skipped when it is loaded (exit 4). Only a folder where no readable file has
        # a proposal is refused here, before any work: it was made without them, and every image would be skipped.
        found = [(p, has_proposal(p)) for p in (self.folder.path(i.key) for i in items) if storage.is_file(p)]
        readable = [(p, x) for p, x in found if x is not None]
        if readable and not any(x for _, x in readable):
            n = len(readable)
            raise InputError(f"--prior {self.config.prior} needs a 'proposal' array in the --features files, but {n} of "
                             f"{n} readable files lack it (e.g. {readable[0][0]}); add it (docs/usage.md: Bring your own "
                             "features) or use --prior levels")

    def _fix_dims(self, f: ImageFeatures) -> ImageFeatures:
        """Remember the feature and CLS dimensions of the first features of the run."""
        if not self.dims:
            self.dims = {k: v for k, v in f.dims.items() if k in ("D", "C")}
        return f

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        with self.timings("crop forward"):
            return self.backbone.embed_crops(crops, size=self.config.crop_size, batch_size=max(self.batch_size, 16))


# --------------------------------------------------------------------------------------------- schedule


def default_decode_workers() -> int:
    """Decode threads by default: the cores this process may use minus one (for the device stage), 1 to 8.

    Threads, not processes: PIL's decoders and resampling and torch's element-wise ops release the GIL, the
    prepared tensors need no pickling, and only the calling thread runs the backbone, so the torch thread
    count of the backbone is the same whatever the number of workers (it changes fp16 feature values).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1))


def default_lookahead(batch_size: int) -> int:
    """Images the scheduler holds at once (decoding, waiting in a shape bucket, or finished but not yet
    yielded): 16 batches, at least 64. At the default 448-pixel short side a prepared image is 2.5-7 MB, so
    the default window holds at most ~0.5 GB at --batch-size 8."""
    return max(64, 16 * max(1, int(batch_size)))


class _Slot:
    """One image in the scheduler's window: decoding (``pending``), waiting in a bucket (``tensor``), or done."""

    __slots__ = ("item", "result", "pending", "tensor", "image")

    def __init__(self, item: ImageItem) -> None:
        self.item = item
        self.result: ImageFeatures | BadImageError | None = None
        self.pending: Future | None = None
        self.tensor = None
        self.image = None  # the decoded image, handed on with the features

    @property
    def done(self) -> bool:
        return self.result is not None


class _Schedule:
    """One pass of :meth:`FeatureSource.features`: a bounded window of images in input order, decode workers
    ahead of it, shape buckets feeding the device stage (the calling thread), and cache writes behind it."""

    def __init__(self, source: FeatureSource) -> None:
        self.src = source
        threads = source.decode_workers if source.folder is None else 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="segcli-decode") if threads > 0 else None
        self.window: deque[_Slot] = deque()
        self.decoding: deque[_Slot] = deque()  # slots whose decode was submitted, in admission order
        self.buckets: dict[tuple, list[_Slot]] = {}
        self.writes: deque[Future] = deque()
        self.batch_sizes: list[int] = []  # the size of every device batch, for the benchmark's statistics

    def run(self, items: Iterable[ImageItem]) -> Iterator[tuple[ImageItem, ImageFeatures | BadImageError]]:
        src, window = self.src, self.window
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(window) < src.lookahead:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                slot = src._admit(item)
                window.append(slot)
                if not slot.done:
                    if self.pool is None:
                        self._bucket(slot, src._prepare(item))
                    else:
                        slot.pending = self.pool.submit(src._prepare, item)
                        self.decoding.append(slot)
            self._collect(block=False)
            while window and window[0].done:
                slot = window.popleft()
                yield slot.item, slot.result
            if not window:
                if exhausted:
                    break
                continue
            if len(window) >= src.lookahead or exhausted:
                # The oldest image holds the window up. Wait for the next decode (it may fill the oldest image's
                # bucket, or another one); only when nothing in the window is decoding any more does the oldest
                # image's bucket run, full or not.
                front = window[0]
                if self.decoding:
                    self._collect(block=True)
                elif not front.done and front.tensor is not None:
                    self._run(tuple(front.tensor.shape))
        while self.writes:  # every cache entry is on disk (or its error raised) before the pass ends
            self.writes.popleft().result()

    def _collect(self, block: bool) -> None:
        """Bucket finished decodes in admission order (so batches do not depend on thread timing); with
        ``block``, wait for the oldest one first."""
        while self.decoding:
            slot = self.decoding[0]
            if not block and not slot.pending.done():
                break
            prepared = slot.pending.result()
            self.decoding.popleft()
            slot.pending = None
            self._bucket(slot, prepared)
            block = False
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()  # a failed cache write fails the run here, as it would inline

    def _bucket(self, slot: _Slot, prepared) -> None:
        if isinstance(prepared, BadImageError):
            slot.result = prepared
            return
        slot.tensor, slot.image = prepared
        shape = tuple(slot.tensor.shape)
        group = self.buckets.setdefault(shape, [])
        group.append(slot)
        if len(group) >= self.src.batch_size:
            self._run(shape)

    def _run(self, shape: tuple) -> None:
        """The device stage: one forward over the bucket of this input shape, then its cache writes."""
        group = self.buckets.pop(shape)
        self.batch_sizes.append(len(group))
        for slot, f in zip(group, self.src._device_batch(group)):
            slot.result = self.src._fix_dims(f)
            f.image, slot.image = slot.image, None
            if self.pool is None:
                self.src._save(slot.item, f)
            else:
                self.writes.append(self.pool.submit(self.src._save, slot.item, f))

    def close(self) -> None:
        """Stop the workers: queued decodes and writes are dropped (an interrupted run resumes from the cache),
        running ones finish (one image each)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.src.last_batch_sizes = list(self.batch_sizes)


def _check_proposal_heads(config: SegmentConfig, backbone) -> None:  # noqa: ANN001
    """--proposal-heads above the backbone's head count used to mean "all heads" silently: refuse it (exit 2).
    The default (5, MaskDistill's ViT-S/16 setting) is exempt: on a smaller ViT it takes every head."""
    blocks = getattr(getattr(backbone, "model", None), "blocks", None)
    heads = getattr(getattr(blocks[-1], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
    default = SegmentConfig.__dataclass_fields__["proposal_heads"].default
    if isinstance(heads, int) and config.proposal_heads > heads and config.proposal_heads != default:
        raise UsageError(f"--proposal-heads {config.proposal_heads}: the backbone {config.backbone} has {heads} "
                         f"attention heads; use 1..{heads}, or 0 for all of them")
