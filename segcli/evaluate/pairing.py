"""Finding prediction / ground-truth pairs.

Files are keyed by their path relative to the folder, without the extension (``a/b.png`` and ``a/b.jpg`` both
key ``a/b``), so any image extension works on either side. Ground truth may be a plain folder or a PASCAL VOC
layout: ``VOCdevkit``, ``VOCdevkit/VOC2012``, ``VOC2012`` or its ``SegmentationClass`` folder; ``--split val``
then keeps the ids of ``ImageSets/Segmentation/val.txt``. ``--split`` may also name a file of ids.
Either folder may be an object-store prefix (``s3://``, ``gs://``; :mod:`segcli.io.storage`), listed in one request
per 1000 objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segcli.io import storage
from segcli.errors import InputError, UsageError

IMAGE_EXTS = frozenset({".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".ppm", ".pgm", ".pbm"})


@dataclass(frozen=True)
class Pair:
    key: str
    pred: Path
    gt: Path


@dataclass
class Pairing:
    pairs: list[Pair]
    missing: list[str] = field(default_factory=list)  # ground truth without prediction
    extra: list[str] = field(default_factory=list)  # prediction without ground truth (not in the split)
    gt_dir: Path | None = None
    layout: str = "folder"  # "folder" | "voc"
    split: str | None = None
    outside_split: int = 0  # predictions of images outside --split (never an error)
    pred_dir: Path | None = None

    @property
    def num_gt(self) -> int:
        return len(self.pairs) + len(self.missing)


def scan_images(root: Path, what: str) -> dict[str, Path]:
    """key -> path of every image file under ``root`` (hidden files and folders skipped)."""
    found: dict[str, Path] = {}
    remote = storage.is_remote(root)
    for path in (root / name for name in storage.list_files(root)) if remote else sorted(root.rglob("*")):
        rel = PurePosixPath(path.relative_to(root))
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() not in IMAGE_EXTS or not (remote or path.is_file()):
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            raise InputError(f"two {what} files for {key!r}: {found[key].name} and {path.name} in {root}")
        found[key] = path
    return found


def find_voc_root(gt: Path) -> Path | None:
    """The ``VOC2012``-like folder (holding SegmentationClass) that ``gt`` designates, if any."""
    for cand in (gt / "VOCdevkit" / "VOC2012", gt / "VOC2012", gt):
        if storage.is_dir(cand / "SegmentationClass"):
            return cand
    if gt.name == "SegmentationClass" and storage.is_dir(gt.parent / "ImageSets" / "Segmentation"):
        return gt.parent
    return None


def read_ids(path: Path) -> list[str]:
    try:
        lines = (path.read_text() if not storage.is_remote(path) else storage.read_bytes(path).decode()).splitlines()
    except (OSError, UnicodeDecodeError, InputError) as exc:
        raise InputError(f"cannot read split file {path}: {exc}") from None
    ids = []
    for line in lines:
        tokens = line.split("#", 1)[0].split()
        if tokens:
            token = Path(tokens[0])
            ids.append(token.with_suffix("").as_posix() if token.suffix.lower() in IMAGE_EXTS else token.as_posix())
    if not ids:
        raise InputError(f"split file {path} lists no ids")
    return ids


def _split_ids(split: str, voc_root: Path | None) -> list[str]:
    as_file = Path(split)
    if voc_root is not None:
        listed = voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if storage.is_file(listed):
            return read_ids(listed)
    if as_file.is_file():
        return read_ids(as_file)
    if voc_root is not None:
        folder = voc_root / "ImageSets" / "Segmentation"
        if storage.is_remote(folder):
            names = sorted(n[:-4] for n in storage.list_files(folder) if n.endswith(".txt") and "/" not in n)
        else:
            names = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise InputError(f"no split {split!r} in {folder} (found: {', '.join(names) or 'none'})")
    raise UsageError(f"--split {split!r} needs a VOC layout (ImageSets/Segmentation/{split}.txt) or a file of ids")


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _missing_reason(path: Path) -> str:
    """Why ``path`` is not a usable folder: absent, a symlink loop or to nowhere, unreadable, or a file."""
    if storage.is_remote(path):
        return "does not exist" if not storage.exists(path) else "is not a folder"
    import errno
    import os

    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if exc.errno == errno.ENOENT:
            return "is a broken symlink" if os.path.islink(path) else "does not exist"
        return f"cannot be read ({exc.strerror or exc})"
    return "is not a folder"


def pair_files(pred_dir: Path, gt: Path, split: str | None = None, allow_missing: bool = False) -> Pairing:
    """Pair predictions with ground truth; missing/extra files are an InputError unless ``allow_missing``."""
    pred_dir, gt = storage.location(pred_dir), storage.location(gt)
    for folder, name in ((pred_dir, "prediction"), (gt, "ground-truth")):
        if not storage.is_dir(folder):
            raise InputError(f"{name} folder {folder} {_missing_reason(folder)}")
    voc_root = find_voc_root(gt)
    gt_dir = voc_root / "SegmentationClass" if voc_root is not None else gt
    preds = scan_images(pred_dir, "prediction")
    if not preds:
        raise InputError(f"no prediction images in {pred_dir}")
    gts = scan_images(gt_dir, "ground-truth")
    outside = 0
    if split is not None:
        ids = _split_ids(split, voc_root)
        lacking = [i for i in ids if i not in gts]
        if lacking:
            raise InputError(
                f"{len(lacking)} ids of split {split!r} have no ground-truth file in {gt_dir} ({_examples(lacking)})"
            )
        gts = {i: gts[i] for i in dict.fromkeys(ids)}
        outside = sum(1 for k in preds if k not in gts)
        preds = {k: v for k, v in preds.items() if k in gts}
    if not gts:
        raise InputError(f"no ground-truth images in {gt_dir}")
    keys = sorted(preds.keys() & gts.keys())
    missing = sorted(gts.keys() - preds.keys())
    extra = sorted(preds.keys() - gts.keys())
    pairing = Pairing(
        [Pair(k, preds[k], gts[k]) for k in keys], missing, extra, gt_dir,
        "voc" if voc_root is not None else "folder", split, outside, pred_dir,
    )  # fmt: skip
    if not keys:
        raise InputError(
            f"no prediction in {pred_dir} matches a ground-truth file in {gt_dir} by relative path and name "
            f"(predictions: {_examples(sorted(preds))}; ground truth: {_examples(sorted(gts))})"
        )
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} ground-truth images have no prediction ({_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} predictions have no ground truth ({_examples(extra)})")
        hint = f"; pass --allow-missing to score the {len(keys)} pairs that exist"
        if extra and voc_root is not None and split is None:
            hint += " (or --split val for a VOC layout)"
        elif missing and voc_root is not None and split is None:
            hint += " (or --split val to score the VOC val set)"
        raise InputError("; ".join(parts) + hint)
    return pairing
