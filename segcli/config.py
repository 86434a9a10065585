"""Every setting of the method in one frozen dataclass.

The same object configures a fit, is stored inside the fitted model file, and is hashed into cache keys,
so a cached intermediate result can never be reused under settings that would have produced another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from segcli.errors import UsageError

DEFAULT_BACKBONE = "vit_small_patch16_224.dino"
FEATURE_KINDS = ("keys", "queries", "values", "tokens", "code")
FUSION_RULES = ("majority", "all", "any")
ASSIGN_METHODS = ("cls", "pooled", "parts", "probe")
CLASS_METHODS = ("kmeans", "spectral")
REGION_MODES = ("components", "whole")
# Foreground prior: the three clustering levels, MaskDistill's object proposal alone, or both (4 votes).
PRIORS = ("levels", "maskdistill", "vote")
# Label PNGs are 8-bit palette images: ids 0..255, so at most 256 classes (background included).
MAX_K = 256
MAX_PARTS = 1024  # --parts: the part graph is MAX_PARTS^2 int64 counts (8 MB) per image
# Seeds reach numpy, scikit-learn (which needs < 2**32) and faiss, with small offsets added per level.
MAX_SEED = 2**31 - 1
# Fewest images per CLS-token category by default (Config.category_count): below it a category level is a
# second image level.
IMAGES_PER_CATEGORY = 10
REFINE_METHODS = ("densecrf", "meanfield", "none")


@dataclass(frozen=True)
class SegmentConfig:
    # Backbone input (docs/method.md, "Each stage": input and backbone): aspect kept, short side resized, long side capped, multiples of the patch.
    backbone: str = DEFAULT_BACKBONE
    short_side: int = 448
    max_side: int = 1344
    feature_kind: str = "keys"
    # Working resolution for CRF and regions; larger inputs are processed downscaled and the mask is
    # upsampled (nearest) to the full size at the end, so an 8000x6000 photo costs what a 2048 one does.
    work_max_side: int = 2048
    # Classes (background included) and the three clustering levels (docs/method.md, "Each stage").
    k: int = 21
    # Stuff classes (--stuff N): ids 0..N-1 label the background's stuff, N..k-1 the things; 0 = one background.
    stuff: int = 0
    dataset_k: int = 2
    categories: int | None = None  # None: the number of thing classes, at most one per IMAGES_PER_CATEGORY images
    category_k: int = 2
    image_k: int = 2
    fusion: str = "majority"
    max_samples: int = 100_000
    # Foreground prior (docs/method.md, Foreground prior): levels | maskdistill | vote, and the number of heads
    # whose CLS row the MaskDistill proposal averages (5 = MaskDistill's ViT-S/16 setting; 0 = all).
    prior: str = "levels"
    proposal_heads: int = 5
    # Refinement (docs/method.md, Refinement).
    crf: bool = True
    # Which refiner (segcli.method.refine.REFINE_METHODS): the exact dense CRF (pydensecrf) at crf_max_side, or the
    # coarse-to-fine torch mean-field (GPU when the run has one); crf=False (--no-crf) means "none".
    refine: str = "meanfield"
    crf_iterations: int = 10
    # The CRF runs with the long side reduced to this (kernels scaled alike), then is upsampled: at full
    # size it costs ~3 ViT-S/16 forward passes per VOC image on a CPU. 0 = full size.
    crf_max_side: int = 160
    # Regions (docs/method.md, "Each stage": regions): components smaller than min(min_region_frac * image area, min_region_px) go.
    regions: str = "components"
    min_region_frac: float = 0.01
    min_region_px: int = 400
    # Class assignment (docs/method.md, "Each stage": classes; parts: Leopart's row of the seed-system table).
    assign: str = "cls"
    class_method: str = "kmeans"
    crop_size: int = 224
    crop_margin: float = 0.1
    n_parts: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UsageError(msg)

        need(self.k >= 2, f"--k must be at least 2 (background + one class), got {self.k}")
        need(self.k <= MAX_K, f"--k must be at most {MAX_K}: label PNGs hold ids 0..255, got {self.k}")
        need(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        need(0 <= self.stuff < self.k, f"--stuff must be between 0 and k - 1 = {self.k - 1} (at least one thing class), got {self.stuff}")
        need(self.feature_kind in FEATURE_KINDS, f"unknown feature kind {self.feature_kind!r}; use one of {', '.join(FEATURE_KINDS)}")
        need(self.fusion in FUSION_RULES, f"unknown fusion rule {self.fusion!r}; use one of {', '.join(FUSION_RULES)}")
        need(self.assign in ASSIGN_METHODS, f"unknown --assign {self.assign!r}; use one of {', '.join(ASSIGN_METHODS)}")
        need(self.class_method in CLASS_METHODS, f"unknown class method {self.class_method!r}; use one of {', '.join(CLASS_METHODS)}")
        need(self.prior in PRIORS, f"unknown --prior {self.prior!r}; use one of {', '.join(PRIORS)}")
        need(self.proposal_heads >= 0, f"--proposal-heads must be 0 (all heads) or more, got {self.proposal_heads}")
        need(self.regions in REGION_MODES, f"unknown region mode {self.regions!r}; use one of {', '.join(REGION_MODES)}")
        for name in ("dataset_k", "category_k", "image_k"):
            need(getattr(self, name) >= 2, f"--{name.replace('_', '-')} must be at least 2, got {getattr(self, name)}")
        need(self.categories is None or self.categories >= 1, "--categories must be at least 1")
        need(self.short_side >= 8 and self.max_side >= self.short_side, "--short-side must be >= 8 and <= --max-side")
        need(self.work_max_side >= 16, "--work-max-side must be at least 16")
        need(self.max_samples >= 100, "--max-samples must be at least 100")
        need(0.0 <= self.min_region_frac < 1.0, "--min-region must be a fraction in [0, 1)")
        need(self.min_region_px >= 0, f"--min-region-px must be at least 0, got {self.min_region_px}")
        need(self.crop_size >= 16, "--crop-size must be at least 16")
        need(0.0 <= self.crop_margin < 1.0, "--crop-margin must be a fraction in [0, 1)")
        # The part graph is n_parts x n_parts per image and the k-means fit needs a sample per part: bounded so
        # that one option cannot make memory grow as its square (--parts 16000 took 5.7 GB).
        need(2 <= self.n_parts <= MAX_PARTS, f"--parts must be between 2 and {MAX_PARTS}, got {self.n_parts}")
        need(self.n_parts <= self.max_samples, f"--parts {self.n_parts} is more than --max-samples {self.max_samples}")
        need(self.refine in REFINE_METHODS, f"unknown --refine {self.refine!r}; use one of {', '.join(REFINE_METHODS)}")
        need(self.crf_iterations >= 1, "--crf-iterations must be at least 1")
        need(self.crf_max_side == 0 or self.crf_max_side >= 16, "--crf-max-side must be 0 (full size) or at least 16")

    @property
    def n_stuff(self) -> int:
        """Stuff classes with centroids of their own: --stuff 1 is the single background of --stuff 0."""
        return self.stuff if self.stuff >= 2 else 0

    @property
    def thing_offset(self) -> int:
        """Class id of the first thing class: 1 (after the background) or N (after the N stuff classes)."""
        return max(self.stuff, 1)

    @property
    def n_things(self) -> int:
        """Thing (object) classes: k - 1 without stuff, k - N with --stuff N (--k counts every class)."""
        return self.k - self.thing_offset

    def level_clusters(self, level: str) -> int:
        """k-means clusters of a foreground level ("dataset", "category" or "image").

        Without stuff, the level's own k (2: foreground and background). With stuff classes the background
        holds at least N classes of its own, so a two-way split separates stuff from stuff rather than
        objects from background: every level then over-clusters into at least k clusters (one per class)
        and labels each cluster by attention (foreground when its mean attention is above the average).
        """
        own = getattr(self, f"{level}_k")
        return max(own, self.k) if self.n_stuff else own

    @property
    def n_categories(self) -> int:
        # The category level groups images by the objects they show, so by default one group per thing class.
        return self.categories if self.categories is not None else self.n_things

    def category_count(self, n_images: int) -> int:
        """How many CLS-token categories a fit on ``n_images`` images uses.

        ``--categories N``: N (at most one per image).  By default one per thing class, but never fewer than
        IMAGES_PER_CATEGORY images per category: a category of one or two images is fitted on those images'
        own patches, i.e. it is a second image level, and the 2-of-3 vote then counts the image level twice
        (voc-mini, 11 images: fused fg IoU 0.859 with 11 categories vs 0.901 with 1, issue 19).
        """
        if self.categories is not None:
            return max(1, min(self.categories, n_images))
        return max(1, min(self.n_things, n_images // IMAGES_PER_CATEGORY))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if "crf" in data and "refine" not in data:
            data["refine"] = "densecrf"  # saved before --refine existed: the dense CRF was the only refiner
        return cls(**{k: v for k, v in data.items() if k in known})

    def digest(self, *fields: str) -> str:
        """Short hash of the named settings (all when none are named), for cache keys."""
        data = self.to_dict()
        if fields:
            data = {f: data[f] for f in fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Settings that decide the features of one image (the feature cache key), and those that decide its
# foreground regions given fitted centroids (the region cache key).
FEATURE_FIELDS = ("backbone", "short_side", "max_side", "feature_kind", "work_max_side", "proposal_heads")
REGION_FIELDS = FEATURE_FIELDS + (
    "prior", "image_k", "fusion", "crf", "refine", "crf_iterations", "crf_max_side", "regions", "min_region_frac", "min_region_px",
    "seed",
)
