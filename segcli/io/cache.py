"""Per-image feature files: the on-disk format, the content-keyed cache, and bring-your-own folders.

Format (one ``.npz`` per image, written atomically, read with ``allow_pickle=False``):

============  ==============  =========  ==========================================================
array         shape           dtype      meaning
============  ==============  =========  ==========================================================
``feats``     (h, w, D)       float16    patch features on the patch grid, L2-normalised per patch
``cls``       (C,)            float32    the image's CLS token (used to find its category)
``attn``      (h, w)          float16    CLS-to-patch attention averaged over heads (saliency)
``proposal``  (h, w)          bool       MaskDistill's object proposal (:mod:`segcli.method.proposal`); optional
============  ==============  =========  ==========================================================

The backbone cache lives under ``<cache>/features/<namespace>/<sha[:2]>/<sha>.npz`` where ``sha`` is the
SHA-256 of the image file and ``namespace`` hashes backbone, weights and input settings: a second run on
the same images never runs the backbone again, and a renamed or copied image is still found.
A bring-your-own folder (``--features DIR``) holds ``DIR/<key>.npz``, where ``key`` is the image's path
relative to the input folder without its extension (``sub/img.jpg`` -> ``DIR/sub/img.npz``).

Cache entries (features and per-image region bundles) are never trusted: each stores, next to its arrays, a
SHA-256 over every array (name, dtype, shape, bytes) and the entry's own key (namespace and image digest),
and is checked against it and against the shapes the run expects when read (:class:`EntryStore`). A damaged,
truncated or swapped entry is reported, recomputed and replaced; it is never used and never stops a run.

The cache root (and a bring-your-own folder) may be an object-store prefix (``s3://``, ``gs://``): every read
and write goes through :mod:`segcli.io.storage`, and entries are uploaded whole (atomic for readers).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import numpy as np

from segcli.io import storage
from segcli.io.arrays import ArrayCheckError, ArraySpec, check_arrays
from segcli.errors import BadImageError
from segcli.io.outputs import atomic_write

# Bumped when the layout of cache entries changes: entries of another layout are simply not found.
CACHE_LAYOUT = "v2"
# Version of what a backbone cache entry holds; part of the cache namespace. 2: + ``proposal``.
CACHE_FORMAT = 2
# The array that holds an entry's digest (never a user array name: npz names are free, this one is reserved).
DIGEST_ARRAY = "__digest__"

# The arrays of a feature file and the sizes they share (h, w: patch grid; D: feature dim; C: CLS dim).
FEATURE_SPECS: dict[str, ArraySpec] = {
    "feats": ArraySpec(("h", "w", "D")),
    "cls": ArraySpec(("C",)),
    "attn": ArraySpec(("h", "w")),
    # Booleans, or the numbers 0 and 1 (checked by _proposal_mask); optional in a bring-your-own folder.
    "proposal": ArraySpec(("h", "w"), ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                                       "float64"), optional=True),
}
FEATURE_SIZES = ("h", "w", "D", "C")


@dataclass
class ImageFeatures:
    feats: np.ndarray  # (h, w, D) float16
    cls: np.ndarray  # (C,) float32
    attn: np.ndarray  # (h, w) float16
    proposal: np.ndarray | None = None  # (h, w) bool MaskDistill object proposal, None when not provided
    # The decoded image (segcli.io.images.LoadedImage at the working size) when the backbone has just computed
    # these features from it: the region step reuses it instead of decoding the file again. Never cached.
    image: object | None = field(default=None, compare=False, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.feats.shape[0]), int(self.feats.shape[1])

    @property
    def dims(self) -> dict[str, int]:
        """The named sizes of :data:`FEATURE_SPECS` (what the next file of the same run must match)."""
        h, w = self.grid
        return {"h": h, "w": w, "D": int(self.feats.shape[2]), "C": int(self.cls.shape[0])}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored on disk (format above)."""
        return {
            "feats": np.ascontiguousarray(self.feats, dtype=np.float16),
            "cls": np.ascontiguousarray(self.cls, dtype=np.float32),
            "attn": np.ascontiguousarray(self.attn, dtype=np.float16),
        } | ({} if self.proposal is None else {"proposal": np.ascontiguousarray(self.proposal, dtype=bool)})

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "ImageFeatures":
        with np.errstate(over="ignore"):  # an overflow to inf is caught by the caller's finiteness check
            return cls(
                np.asarray(arrays["feats"]).astype(np.float16, copy=False),
                np.asarray(arrays["cls"]).astype(np.float32, copy=False),
                np.asarray(arrays["attn"]).astype(np.float16, copy=False),
                _proposal_mask(arrays["proposal"]) if "proposal" in arrays else None,
            )


