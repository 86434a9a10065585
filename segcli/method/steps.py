"""The per-image steps of the method, as plain functions of (image, features, fitted model, settings).

Every scheduler calls these and only these: the in-process loop and the worker pool of
:mod:`segcli.engines.local`, and the cluster engine. So the method has one implementation whatever runs it,
and a result never depends on which scheduler (or how many workers) produced it. Each function takes the
fitted :class:`~segcli.method.model.SegModel` (its ``config`` holds the settings) and, optionally, a
:class:`~segcli.timings.Timings` to account its time to the pipeline's stages.

The device stages (backbone forward, crop forward) are not here: they run where the backbone lives
(:class:`~segcli.engines.feature_source.FeatureSource`), batched across images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segcli.io.arrays import ArraySpec
from segcli.io.cache import ImageFeatures
from segcli.errors import BadImageError, ModelError
from segcli.method.foreground import PROPOSAL_VOTE_WEIGHT, fuse, image_level_clusters
from segcli.io.images import ImageItem, load_image
from segcli.method.kmeans import assign_nearest
from segcli.method.model import SegModel
from segcli.io.outputs import label_ids
from segcli.method.regions import (crop_batch, find_regions, pooled_embeddings, region_boxes, region_crops, regions_on_grid,
                                   split_regions)
from segcli.timings import Timings
from segcli.method.stuff import refine_stuff, stuff_probabilities

# The arrays of a per-image region bundle (cached under <cache>/regions/): H, W working size; h, w patch grid;
# n regions; E embedding size (0 when nothing is embedded).
REGION_SPECS: dict[str, ArraySpec] = {
    "regions": ArraySpec(("H", "W"), ("uint16", "int32")),
    "n": ArraySpec((), ("int64",)),
    "emb": ArraySpec(("n", "E"), ("float32",)),
    "fg_grid": ArraySpec(("h", "w"), ("bool",)),
    "original_size": ArraySpec((2,), ("int64",)),
}

Bundle = dict[str, np.ndarray]
Foreground = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (hard, soft, image-level clusters)
CropSpec = tuple[int, tuple, tuple]  # (side, mean, std) of the crop forward's input


def torch_image(rgb: np.ndarray, device="cpu"):
    """(H, W, 3) uint8 RGB as a (3, H, W) uint8 tensor on ``device``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(device)


def check_region_bundle(b: Bundle) -> None:
    """Content checks beyond shapes: the region count agrees with the embeddings and the region map."""
    n = int(b["n"])
    if n != b["emb"].shape[0] or (b["regions"].size and int(b["regions"].max()) > n) or (b["regions"].min(initial=0) < 0):
        raise ValueError(f"region bundle is inconsistent (n={n}, {b['emb'].shape[0]} embeddings)")
    if (b["original_size"] < 1).any():
        raise ValueError("region bundle has an empty original size")


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) float map, or of each channel of an (L, h, w) one, to size (H, W),
    pixel centres aligned."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
    return out[0] if np.ndim(grid) == 2 else out


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to size (H, W)."""
    if labels.shape == tuple(size):
        return labels
    H, W = size
    h, w = labels.shape
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    return labels[np.ix_(ys, xs)]


def image_clusters(model: SegModel, f: ImageFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids, M_I) of the image level: k-means on the image's own patches."""
    cfg = model.config
    return image_level_clusters(f.feats, f.attn, cfg.level_clusters("image"), cfg.seed)


