"""Per-image feature files: the on-disk format, the content-keyed cache, and bring-your-own folders.

Format (one ``.npz`` per image, written atomically, read with ``allow_pickle=False``):

=========  ==============  =========  ==========================================================
array      shape           dtype      meaning
=========  ==============  =========  ==========================================================
``feats``  (h, w, D)       float16    patch features on the patch grid, L2-normalised per patch
``cls``    (C,)            float32    the image's CLS token (used to find its category)
``attn``   (h, w)          float16    CLS-to-patch attention averaged over heads (saliency)
``proposal`` (h, w)        bool       MaskDistill's object proposal (:mod:`segcli.proposal`); optional
=========  ==============  =========  ==========================================================

``proposal`` is always written by the backbone cache (for a model with a CLS token); in a bring-your-own
folder it may be absent, and is then only an error for ``--prior maskdistill`` or ``vote``.  Its values
must be booleans or the numbers 0 and 1.

The backbone cache lives under ``<cache>/features/<namespace>/<sha[:2]>/<sha>.npz`` where ``sha`` is the
SHA-256 of the image file and ``namespace`` hashes backbone, weights, input settings and :data:`CACHE_FORMAT`: a second run
on the same images never runs the backbone again, a renamed or copied image is still found, and entries of
an older format (e.g. without ``proposal``) are recomputed under a new namespace rather than misread.
A bring-your-own folder (``--features DIR``) holds ``DIR/<key>.npz``, where ``key`` is the image's path
relative to the input folder without its extension (``sub/img.jpg`` -> ``DIR/sub/img.npz``).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcli.errors import BadImageError
from segcli.outputs import atomic_write

# Version of what a backbone cache entry holds; part of the cache namespace. 2: + ``proposal``.
CACHE_FORMAT = 2


@dataclass
class ImageFeatures:
    feats: np.ndarray  # (h, w, D) float16
    cls: np.ndarray  # (C,) float32
    attn: np.ndarray  # (h, w) float16
    proposal: np.ndarray | None = None  # (h, w) bool MaskDistill object proposal, None when not provided

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.feats.shape[0]), int(self.feats.shape[1])


def save_features(path: Path, f: ImageFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "feats": np.ascontiguousarray(f.feats, dtype=np.float16),
        "cls": np.ascontiguousarray(f.cls, dtype=np.float32),
        "attn": np.ascontiguousarray(f.attn, dtype=np.float16),
    }
    if f.proposal is not None:
        arrays["proposal"] = np.ascontiguousarray(f.proposal, dtype=bool)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_features(path: Path) -> ImageFeatures:
    """Read and validate one feature file; a malformed one raises BadImageError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, cls, attn = z["feats"], z["cls"], z["attn"]
            proposal = z["proposal"] if "proposal" in z.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise BadImageError(f"{path}: unreadable feature file ({exc})") from None
    if feats.ndim != 3 or attn.shape != feats.shape[:2] or cls.ndim != 1:
        raise BadImageError(
            f"{path}: feature arrays have wrong shapes (feats {feats.shape}, attn {attn.shape}, cls {cls.shape}); "
            "expected feats (h, w, D), attn (h, w), cls (C,)"
        )
    if not (np.isfinite(feats).all() and np.isfinite(attn).all() and np.isfinite(cls).all()):
        raise BadImageError(f"{path}: feature file holds NaN or infinite values")
    if proposal is not None:
        proposal = _proposal_mask(path, proposal, feats.shape[:2])
    return ImageFeatures(feats.astype(np.float16, copy=False), cls.astype(np.float32, copy=False),
                         attn.astype(np.float16, copy=False), proposal)


def _proposal_mask(path: Path, proposal: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A file's ``proposal`` array as an (h, w) bool mask; anything but 0/1 values on the grid is an error."""
    if proposal.shape != tuple(grid):
        raise BadImageError(f"{path}: proposal has shape {proposal.shape}, expected the patch grid {tuple(grid)}")
    if proposal.dtype == bool:
        return proposal
    if proposal.dtype.kind not in "iuf" or not np.isin(proposal, (0, 1)).all():
        raise BadImageError(f"{path}: proposal must hold booleans or the numbers 0 and 1")
    return proposal.astype(bool)


def has_proposal(path: Path) -> bool:
    """Whether a feature file holds a ``proposal`` array (reads the zip directory only, no array data)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "proposal" in z.files
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


class FeatureCache:
    """Content-addressed store of backbone features for one namespace (backbone + settings)."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.root = Path(root) / "features" / namespace

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npz"

    def load(self, digest: str) -> ImageFeatures | None:
        """Cached features, or None when absent or damaged (a damaged entry is recomputed)."""
        p = self.path(digest)
        if not p.is_file():
            return None
        try:
            return load_features(p)
        except BadImageError:
            return None

    def save(self, digest: str, f: ImageFeatures) -> None:
        save_features(self.path(digest), f)


class FeatureFolder:
    """Features computed elsewhere, one file per image key (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str, image: Path | None = None) -> ImageFeatures:
        p = self.path(key)
        if not p.is_file():
            raise BadImageError(f"{image or key}: no feature file {p}")
        return load_features(p)


def save_array_bundle(path: Path, **arrays: np.ndarray) -> None:
    """Atomically store small per-image intermediate results (region maps, embeddings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))


def load_array_bundle(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