def _proposal_mask(proposal: np.ndarray) -> np.ndarray:
    """A ``proposal`` array as a bool mask; values other than 0/1 raise :class:`ArrayCheckError`."""
    if proposal.dtype == bool:
        return proposal
    if not np.isin(proposal, (0, 1)).all():
        raise ArrayCheckError("array 'proposal' must hold booleans or the numbers 0 and 1")
    return proposal.astype(bool)


def has_proposal(path: Path) -> bool | None:
    """Whether a feature file holds a ``proposal`` array (reads the zip directory only, no array data); None
    when the file cannot be read at all (it is reported and skipped when it is loaded, like any bad file)."""
    try:
        with np.load(storage.readable(path), allow_pickle=False) as z:
            return "proposal" in z.files
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
        return None


def save_features(path: Path, f: ImageFeatures) -> None:
    storage.makedirs(path.parent)
    arrays = f.arrays()
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def read_npz(path: Path | storage.ObjectPath | BinaryIO) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (or of its bytes in a file object), fully decoded; ``ValueError`` naming the
    problem if it cannot be read.

    Any failure counts (truncated zip, garbled compressed stream, pickled objects, bad headers): these files
    come from disk and may hold anything.
    """
    try:
        with np.load(storage.readable(path), allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - whatever numpy/zipfile/zlib raise on a damaged file
        raise ValueError(f"{type(exc).__name__}: {exc}".strip().rstrip(":")) from None


def _check_features(arrays: Mapping[str, np.ndarray], dims: Mapping[str, int] | None) -> ImageFeatures:
    """Check a feature file's arrays (shapes, numeric types, non-empty grid, finite values), run-level sizes
    (``D`` and ``C``) against ``dims``; the values are checked again after conversion to the stored dtypes."""
    fixed = {k: v for k, v in (dims or {}).items() if k in ("D", "C")}
    check_arrays(arrays, FEATURE_SPECS, fixed, nonempty=FEATURE_SIZES)
    f = ImageFeatures.from_arrays(arrays)
    if not (np.isfinite(f.feats).all() and np.isfinite(f.attn).all() and np.isfinite(f.cls).all()):
        raise ArrayCheckError("values overflow float16 (features must be L2-normalised)")
    return f


def load_features(path: Path, dims: Mapping[str, int] | None = None) -> ImageFeatures:
    """Read and validate one bring-your-own feature file; a malformed one raises BadImageError naming it.

    ``dims``: the feature and CLS dimensions (``D``, ``C``) the run already uses (fixed by its first file).
    """
    try:
        arrays = read_npz(path)
    except ValueError as exc:
        raise BadImageError(f"{path}: unreadable feature file ({exc})") from None
    try:
        return _check_features(arrays, dims)
    except ArrayCheckError as exc:
        if "D=" in str(exc) or "C=" in str(exc):
            msg = (f"{path}: feature file does not match the others ({exc}); "
                   "expected feats (h, w, D), attn (h, w), cls (C,)")
        else:
            msg = f"{path}: bad feature file ({exc}); expected feats (h, w, D), attn (h, w), cls (C,), numbers"
        raise BadImageError(msg) from None


def entry_digest(key: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """SHA-256 over ``key`` and every array (name, dtype, shape, bytes) as a (32,) uint8 array.

    Binding the key in makes another entry's intact file (another image, another namespace) fail the check.
    """
    h = hashlib.sha256(b"segcli-cache-entry\0" + key.encode() + b"\0")
    for name in sorted(arrays):
        if name == DIGEST_ARRAY:
            continue
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def write_npz(fh, arrays: Mapping[str, np.ndarray], compressed: bool) -> None:
    """``np.savez`` / ``np.savez_compressed`` with the fastest deflate level: region maps are mostly runs of
    one value, so level 1 is 3x faster than numpy's default level at a size still ~200x below the raw array
    (a 500 x 375 region map: 0.8 ms and 4 kB instead of 2.3 ms and 2 kB). Any npz reader reads it."""
    import zipfile

    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(fh, "w", mode, compresslevel=1 if compressed else None) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


class EntryStore:
    """Verified per-image cache entries under ``<cache root>/<name>/<digest[:2]>/<digest>.npz``.

    Every entry carries :func:`entry_digest` of its arrays and key; :meth:`load` returns the arrays only
    when the digest matches and the arrays fit ``specs`` (and the sizes the caller expects), else reports
    the entry through ``warn`` and returns None, so that the caller recomputes and :meth:`save` replaces it.
    """

    def __init__(self, cache_root: Path, name: str, *, compressed: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.root = storage.location(cache_root) / name
        self.compressed = compressed
        self.warn = warn or (lambda message: None)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npz"

    def key(self, digest: str) -> str:
        return f"{self.name}/{digest}"

    def save(self, digest: str, arrays: Mapping[str, np.ndarray]) -> None:
        path = self.path(digest)
        storage.makedirs(path.parent)
        stored = {k: np.asarray(v) for k, v in arrays.items()}
        stored[DIGEST_ARRAY] = entry_digest(self.key(digest), stored)
        buf = io.BytesIO()
        write_npz(buf, stored, self.compressed)
        atomic_write(path, lambda fh: fh.write(buf.getvalue()))

    def load(self, digest: str, specs: Mapping[str, ArraySpec], dims: Mapping[str, int] | None = None,
             check: Callable[[dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None when absent or damaged (reported). ``check`` may add content checks
        (raising ``ValueError``)."""
        path = self.path(digest)
        if storage.is_remote(path):  # one GET, no HEAD first: a lookup is a single request
            data = storage.read_if_exists(path)
            if data is None:
                return None
            source = io.BytesIO(data)
        elif not path.is_file():
            return None
        else:
            source = path
        try:
            arrays = read_npz(source)
            stored = arrays.pop(DIGEST_ARRAY, None)
            if stored is None:
                raise ValueError("no digest")
            if not np.array_equal(stored, entry_digest(self.key(digest), arrays)):
                raise ValueError("digest mismatch: damaged, or another entry's file")
            check_arrays(arrays, specs, dims)
            if check is not None:
                check(arrays)
        except ValueError as exc:
            self.warn(f"damaged cache entry {path} ({exc}): recomputing it")
            return None
        return arrays


