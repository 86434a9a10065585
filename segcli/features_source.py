"""Where a run gets each image's features: the backbone through the on-disk cache, or a folder of files
computed elsewhere (``--features DIR``). Both yield the same :class:`ImageFeatures`, so everything after
this stage is identical whichever source is used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from segcli.cache import CACHE_FORMAT, FeatureCache, FeatureFolder, ImageFeatures, has_proposal
from segcli.config import FEATURE_FIELDS, SegmentConfig
from segcli.errors import BadImageError, InputError, UsageError
from segcli.images import ImageItem, content_digest, load_image
from segcli.report import Timings


def default_cache_dir() -> Path:
    """$SEGCLI_CACHE, else $XDG_CACHE_HOME/segcli, else ~/.cache/segcli."""
    if os.environ.get("SEGCLI_CACHE"):
        return Path(os.environ["SEGCLI_CACHE"])
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
        cache_dir: str | Path | None = None,
        batch_size: int = 8,
        timings: Timings | None = None,
        backbone=None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        # The sizes every image's features must share (feature dim D, CLS dim C): fixed by the first features
        # the run reads or computes; a later file that differs is reported and skipped (a cache entry: redone).
        self.dims: dict[str, int] = {}
        self.warn = warn or (lambda message: None)
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = max(1, int(batch_size))
        self.timings = timings or Timings()
        self._digests: dict[str, str] = {}
        self.folder = FeatureFolder(Path(features_dir)) if features_dir else None
        self.backbone = backbone
        if self.folder is None and self.backbone is None:
            from segcli.backbone import load_backbone

            with self.timings("load model"):
                self.backbone = load_backbone(config.backbone, weights=weights, device=device, precision=precision)
        if self.folder is not None:
            if not self.folder.root.is_dir():
                raise UsageError(f"features folder not found: {self.folder.root}")
            # Any folder in the documented format: a model fitted on one can label another (dims are checked).
            self.identity = "features-folder"
            self.cache = None
        else:
            self.identity = self.backbone.fingerprint()
            # Precision is part of the key: bf16 features must never be mixed with fp32 ones.
            namespace = f"{self.identity}-{config.digest(*FEATURE_FIELDS)}-{self.backbone.precision}-v{CACHE_FORMAT}"
            self.cache = FeatureCache(self.cache_root, namespace, warn=lambda message: self.warn(message))

    @property
    def has_backbone(self) -> bool:
        return self.backbone is not None

    def item_id(self, item: ImageItem) -> str:
        """Content identity of an image's inputs, the key of every per-image cache entry."""
        if item.key not in self._digests:
            with self.timings("hash"):
                try:
                    d = content_digest(item.path)
                    if self.folder is not None:
                        d = hashlib.sha256((d + content_digest(self.folder.path(item.key))).encode()).hexdigest()
                except OSError as exc:
                    raise BadImageError(f"{item.path}: cannot read ({exc.strerror or exc})") from None
            self._digests[item.key] = d
        return self._digests[item.key]

    def is_cached(self, item: ImageItem) -> bool:
        if self.folder is not None:
            return True
        try:
            return self.cache.path(self.item_id(item)).is_file()
        except BadImageError:
            return False

    def features(self, items: Iterable[ImageItem]) -> Iterator[tuple[ImageItem, ImageFeatures | BadImageError]]:
        """Features of each item in order, or the error that makes it unusable.

        Uncached images are run through the backbone in batches of equal input size (a GPU needs batches;
        VOC-like folders have a handful of distinct sizes), and each result is written to the cache at
        once, so an interrupted extraction resumes where it stopped.
        """
        chunk: list[ImageItem] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= self.batch_size:
                yield from self._chunk(chunk)
                chunk = []
        if chunk:
            yield from self._chunk(chunk)

    def _chunk(self, items: list[ImageItem]) -> list[tuple[ImageItem, ImageFeatures | BadImageError]]:
        results: dict[str, ImageFeatures | BadImageError] = {}
        todo: list[tuple[ImageItem, object]] = []
        for item in items:
            try:
                if self.folder is not None:
                    with self.timings("feature io"):
                        results[item.key] = self._fix_dims(self.folder.load(item.key, item.path, self.dims))
                    continue
                digest = self.item_id(item)
                with self.timings("feature io"):
                    cached = self.cache.load(digest, self.dims)
                if cached is not None:
                    results[item.key] = self._fix_dims(cached)
                    continue
                with self.timings("load images"):
                    rgb = load_image(item.path, self.config.work_max_side).rgb
                with self.timings("preprocess"):
                    tensor = self.backbone.prepare(rgb, self.config.short_side, self.config.max_side)
                todo.append((item, tensor))
            except BadImageError as exc:
                results[item.key] = exc
        groups: dict[tuple, list[tuple[ImageItem, object]]] = {}
        for item, tensor in todo:
            groups.setdefault(tuple(tensor.shape), []).append((item, tensor))
        for group in groups.values():
            import torch

            with self.timings("forward"):
                fb = self.backbone.extract(torch.stack([t for _, t in group]), kind=self.config.feature_kind,
                                           proposal_heads=self.config.proposal_heads)
            for i, (item, _) in enumerate(group):
                f = ImageFeatures(
                    feats=fb.feats[i].numpy().astype(np.float16),
                    cls=fb.cls[i].numpy().astype(np.float32),
                    attn=fb.attn[i].numpy().astype(np.float16),
                    proposal=None if fb.proposal is None else fb.proposal[i].numpy().astype(bool),
                )
                with self.timings("feature io"):
                    self.cache.save(self.item_id(item), f)
                results[item.key] = self._fix_dims(f)
        return [(item, results[item.key]) for item in items]

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
        lacking = [p for p in (self.folder.path(i.key) for i in items) if p.is_file() and not has_proposal(p)]
        if lacking:
            raise InputError(f"--prior {self.config.prior} needs a 'proposal' array in every --features file, but "
                             f"{len(lacking)} of {len(items)} lack it (e.g. {lacking[0]}); add it (README: Bring your "
                             "own features) or use --prior levels")

    def _fix_dims(self, f: ImageFeatures) -> ImageFeatures:
        """Remember the feature and CLS dimensions of the first features of the run."""
        if not self.dims:
            self.dims = {k: v for k, v in f.dims.items() if k in ("D", "C")}
        return f

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        with self.timings("crop forward"):
            return self.backbone.embed_crops(crops, size=self.config.crop_size, batch_size=max(self.batch_size, 16))
