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

from segcli.cache import ImageFeatures, load_array_bundle, save_array_bundle
from segcli.config import REGION_FIELDS, SegmentConfig
from segcli.errors import BadImageError, InputError, ModelError, UsageError
from segcli.features_source import FeatureSource
from segcli.foreground import LevelModel, border_grid, fit_level, fuse, image_level_mask, normalised_attention
from segcli.images import ImageItem, load_image
from segcli.kmeans import KMeans, assign_nearest, cluster_embeddings
from segcli.model_file import SegModel
from segcli.regions import find_regions, pooled_embeddings, region_crops, regions_on_grid
from segcli.report import Reporter, Timings

MANIFEST = ".segcli-run.json"
# A category with fewer sampled patches than this uses the dataset-level centroids instead of its own.
MIN_CATEGORY_SAMPLES = 50


@dataclass
class RunSummary:
    written: int = 0
    reused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # image key -> reason
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) float map to size (H, W), pixel centres aligned."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to size (H, W)."""
    if labels.shape == tuple(size):
        return labels
    H, W = size
    h, w = labels.shape
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    return labels[np.ix_(ys, xs)]


class Segmenter:
    """Fit the three-level model on a set of images, then label any images with it.

    >>> seg = Segmenter(SegmentConfig(k=21)).fit(items)      # doctest: +SKIP
    >>> seg.predict(items, "masks/")                          # doctest: +SKIP
    """

    def __init__(self, config: SegmentConfig | None = None, *, model: SegModel | None = None,
                 source: FeatureSource | None = None, reporter: Reporter | None = None, **source_kwargs) -> None:
        if model is not None:
            config = model.config
        self.config = config or SegmentConfig()
        self.reporter = reporter or Reporter()
        self.timings = source.timings if source is not None else Timings()
        self.source = source or FeatureSource(self.config, timings=self.timings, **source_kwargs)
        if self.config.assign == "cls" and not self.source.has_backbone:
            raise UsageError("--assign cls embeds region crops with the backbone; with --features use --assign pooled or parts")
        self.skipped: dict[str, str] = {}
        self.model_: SegModel | None = None
        if model is not None:
            self._check_model(model)
            self.model_ = model

    # ------------------------------------------------------------------ helpers
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
    def fit(self, items: list[ImageItem]) -> "Segmenter":
        cfg = self.config
        quota = max(1, cfg.max_samples // max(1, len(items)))
        s_feats, s_attn, s_border, s_img, cls_tokens, used = [], [], [], [], [], []
        for item, f in self._features(items, "features"):
            h, w = f.grid
            flat = f.feats.reshape(h * w, -1)
            pick = _rng(cfg.seed, 1, len(used)).choice(h * w, size=min(quota, h * w), replace=False)
            s_feats.append(flat[pick])
            s_attn.append(normalised_attention(f.attn).ravel()[pick])
            s_border.append(border_grid(h, w).ravel()[pick])
            s_img.append(np.full(len(pick), len(used), dtype=np.int64))
            cls_tokens.append(f.cls)
            used.append(item)
        if not used:
            raise InputError(f"no usable images: all {len(items)} inputs were skipped")
        with self.timings("clustering"):
            feats = np.concatenate(s_feats).astype(np.float32)
            attn, border, img = np.concatenate(s_attn), np.concatenate(s_border), np.concatenate(s_img)
            dataset = fit_level(feats, attn, border, cfg.dataset_k, cfg.seed, cfg.max_samples)
            cls = np.stack(cls_tokens).astype(np.float32)
            cls /= np.maximum(np.linalg.norm(cls, axis=1, keepdims=True), 1e-12)
            n_cat = min(cfg.n_categories, len(used))
            cat_km = KMeans(n_cat, seed=cfg.seed, max_samples=cfg.max_samples).fit(cls)
            cat_of_image = cat_km.predict(cls)
            levels = []
            for c in range(n_cat):
                sel = np.isin(img, np.flatnonzero(cat_of_image == c))
                if sel.sum() >= max(MIN_CATEGORY_SAMPLES, 10 * cfg.category_k):
                    levels.append(fit_level(feats[sel], attn[sel], border[sel], cfg.category_k, cfg.seed + 1 + c, cfg.max_samples))
                else:
                    levels.append(_pad_level(dataset, cfg.category_k))
        del feats, attn, border, img, s_feats
        model = SegModel(
            config=cfg, weights_id=self.source.identity, feature_dim=int(dataset.centroids.shape[1]),
            dataset=dataset, category_centroids=cat_km.cluster_centers_.astype(np.float32), categories=levels,
            class_centroids=np.zeros((0, 0), np.float32),
        )
        self.model_ = model
        if cfg.assign == "parts":
            self._fit_parts(used)
        else:
            self._fit_classes(used)
        return self

    def _fit_classes(self, items: list[ImageItem]) -> None:
        """Cluster the embeddings of every region of the dataset into k - 1 classes."""
        cfg = self.config
        # Images without regions contribute nothing (their (0, 0) arrays cannot be stacked with the others).
        embs = [r["emb"] for _, _, r in self._results(items, "regions", need_features=False) if len(r["emb"])]
        with self.timings("clustering"):
            X = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
            n = min(cfg.k - 1, X.shape[0])
            if n == 0:
                self.reporter.note("no foreground regions were found: every mask will be background")
                self.model_.class_centroids = np.zeros((0, 0), np.float32)
            else:
                if n < cfg.k - 1:
                    self.reporter.note(f"only {X.shape[0]} regions in the dataset: using {n} classes instead of {cfg.k - 1}")
                self.model_.class_centroids = cluster_embeddings(X, n, method=cfg.class_method, seed=cfg.seed)

    def _fit_parts(self, items: list[ImageItem]) -> None:
        """Over-cluster foreground patches into parts, then merge parts by community detection."""
        from segcli.parts import merge_parts, part_adjacency

        cfg = self.config
        quota = max(1, cfg.max_samples // max(1, len(items)))
        sample = []
        for i, (item, f, r) in enumerate(self._results(items, "regions")):
            fg = r["fg_grid"].ravel()
            flat = f.feats.reshape(fg.size, -1)[fg]
            if len(flat):
                sample.append(flat[_rng(cfg.seed, 2, i).choice(len(flat), size=min(quota, len(flat)), replace=False)])
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
        adjacency = np.zeros((n_parts, n_parts), dtype=np.int64)
        sizes = np.zeros(n_parts, dtype=np.int64)
        for item, f, r in self._results(items, "part graph"):
            with self.timings("clustering"):
                grid = self._part_grid(f, r["fg_grid"], centroids)
                adjacency += part_adjacency(grid, n_parts)
                sizes += np.bincount(grid[grid >= 0], minlength=n_parts)
        with self.timings("clustering"):
            communities = merge_parts(adjacency, cfg.k - 1, seed=cfg.seed, part_sizes=sizes, centroids=centroids)
        self.model_.part_centroids = centroids.astype(np.float32)
        self.model_.part_classes = communities.astype(np.int64) + 1

    @staticmethod
    def _part_grid(f: ImageFeatures, fg_grid: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        h, w = f.grid
        grid = np.full(h * w, -1, dtype=np.int64)
        fg = fg_grid.ravel()
        if fg.any():
            grid[fg] = assign_nearest(f.feats.reshape(h * w, -1)[fg].astype(np.float32), centroids)
        return grid.reshape(h, w)

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
        h.update(self.source.identity.encode())
        return h.hexdigest()[:20]

    def _results(self, items: list[ImageItem], description: str, need_features: bool = True):
        """(item, features, region bundle) per usable item; bundles are cached on disk.

        With ``need_features=False`` an item whose bundle is already cached comes with features None, so
        passes that only need regions and embeddings do not read every feature file again.
        """
        root = self.source.cache_root / "regions" / self._region_key()

        def bundle_path(item: ImageItem) -> Path:
            digest = self.source.item_id(item)
            return root / digest[:2] / f"{digest}.npz"

        pending = []
        for item in items:
            if item.key in self.skipped:
                continue
            if need_features:
                pending.append(item)
                continue
            try:
                path = bundle_path(item)
            except BadImageError as exc:
                self._skip(item, exc)
                continue
            with self.timings("region io"):
                bundle = load_array_bundle(path)
            if bundle is None:
                pending.append(item)
            else:
                yield item, None, bundle
        for item, f in self._features(pending, description):
            path = bundle_path(item)
            with self.timings("region io"):
                bundle = load_array_bundle(path)
            if bundle is None:
                try:
                    bundle = self._compute_regions(item, f)
                except BadImageError as exc:
                    self._skip(item, exc)
                    continue
                with self.timings("region io"):
                    save_array_bundle(path, **bundle)
            yield item, f, bundle

    def _fg_masks(self, f: ImageFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Fused (hard, soft) patch-level foreground of one image from the three levels."""
        cfg, m = self.config, self.model_
        h, w = f.grid
        flat = f.feats.reshape(h * w, -1).astype(np.float32)
        if flat.shape[1] != m.feature_dim:
            raise ModelError(f"features have dimension {flat.shape[1]} but the model was fitted on {m.feature_dim}; "
                             "use the backbone/features the model was fitted with")
        m_d = m.dataset.mask(flat).reshape(h, w)
        cls = f.cls.astype(np.float32)[None]
        cls /= max(float(np.linalg.norm(cls)), 1e-12)
        cat = int(assign_nearest(cls, m.category_centroids)[0])
        m_c = m.categories[cat].mask(flat).reshape(h, w)
        m_i = image_level_mask(f.feats, f.attn, cfg.image_k, cfg.seed)
        return fuse([m_d, m_c, m_i], cfg.fusion)

    def _refine_device(self):
        """The backbone's device for the torch refiner (CPU with --features, or on Apple MPS, which lacks its sparse ops)."""
        backbone = self.source.backbone
        device = getattr(backbone, "device", None) if backbone is not None else None
        return device if device is not None and getattr(device, "type", "cpu") == "cuda" else "cpu"

    def _compute_regions(self, item: ImageItem, f: ImageFeatures) -> dict[str, np.ndarray]:
        cfg = self.config
        with self.timings("clustering"):
            _, soft = self._fg_masks(f)
        with self.timings("load images"):
            img = load_image(item.path, cfg.work_max_side)
        rgb = img.rgb
        with self.timings("crf"):
            prob = upsample(soft, rgb.shape[:2])
            from segcli.refine import refine_mask

            fg = refine_mask(rgb, prob, cfg.refine if cfg.crf else "none", cfg.crf_iterations, cfg.crf_max_side,
                             self._refine_device())
        with self.timings("regions"):
            regions, n = find_regions(fg, cfg.regions, cfg.min_region_frac, cfg.min_region_px)
            fg_grid = regions_on_grid(regions, f.grid) > 0
        if cfg.assign == "cls" and n:
            emb = self.source.embed_crops(region_crops(rgb, regions, n, cfg.crop_margin))
        elif cfg.assign == "pooled" and n:
            with self.timings("regions"):
                emb = pooled_embeddings(regions, n, f.feats)
        else:
            emb = np.zeros((n, 0), np.float32)
        return {
            "regions": regions.astype(np.uint16 if n < 65535 else np.int32),
            "n": np.array(n),
            "emb": np.asarray(emb, np.float32),
            "fg_grid": fg_grid,
            "original_size": np.array(img.original_size),
        }

    # ------------------------------------------------------------------ predict
    def labels(self, f: ImageFeatures | None, bundle: dict[str, np.ndarray]) -> np.ndarray:
        """Class-id map (at the working resolution) of one image from its regions (and features, for parts)."""
        m = self.model_
        regions = bundle["regions"].astype(np.int64)
        n = int(bundle["n"])
        if n == 0:
            return np.zeros(regions.shape, np.uint8)
        if self.config.assign == "parts":
            if len(m.part_centroids) == 0:
                return np.zeros(regions.shape, np.uint8)
            from scipy import ndimage

            grid = self._part_grid(f, bundle["fg_grid"], m.part_centroids)
            classes = np.where(grid >= 0, m.part_classes[np.maximum(grid, 0)], 0)
            if (classes > 0).any():
                # Foreground pixels whose nearest patch centre is background take the nearest foreground patch's class.
                idx = ndimage.distance_transform_edt(classes == 0, return_distances=False, return_indices=True)
                classes = classes[idx[0], idx[1]]
            up = resize_labels(classes, regions.shape)
            return np.where(regions > 0, up, 0).astype(np.uint8)
        if m.class_centroids.size == 0:
            return np.zeros(regions.shape, np.uint8)
        lut = np.zeros(n + 1, np.uint8)
        lut[1:] = assign_nearest(bundle["emb"].astype(np.float32), m.class_centroids) + 1
        return lut[regions]

    def predict(self, items: list[ImageItem], out_dir: str | Path, overlay_dir: str | Path | None = None,
                resume: bool = True) -> RunSummary:
        """Write one label PNG per image (and optionally an overlay); finished files are kept on rerun."""
        from segcli.outputs import (
            is_complete_png, output_path, prepare_output_dir, remove_stale_temporaries, save_label_png, save_overlay,
        )

        if self.model_ is None:
            raise UsageError("predict() needs a fitted model: call fit() first or pass model=")
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
            if done and is_complete_png(target) and (ov is None or (output_path(ov, item.key, ".jpg")).is_file()):
                summary.reused += 1
            else:
                todo.append(item)
        for item, f, bundle in self._results(todo, "masks", need_features=self.config.assign == "parts"):
            with self.timings("clustering"):
                labels = self.labels(f, bundle)
            size = tuple(int(v) for v in bundle["original_size"])
            with self.timings("write"):
                full = resize_labels(labels, size)
                save_label_png(output_path(out, item.key, ".png"), full)
                if ov is not None:
                    rgb = load_image(item.path, self.config.work_max_side).rgb
                    save_overlay(output_path(ov, item.key, ".jpg"), rgb, labels)
            summary.written += 1
        summary.skipped = {k: v for k, v in self.skipped.items()}
        summary.seconds = time.perf_counter() - t0
        summary.timings = self.timings.as_dict()
        return summary

    def _resumable(self, out: Path, resume: bool) -> bool:
        """True when out/ holds results of this very model (so finished PNGs can be kept)."""
        from segcli.outputs import atomic_write

        stamp = {"model": self.model_.digest()}
        path = out / MANIFEST
        try:
            same = resume and json.loads(path.read_text()) == stamp
        except (OSError, ValueError):
            same = False
        if not same:
            data = json.dumps(stamp).encode()
            atomic_write(path, lambda fh: fh.write(data))
        return same


def _pad_level(level: LevelModel, k: int) -> LevelModel:
    """The dataset-level model shaped like a k-cluster category model (for sparse categories)."""
    c, fg = level.centroids, level.foreground
    if len(c) >= k:
        return LevelModel(c[:k].copy(), fg[:k].copy())
    reps = int(np.ceil(k / len(c)))
    return LevelModel(np.tile(c, (reps, 1))[:k].copy(), np.tile(fg, reps)[:k].copy())