class FeatureCache:
    """Content-addressed store of backbone features for one namespace (backbone + settings)."""

    def __init__(self, root: Path, namespace: str, warn: Callable[[str], None] | None = None) -> None:
        self.store = EntryStore(root, f"features/{CACHE_LAYOUT}-{namespace}", warn=warn)
        self.root = self.store.root

    def path(self, digest: str) -> Path:
        return self.store.path(digest)

    def load(self, digest: str, dims: Mapping[str, int] | None = None) -> ImageFeatures | None:
        """Cached features, or None when absent or damaged (a damaged entry is reported and recomputed).

        ``dims``: the sizes the run expects (``D``, ``C`` of the features it already has)."""
        fixed = {k: v for k, v in (dims or {}).items() if k in ("D", "C")}
        arrays = self.store.load(digest, FEATURE_SPECS, fixed, check=lambda a: _check_features(a, fixed))
        return None if arrays is None else ImageFeatures.from_arrays(arrays)

    def save(self, digest: str, f: ImageFeatures) -> None:
        self.store.save(digest, f.arrays())


class FeatureFolder:
    """Features computed elsewhere, one file per image key (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = storage.location(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str, image: Path | None = None, dims: Mapping[str, int] | None = None) -> ImageFeatures:
        p = self.path(key)
        if not storage.is_file(p):
            raise BadImageError(f"{image or key}: no feature file {p}")
        return load_features(p, dims)