def foreground(model: SegModel, f: ImageFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fused (hard, soft) patch-level foreground of one image from the three levels and/or the proposal, and
    the image level's cluster ids (None with --prior maskdistill, which fits no level)."""
    cfg = model.config
    h, w = f.grid
    flat = f.feats.reshape(h * w, -1).astype(np.float32)
    if flat.shape[1] != model.feature_dim:
        raise ModelError(f"features have dimension {flat.shape[1]} but the model was fitted on {model.feature_dim}; "
                         "use the backbone/features the model was fitted with")
    if cfg.prior != "levels" and f.proposal is None:  # a --features file that vanished or changed since the check
        raise BadImageError(f"--prior {cfg.prior}: its features have no 'proposal' array")
    if cfg.prior == "maskdistill":
        return (*fuse([f.proposal], cfg.fusion), None)
    m_d = model.dataset.mask(flat).reshape(h, w)
    cls = f.cls.astype(np.float32)[None]
    cls /= max(float(np.linalg.norm(cls)), 1e-12)
    cat = int(assign_nearest(cls, model.category_centroids)[0])
    m_c = model.categories[cat].mask(flat).reshape(h, w)
    clusters, m_i = image_clusters(model, f)
    if cfg.prior == "vote":
        return (*fuse([m_d, m_c, m_i, f.proposal], cfg.fusion, weights=[1.0, 1.0, 1.0, PROPOSAL_VOTE_WEIGHT]), clusters)
    return (*fuse([m_d, m_c, m_i], cfg.fusion), clusters)


def regions_before_crops(model: SegModel, item: ImageItem, f: ImageFeatures, device="cpu",
                         timings: Timings | None = None, fg: Foreground | None = None,
                         crop_spec: CropSpec | None = None) -> tuple[Bundle, list | None]:
    """One image's region step up to the crop forward: fusion, refinement at the working size, regions.

    Returns (bundle, crops). With crops (``--assign cls``), the bundle's embeddings are still to come from a
    crop forward (:func:`with_embeddings`), so the crops of several images can share one device batch.
    ``device`` is where the torch refiner runs (the backbone's CUDA device, else the CPU). ``fg``: this
    image's :func:`foreground`, when it was computed already (batched on a device, :mod:`segcli.method.batched`).
    ``crop_spec`` (side, mean, std): cut the crops on ``device`` and resize them there, ready for the crop
    forward (:func:`segcli.method.regions.crop_batch`), instead of giving RGB arrays back.
    """
    from segcli.method.refine import refine_mask

    cfg, timings = model.config, timings or Timings()
    with timings("clustering"):
        _, soft, clusters = fg if fg is not None else foreground(model, f)
    with timings("load images"):
        img = f.image if f.image is not None else load_image(item.path, cfg.work_max_side)
    rgb = img.rgb
    with timings("crf"):
        prob = upsample(soft, rgb.shape[:2])
        fg = refine_mask(rgb, prob, cfg.refine if cfg.crf else "none", cfg.crf_iterations, cfg.crf_max_side, device)
    with timings("regions"):
        regions, n = find_regions(fg, cfg.regions, cfg.min_region_frac, cfg.min_region_px)
        if cfg.n_stuff and cfg.regions == "components" and n:
            # Scenes: touching objects of different kinds are split along the image level's clusters (those of
            # M_I; with --prior maskdistill no level was clustered, so the same k-means runs here).
            if clusters is None:
                clusters, _ = image_clusters(model, f)
            regions, n = split_regions(regions, clusters, min(cfg.min_region_frac * fg.size, float(cfg.min_region_px)))
        fg_grid = regions_on_grid(regions, f.grid) > 0
    crops = None
    if cfg.assign == "cls" and n and crop_spec is not None:

        with timings("regions"):
            rgb_t = torch_image(rgb, device)
            crops = crop_batch(rgb_t, region_boxes(regions, n, cfg.crop_margin), *crop_spec)
        emb = np.zeros((n, 0), np.float32)  # replaced by the crop forward
    elif cfg.assign == "cls" and n:
        # Copies: a view would keep the whole working-size image alive while the crops wait for their batch.
        crops = [np.ascontiguousarray(c) for c in region_crops(rgb, regions, n, cfg.crop_margin)]
        emb = np.zeros((n, 0), np.float32)  # replaced by the crop forward
    elif cfg.assign == "pooled" and n:
        with timings("regions"):
            emb = pooled_embeddings(regions, n, f.feats)
    else:
        emb = np.zeros((n, 0), np.float32)
    return {
        "regions": regions.astype(np.uint16 if n < 65535 else np.int32),
        "n": np.array(n, dtype=np.int64),
        "emb": np.asarray(emb, np.float32),
        "fg_grid": fg_grid,
        "original_size": np.array(img.original_size, dtype=np.int64),
    }, crops


def sample_rng(seed: int, *stream: int) -> np.random.Generator:
    """The random stream of one image in one fit: ``stream`` names the fit and ends with the image's index, so
    an image's sample never depends on which other images were read before it, or where."""
    return np.random.default_rng([seed, *stream])


def fit_quota(max_samples: int, n_images: int) -> int:
    """Patches each image may give to a fit's sample: the sample stays below ``max_samples`` whatever the size
    of the dataset."""
    return max(1, max_samples // max(1, n_images))


def fit_sample(f: ImageFeatures, quota: int, seed: int, index: int) -> dict[str, np.ndarray]:
    """One image's share of the level fits' sample: ``quota`` patches (features, normalised attention, border
    flags) drawn with the stream of the image's ``index`` in the sorted input, and its CLS token."""
    from segcli.method.foreground import border_grid, normalised_attention

    h, w = f.grid
    pick = sample_rng(seed, 1, index).choice(h * w, size=min(quota, h * w), replace=False)
    return {
        "feats": f.feats.reshape(h * w, -1)[pick],
        "attn": normalised_attention(f.attn).ravel()[pick],
        "border": border_grid(h, w).ravel()[pick],
        "cls": f.cls,
    }


def patch_sample(f: ImageFeatures, fg_grid: np.ndarray, foreground: bool, quota: int, seed: int, stream: int,
                 index: int) -> np.ndarray:
    """Up to ``quota`` of one image's foreground (or background) patch features for the fit ``stream`` (2:
    parts, 3: stuff), drawn with the stream of the image's ``index`` in the fit's item list; (0, D) if none."""
    keep = fg_grid.ravel() == foreground
    flat = f.feats.reshape(keep.size, -1)[keep]
    if not len(flat):
        return flat
    return flat[sample_rng(seed, stream, index).choice(len(flat), size=min(quota, len(flat)), replace=False)]


def part_graph(f: ImageFeatures, fg_grid: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's share of the part graph: (adjacency counts between parts, patches per part)."""
    from segcli.method.parts import part_adjacency

    n_parts = len(centroids)
    grid = part_grid(f, fg_grid, centroids)
    return part_adjacency(grid, n_parts), np.bincount(grid[grid >= 0], minlength=n_parts)


def with_embeddings(bundle: Bundle, emb: np.ndarray) -> Bundle:
    """The bundle completed with its regions' crop embeddings (rows of a crop forward shared with other images)."""
    return {**bundle, "emb": np.ascontiguousarray(emb, dtype=np.float32)}


def part_grid(f: ImageFeatures, fg_grid: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest part centroid of every foreground patch, -1 on background patches."""
    h, w = f.grid
    grid = np.full(h * w, -1, dtype=np.int64)
    fg = fg_grid.ravel()
    if fg.any():
        grid[fg] = assign_nearest(f.feats.reshape(h * w, -1)[fg].astype(np.float32), centroids)
    return grid.reshape(h, w)


def thing_labels(model: SegModel, f: ImageFeatures | None, bundle: Bundle) -> np.ndarray:
    """Thing-class ids of the object regions (thing_offset..k-1), 0 elsewhere."""
    regions = bundle["regions"].astype(np.int64)
    n = int(bundle["n"])
    if n == 0:
        return np.zeros(regions.shape, np.uint8)
    if model.config.assign in ("parts", "probe"):
        if len(model.part_centroids) == 0:
            return np.zeros(regions.shape, np.uint8)
        from scipy import ndimage

        grid = part_grid(f, bundle["fg_grid"], model.part_centroids)
        classes = np.where(grid >= 0, model.part_classes[np.maximum(grid, 0)], 0)
        if (classes > 0).any():
            # Foreground pixels whose nearest patch centre is background take the nearest foreground patch's class.
            idx = ndimage.distance_transform_edt(classes == 0, return_distances=False, return_indices=True)
            classes = classes[idx[0], idx[1]]
        up = resize_labels(classes, regions.shape)
        return label_ids(np.where(regions > 0, up, 0))
    if model.class_centroids.size == 0:
        return np.zeros(regions.shape, np.uint8)
    lut = np.zeros(n + 1, np.int64)
    lut[1:] = assign_nearest(bundle["emb"].astype(np.float32), model.class_centroids) + model.config.thing_offset
    return label_ids(lut)[regions]


def has_stuff(model: SegModel) -> bool:
    """True when the model labels background pixels with stuff classes (they need features and the image)."""
    return bool(model.config.n_stuff and len(model.stuff_centroids))


def needs_features(model: SegModel) -> bool:
    """True when labelling an image needs its features (not only its cached region bundle)."""
    return model.config.assign in ("parts", "probe") or has_stuff(model)


def labels(model: SegModel, f: ImageFeatures | None, bundle: Bundle, rgb: np.ndarray | None = None, device="cpu",
           timings: Timings | None = None) -> np.ndarray:
    """Class-id map (at the working resolution) of one image from its regions (and features, for parts).

    With stuff classes (``--stuff N``) the features and the image (``rgb``, at the working resolution)
    are needed too: object pixels keep their thing class, every other pixel its refined stuff class.
    """
    from segcli.errors import UsageError

    timings = timings or Timings()
    with timings("clustering"):
        things = thing_labels(model, f, bundle)
        if not has_stuff(model):
            return things
        if f is None or (rgb is None and model.config.crf):
            raise UsageError("labels() with stuff classes needs the image's features and its rgb (working resolution)")
        probs = stuff_probabilities(f.feats, bundle["fg_grid"], model.stuff_centroids)
    with timings("crf"):
        stuff = refine_stuff(rgb, upsample(probs, things.shape), model.config, device)
    return label_ids(np.where(things > 0, things, stuff))


def write_masks(model: SegModel, item: ImageItem, f: ImageFeatures | None, bundle: Bundle, out: Path,
                overlay: Path | None = None, device="cpu", timings: Timings | None = None, legend=None) -> None:
    """Label one image and write its label PNG (original size) and, with ``overlay``, its overlay JPEG (with
    ``legend``, a :class:`segcli.io.legend.Legend`, listing the ids it shows).

    Both writes are atomic; ``out``/``overlay`` are prepared output folders (:func:`segcli.io.outputs.prepare_output_dir`).
    """
    from segcli.io.outputs import output_path, save_label_png, save_overlay

    timings = timings or Timings()
    rgb = None
    if has_stuff(model) or overlay is not None:
        with timings("load images"):
            img = f.image if f is not None and f.image is not None else load_image(item.path, model.config.work_max_side)
            rgb = img.rgb
    lab = labels(model, f, bundle, rgb, device, timings)
    size = tuple(int(v) for v in bundle["original_size"])
    with timings("write"):
        save_label_png(output_path(out, item.key, ".png"), resize_labels(lab, size))
        if overlay is not None:
            save_overlay(output_path(overlay, item.key, ".jpg"), rgb, lab, legend=legend)


def regions_step(item: ImageItem, f: ImageFeatures, cached: Bundle | None, *, model: SegModel, device="cpu",
                 timings: Timings | None = None, fg: Foreground | None = None,
                 crop_spec: CropSpec | None = None) -> tuple[Bundle, list | None, bool]:
    """The region pass of one image: (bundle, crops waiting for the crop forward, fresh). A bundle read from
    the cache is passed through (fresh False); otherwise :func:`regions_before_crops` computes it."""
    if cached is not None:
        return cached, None, False
    bundle, crops = regions_before_crops(model, item, f, device, timings, fg, crop_spec)
    return bundle, crops, True


def mask_step(item: ImageItem, f: ImageFeatures | None, bundle: Bundle, *, model: SegModel, out: Path,
              overlay: Path | None = None, device="cpu", timings: Timings | None = None, legend=None) -> None:
    """The output pass of one image (:func:`write_masks`), in the engines' calling convention."""
    write_masks(model, item, f, bundle, out, overlay, device, timings, legend)
