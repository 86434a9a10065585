"""The method end to end: fit (dataset-level model) and predict (label maps), scikit-learn style.

Data flows one way: images -> features (cached) -> three clustering levels -> fused foreground ->
refinement (dense CRF or torch mean-field) -> regions -> class ids -> PNG files. Every pass streams over the images and keeps only bounded
samples or small per-image results in memory; the feature cache and the per-image region cache on disk
are the checkpoints that make an interrupted run resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli.method import steps
from segcli.io import storage
from segcli.io.cache import CACHE_LAYOUT, EntryStore, ImageFeatures
from segcli.config import REGION_FIELDS, SegmentConfig
from segcli.engines.local import LocalEngine
from segcli.errors import BadImageError, InputError, ModelError, UsageError
from segcli.engines.feature_source import FeatureSource
from segcli.method.foreground import LevelModel, fit_level
from segcli.io.images import ImageItem
from segcli.method.kmeans import KMeans, cluster_embeddings
from segcli.method.model import SegModel
from segcli.report import Reporter
from segcli.timings import Timings
from segcli.method.steps import REGION_SPECS, resize_labels, upsample  # noqa: F401  (re-exported: long-standing names)
from segcli.method.stuff import fit_stuff

MANIFEST = ".segcli-run.json"
# A category with fewer sampled patches than this uses the dataset-level centroids instead of its own.
MIN_CATEGORY_SAMPLES = 50
# The region pass gathers the crops of consecutive images into one crop forward (full device batches even when
# each image has only a few regions) and flushes the group at whichever bound comes first: crops, images waiting
# (each holds its features and region map), or crop pixels. Fixed numbers, so the grouping depends only on the
# input order, never on --batch-size or worker counts.
CROP_GROUP_CROPS = 64
CROP_GROUP_IMAGES = 16
CROP_GROUP_BYTES = 256 << 20

@dataclass
class RunSummary:
    written: int = 0
    reused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # image key -> reason
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """Fit the three-level model on a set of images, then label any images with it.

    >>> seg = Segmenter(SegmentConfig(k=21)).fit(items)      # doctest: +SKIP
    >>> seg.predict(items, "masks/")                          # doctest: +SKIP
    """

    def __init__(self, config: SegmentConfig | None = None, *, model: SegModel | None = None,
                 source: FeatureSource | None = None, reporter: Reporter | None = None, engine: LocalEngine | None = None,
                 workers: int | None = 0, device_path: bool | None = None, **source_kwargs) -> None:
        if model is not None:
            config = model.config
        self.config = config or SegmentConfig()
        self.reporter = reporter or Reporter()
        self.timings = source.timings if source is not None else Timings()
        self.source = source or FeatureSource(self.config, timings=self.timings, warn=self.reporter.warn, **source_kwargs)
        if self.config.assign == "cls" and not self.source.has_backbone:
            raise UsageError("--assign cls embeds region crops with the backbone; with --features use --assign pooled or parts")
        if self.config.assign == "probe" and model is None:
            probe = getattr(self.source.backbone, "probe", None)
            if probe is None or self.config.feature_kind != "code":
                raise UsageError("--assign probe labels patches with STEGO's cluster probe: it needs a STEGO checkpoint "
                                 "(--weights) and --feature code")
            from segcli.io.outputs import MAX_LABEL_ID

            if probe.shape[0] > MAX_LABEL_ID:  # its labels are 1..P: they must fit a label PNG
                raise ModelError(f"STEGO's cluster probe has {probe.shape[0]} clusters, but a label PNG holds class ids "
                                 f"up to {MAX_LABEL_ID}: use --assign parts, pooled or cls with this checkpoint")
        bb = self.source.backbone
        if bb is not None and getattr(bb, "weights_source", ""):
            self.reporter.note(f"backbone {bb.name} ({bb.system}) with weights from {bb.weights_source}")
        # Where the per-image host steps run (segcli.engines); the device stages stay with the feature source.
        # workers > 0: a pool of that many processes (--workers; 0 = this process), same results either way.
        # device_path: the region pass batched on the device (None: when the backbone runs on CUDA).
        self.engine = engine or self._default_engine(self._default_workers() if workers is None else workers, device_path)
        self.skipped: dict[str, str] = {}
        self.model_: SegModel | None = None
        if model is not None:
            self._check_model(model)
            self.model_ = model

    # ------------------------------------------------------------------ helpers
    def _default_workers(self) -> int:
        """``workers=None``: the available cores minus one, except 0 when the backbone runs on the CPU. There the
        forward already uses every core, and the pool's processes would take cores from it (measured: 1.13x the
        in-process run's time with one worker on 2 cores); the pool pays off when a GPU runs the forward or with
        ``--features``, where the host steps are all the work."""
        from segcli.engines.pool import default_workers

        bb = self.source.backbone
        if bb is not None and getattr(getattr(bb, "device", None), "type", "cpu") == "cpu":
            return 0
        return default_workers()

    def _default_engine(self, workers: int = 0, device_path: bool | None = None):
        """The local engine (``workers`` processes for the host steps); with ``device_path`` (default: when the
        backbone runs on CUDA) the region pass batched on the backbone's device around it (on the CPU when
        there is no GPU: the same results, no speed-up)."""
        inner = LocalEngine(self.timings, workers=workers)
        if device_path is None:
            device_path = self._refine_device() != "cpu"
        if not device_path:
            return inner
        from segcli.engines.device import DeviceEngine

        if self.source.backbone is None:  # --features: no device, no crop forward
            return DeviceEngine("cpu", self.source.batch_size, inner, None, self.timings)
        return DeviceEngine.for_backbone(self.source.backbone, self.config, self.source.batch_size, inner, self.timings,
                                         device=self._refine_device())

    def _check_model(self, model: SegModel) -> None:
        if model.weights_id != self.source.identity:
            raise ModelError(
                f"model was fitted on features from {model.weights_id} ({model.config.backbone}) but this run uses "
                f"{self.source.identity}; use the same backbone and weights (or --features folder) as the fit"
            )

    def _skip(self, item: ImageItem, exc: BadImageError) -> None:
        if item.key not in self.skipped:
            self.skipped[item.key] = str(exc)
            self.reporter.skip(item.key, str(exc))

    def _features(self, items: list[ImageItem], description: str):
        """(item, features) for every usable item, reporting and skipping the rest."""
        with self.reporter.progress(description, len(items)) as advance:
            for item, f in self.source.features(i for i in items if i.key not in self.skipped):
                advance(1)
                if isinstance(f, BadImageError):
                    self._skip(item, f)
                    continue
                yield item, f

    # ------------------------------------------------------------------ extraction only (sharding)
    def extract(self, items: list[ImageItem]) -> RunSummary:
        """Fill the feature cache for these items (the resumable, parallelisable stage)."""
        t0 = time.perf_counter()
        n = sum(1 for _ in self._features(items, "features"))
        return RunSummary(written=n, skipped=dict(self.skipped), seconds=time.perf_counter() - t0, timings=self.timings.as_dict())

    # ------------------------------------------------------------------ fit
    def _check_prior(self, items: list[ImageItem]) -> None:
        """--prior maskdistill/vote: make sure every image can have a proposal before any work is done."""
        if self.config.prior != "levels":
            self.source.check_proposals(items)

    def fit(self, items: list[ImageItem]) -> "Segmenter":
        cfg = self.config
        self._check_prior(items)
        used, samples = self._fit_samples(items)
        s_feats = [s["feats"] for s in samples]
        s_attn = [s["attn"] for s in samples]
        s_border = [s["border"] for s in samples]
        s_img = [np.full(len(s["feats"]), j, dtype=np.int64) for j, s in enumerate(samples)]
        cls_tokens = [s["cls"] for s in samples]
        del samples
        if not used:
            raise InputError(f"no usable images: all {len(items)} inputs were skipped")
        with self.timings("clustering"):
            feats = np.concatenate(s_feats).astype(np.float32)
            cls = np.stack(cls_tokens).astype(np.float32)
            if cfg.prior == "maskdistill":
                # The proposal alone is the foreground: the three levels are not fitted (stored empty).
                dataset, cat_centroids, levels = _no_levels(feats.shape[1], cls.shape[1])
            else:
                dataset, cat_centroids, levels = self._fit_levels(feats, s_attn, s_border, s_img, cls, len(used))
        del feats, s_feats
        model = SegModel(
            config=cfg, weights_id=self.source.identity, feature_dim=int(dataset.centroids.shape[1]),
            dataset=dataset, category_centroids=cat_centroids, categories=levels,
            class_centroids=np.zeros((0, 0), np.float32),
        )
        self.model_ = model
        try:
            if cfg.n_stuff:
                self._fit_stuff(used)
            if cfg.assign == "parts":
                self._fit_parts(used)
            elif cfg.assign == "probe":
                self._fit_probe()
            else:
                self._fit_classes(used)
        finally:
            self.engine.close()  # its workers hold the model as it was during the fit
        return self

    def _fit_samples(self, items: list[ImageItem]) -> tuple[list[ImageItem], list[dict[str, np.ndarray]]]:
        """The usable items and, in their order, each one's share of the level fits' sample
        (:func:`segcli.method.steps.fit_sample`, seeded by the image's index in ``items``)."""
        quota = steps.fit_quota(self.config.max_samples, len(items))
        index = {item.key: i for i, item in enumerate(items)}
        used, samples = [], []
        for item, f in self._features(items, "features"):
            samples.append(steps.fit_sample(f, quota, self.config.seed, index[item.key]))
            used.append(item)
        return used, samples

    def _fit_levels(self, feats: np.ndarray, s_attn: list, s_border: list, s_img: list, cls: np.ndarray,
                    n_images: int) -> tuple[LevelModel, np.ndarray, list[LevelModel]]:
        """The dataset level, the CLS-token categories and one level per category, from sampled patches."""
        cfg = self.config
        attn, border, img = np.concatenate(s_attn), np.concatenate(s_border), np.concatenate(s_img)
        dataset = fit_level(feats, attn, border, cfg.level_clusters("dataset"), cfg.seed, cfg.max_samples)
        cls /= np.maximum(np.linalg.norm(cls, axis=1, keepdims=True), 1e-12)
        n_cat = cfg.category_count(n_images)
        cat_km = KMeans(n_cat, seed=cfg.seed, max_samples=cfg.max_samples).fit(cls)
        cat_of_image = cat_km.predict(cls)
        levels = []
        for c in range(n_cat):
            sel = np.isin(img, np.flatnonzero(cat_of_image == c))
            if sel.sum() >= max(MIN_CATEGORY_SAMPLES, 10 * cfg.level_clusters("category")):
                levels.append(fit_level(feats[sel], attn[sel], border[sel], cfg.level_clusters("category"), cfg.seed + 1 + c, cfg.max_samples))
            else:
                levels.append(_pad_level(dataset, cfg.level_clusters("category")))
        return dataset, cat_km.cluster_centers_.astype(np.float32), levels

    def _sample_patches(self, items: list[ImageItem], description: str, foreground: bool, stream: int) -> list[np.ndarray]:
        """A bounded, seeded sample of the foreground (or background) patch features of every image: at most
        max_samples / #images per image, drawn with the random stream ``stream`` (one per fit) of the image's
        index in ``items`` (:func:`segcli.method.steps.patch_sample`), in the items' order."""
        cfg = self.config
        quota = steps.fit_quota(cfg.max_samples, len(items))
        index = {item.key: i for i, item in enumerate(items)}
        sample = []
        for item, f, r in self._results(items, description):
            s = steps.patch_sample(f, r["fg_grid"], foreground, quota, cfg.seed, stream, index[item.key])
            if len(s):
                sample.append(s)
        return sample

    def _fit_stuff(self, items: list[ImageItem]) -> None:
        """Cluster a bounded sample of the dataset's background patches into the N stuff classes."""
        cfg = self.config
        sample = self._sample_patches(items, "stuff", foreground=False, stream=3)
        if not sample:
            self.reporter.note("no background patches were found: no stuff classes, every mask is objects only")
            self.model_.stuff_centroids = np.zeros((0, self.model_.feature_dim), np.float32)
            return
        with self.timings("clustering"):
            self.model_.stuff_centroids = fit_stuff(np.concatenate(sample), cfg.n_stuff, cfg.seed, cfg.max_samples)

    def _fit_classes(self, items: list[ImageItem]) -> None:
        """Cluster the embeddings of every region of the dataset into the thing classes (k - 1, or k - N with stuff)."""
        cfg = self.config
        # Images without regions contribute nothing (their (0, 0) arrays cannot be stacked with the others).
        # In the items' order, whichever bundles came from the cache: the clustering must not depend on which
        # entries had to be recomputed (a damaged cache entry must give the masks of a clean run).
        found = self._region_embeddings(items)
        embs = [found[item.key] for item in items if item.key in found]
        with self.timings("clustering"):
            X = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
            n = min(cfg.n_things, X.shape[0])
            if n == 0:
                self.reporter.note("no foreground regions were found: every mask will be background")
                self.model_.class_centroids = np.zeros((0, 0), np.float32)
            else:
                if n < cfg.n_things:
                    self.reporter.note(f"only {X.shape[0]} regions in the dataset: using {n} classes instead of {cfg.n_things}")
                self.model_.class_centroids = cluster_embeddings(X, n, method=cfg.class_method, seed=cfg.seed)

    def _region_embeddings(self, items: list[ImageItem]) -> dict[str, np.ndarray]:
        """The region embeddings of every image that has regions, by image key."""
        return {item.key: r["emb"] for item, _, r in self._results(items, "regions", need_features=False) if len(r["emb"])}

    def _fit_parts(self, items: list[ImageItem]) -> None:
        """Over-cluster foreground patches into parts, then merge parts by community detection."""
        from segcli.method.parts import merge_parts

        cfg = self.config
        sample = self._sample_patches(items, "regions", foreground=True, stream=2)
        if not sample:
            self.reporter.note("no foreground regions were found: every mask will be background")
            self.model_.part_centroids = np.zeros((0, self.model_.feature_dim), np.float32)
            self.model_.part_classes = np.zeros((0,), np.int64)
            return
        with self.timings("clustering"):
            X = np.concatenate(sample).astype(np.float32)
            n_parts = min(cfg.n_parts, len(X))
            # One initialisation and few iterations: parts are an over-segmentation, merged again below.
            centroids = KMeans(n_parts, seed=cfg.seed, max_samples=cfg.max_samples, n_init=1, max_iter=25).fit(X).cluster_centers_
        adjacency, sizes = self._part_graph(items, centroids)
        with self.timings("clustering"):
            communities = merge_parts(adjacency, cfg.n_things, seed=cfg.seed, part_sizes=sizes, centroids=centroids)
        self.model_.part_centroids = centroids.astype(np.float32)
        self.model_.part_classes = communities.astype(np.int64) + cfg.thing_offset

    def _part_graph(self, items: list[ImageItem], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The dataset's part graph: adjacency counts between parts and patches per part, summed over images."""
        adjacency = np.zeros((len(centroids), len(centroids)), dtype=np.int64)
        sizes = np.zeros(len(centroids), dtype=np.int64)
        for item, f, r in self._results(items, "part graph"):
            with self.timings("clustering"):
                a, n = steps.part_graph(f, r["fg_grid"], centroids)
                adjacency += a
                sizes += n
        return adjacency, sizes

    def _fit_probe(self) -> None:
        """STEGO's own cluster probe as the class model: each foreground patch takes the class of its nearest
        (cosine) probe centroid in code space; classes are 1..K for the probe's K centroids."""
        import torch

        probe = torch.nn.functional.normalize(self.source.backbone.probe.float(), dim=1).cpu().numpy()
        if probe.shape[0] + 1 != self.config.k:
            self.reporter.note(f"STEGO's cluster probe has {probe.shape[0]} clusters: labels are 1..{probe.shape[0]} "
                               f"(--k {self.config.k} only sets the default number of image categories)")
        self.model_.part_centroids = probe.astype(np.float32)
        self.model_.part_classes = np.arange(1, probe.shape[0] + 1, dtype=np.int64)

    # ------------------------------------------------------------------ per-image regions
    def _region_key(self) -> str:
        m = self.model_
        h = hashlib.sha256()
        for a in (m.dataset.centroids, m.dataset.foreground, m.category_centroids):
            h.update(np.ascontiguousarray(a).tobytes())
        for lv in m.categories:
            h.update(np.ascontiguousarray(lv.centroids).tobytes())
            h.update(np.ascontiguousarray(lv.foreground).tobytes())
        fields = REGION_FIELDS + ("assign", "crop_size", "crop_margin")
        h.update(self.config.digest(*fields).encode())
        h.update(CACHE_LAYOUT.encode())
        if self.config.n_stuff:  # stuff changes the image level's k (keys without stuff stay as they were)
            h.update(f"image clusters {self.config.level_clusters('image')}".encode())
        h.update(self.source.identity.encode())
        return h.hexdigest()[:20]

    def _results(self, items: list[ImageItem], description: str, need_features: bool = True):
        """(item, features, region bundle) per usable item; bundles are cached on disk.

        With ``need_features=False`` an item whose bundle is already cached comes with features None, so
        passes that only need regions and embeddings do not read every feature file again.
        """
        store = EntryStore(self.source.cache_root, f"regions/{self._region_key()}", compressed=True,
                           warn=self.reporter.warn)

        def load_bundle(item: ImageItem, f: ImageFeatures | None) -> dict[str, np.ndarray] | None:
            dims = {"h": f.grid[0], "w": f.grid[1]} if f is not None else None
            with self.timings("region io"):
                return store.load(self.source.item_id(item), REGION_SPECS, dims, check=steps.check_region_bundle)

        pending, absent = [], set()
        for item in items:
            if item.key in self.skipped:
                continue
            if need_features:
                pending.append(item)
                continue
            try:
                bundle = load_bundle(item, None)
            except BadImageError as exc:
                self._skip(item, exc)
                continue
            if bundle is None:
                pending.append(item)
                absent.add(item.key)  # read once: a damaged entry is reported once, then recomputed
            else:
                yield item, None, bundle
        # Images wait in a bounded group until their crops join one crop forward; then every bundle of the group
        # is completed, saved and yielded in input order (cached bundles wait their turn too).
        group: list[tuple[ImageItem, ImageFeatures, dict[str, np.ndarray], list[np.ndarray] | None, bool]] = []
        crops_held = bytes_held = 0

        def flush():
            crops = [c for *_, cs, _ in group if cs is not None for c in cs]  # arrays, or device tensors
            emb = self.source.embed_crops(crops) if crops else None
            start = 0
            for item, f, bundle, cs, fresh in group:
                if cs is not None and len(cs):
                    bundle = steps.with_embeddings(bundle, emb[start:start + len(cs)])
                    start += len(cs)
                if fresh:
                    with self.timings("region io"):
                        store.save(self.source.item_id(item), bundle)
                yield item, f, bundle
            group.clear()

        def arrivals():
            """(item, features, cached bundle or None) as the features arrive."""
            for item, f in self._features(pending, description):
                yield item, f, None if item.key in absent else load_bundle(item, f)

        for (item, f, _), result in self.engine.imap(steps.regions_step, arrivals(), model=self.model_,
                                                     device=self._refine_device()):
            if isinstance(result, BadImageError):
                self._skip(item, result)
                continue
            bundle, crops, fresh = result
            group.append((item, f, bundle, crops, fresh))
            if crops is not None:
                crops_held += len(crops)
                bytes_held += sum(c.nbytes for c in crops)
            if crops_held >= CROP_GROUP_CROPS or len(group) >= CROP_GROUP_IMAGES or bytes_held >= CROP_GROUP_BYTES:
                yield from flush()
                crops_held = bytes_held = 0
        yield from flush()

    def _refine_device(self):
        """The backbone's device for the torch refiner (CPU with --features, or on Apple MPS, which lacks its sparse ops)."""
        backbone = self.source.backbone
        device = getattr(backbone, "device", None) if backbone is not None else None
        return device if device is not None and getattr(device, "type", "cpu") == "cuda" else "cpu"

    def predict(self, items: list[ImageItem], out_dir: str | Path, overlay_dir: str | Path | None = None,
                resume: bool = True, legend=None) -> RunSummary:
        """Write one label PNG per image (and optionally an overlay, with ``legend``: a
        :class:`segcli.io.legend.Legend`); finished files are kept on rerun."""
        from segcli.io.outputs import is_complete_png, output_path, prepare_output_dir, remove_stale_temporaries

        if self.model_ is None:
            raise UsageError("predict() needs a fitted model: call fit() first or pass model=")
        self._check_prior(items)
        t0 = time.perf_counter()
        out = prepare_output_dir(out_dir)
        ov = prepare_output_dir(overlay_dir) if overlay_dir else None
        for folder in (out, ov):
            if folder is not None:
                remove_stale_temporaries(folder)
        done = self._resumable(out, resume)
        summary = RunSummary()
        todo = []
        for item in items:
            if item.key in self.skipped:
                continue
            target = output_path(out, item.key, ".png")
            if done and is_complete_png(target) and (ov is None or storage.is_file(output_path(ov, item.key, ".jpg"))):
                summary.reused += 1
            else:
                todo.append(item)
        summary.written = self._write_masks(todo, out, ov, legend)
        summary.skipped = {k: v for k, v in self.skipped.items()}
        summary.seconds = time.perf_counter() - t0
        summary.timings = self.timings.as_dict()
        return summary

    def _write_masks(self, todo: list[ImageItem], out: Path, ov: Path | None, legend=None) -> int:
        """Label and write these images (:func:`segcli.method.steps.mask_step`); the number written."""
        written = 0
        need = steps.needs_features(self.model_)
        results = self._results(todo, "masks", need_features=need)
        if not need:  # labels come from the bundle alone: do not hand each image's features to a worker
            results = ((item, None, bundle) for item, _, bundle in results)
        try:
            for (item, *_), result in self.engine.imap(steps.mask_step, results, model=self.model_, out=out, overlay=ov,
                                                       device=self._refine_device(), legend=legend):
                if isinstance(result, BadImageError):
                    self._skip(item, result)
                    continue
                written += 1
        finally:
            self.engine.close()
            # Worker processes stopped mid-write (Ctrl-C, an error) leave their temporaries: sweep those of
            # processes that are gone, so an interrupted run leaves only finished files.
            from segcli.io.outputs import remove_stale_temporaries

            for folder in (out, ov):
                if folder is not None:
                    remove_stale_temporaries(folder)
        return written

    def close(self) -> None:
        """Stop the engine's worker processes now (fit() and predict() stop them when they end)."""
        self.engine.close()

    def _resumable(self, out: Path, resume: bool) -> bool:
        """True when out/ holds results of this very model (so finished PNGs can be kept)."""
        from segcli.io.outputs import atomic_write

        stamp = {"model": self.model_.digest()}
        path = out / MANIFEST
        try:
            same = resume and json.loads(storage.read_bytes(path)) == stamp
        except (OSError, ValueError, InputError):
            same = False
        if not same:
            data = json.dumps(stamp).encode()
            atomic_write(path, lambda fh: fh.write(data))
        return same


def _no_levels(feature_dim: int, cls_dim: int) -> tuple[LevelModel, np.ndarray, list[LevelModel]]:
    """Empty level models for --prior maskdistill, where the proposal alone is the foreground."""
    return LevelModel(np.zeros((0, feature_dim), np.float32), np.zeros(0, bool)), np.zeros((0, cls_dim), np.float32), []


def _pad_level(level: LevelModel, k: int) -> LevelModel:
    """The dataset-level model shaped like a k-cluster category model (for sparse categories)."""
    c, fg = level.centroids, level.foreground
    if len(c) >= k:
        return LevelModel(c[:k].copy(), fg[:k].copy())
    reps = int(np.ceil(k / len(c)))
    return LevelModel(np.tile(c, (reps, 1))[:k].copy(), np.tile(fg, reps)[:k].copy())
