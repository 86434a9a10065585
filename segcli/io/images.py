"""Finding and reading input images.

Two jobs, kept apart so that one bad file never stops a run:

* :func:`discover_images` turns what the user typed (a folder, a PASCAL VOC layout, a ``.txt`` list or a single
  image) into a deterministic list of :class:`ImageItem` (where to read, and the output key). It only looks at
  names: a corrupt file with an image extension is listed, and reading it decides.
* :func:`load_image` reads one file into an RGB ``uint8`` array in display orientation, bounded in memory, or
  raises :class:`~segcli.errors.BadImageError` (``"<path>: <reason>"``) so the caller can report and skip it.

Pixel conversions (every PIL mode ends as RGB):

* alpha (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key) is composited over **white**, so
  transparent areas become one flat colour (the image looks as it does in a browser) instead of whatever
  hidden colour the transparent pixels happen to store;
* 16/32-bit integer grey (``I;16``, ``I;16B``, ``I``) is scaled by the image maximum: values ``0..max`` map
  linearly to ``0..255`` (negative values, only possible in ``I``, shift the range to start at the minimum).
  Images whose values all fit in ``0..255`` are kept as they are. This gives full contrast for 10/12/16-bit
  data alike, never an all-white result;
* float (``F``): values within ``0..1`` are taken as normalised and multiplied by 255, anything else is
  min/max stretched; NaN becomes 0;
* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV`` use PIL's own conversion.

Multi-frame files (GIF, TIFF, APNG) use their first frame.

Inputs may live in an object store (``s3://bucket/prefix``, ``gs://...``; :mod:`segcli.io.storage`): a prefix is
listed like a folder (one recursive listing, same extension filter, hidden names skipped, same keys), a VOC
layout and a single image object too; each image is downloaded when it is read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from segcli.io import storage
from segcli.errors import BadImageError, InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

_VOC_SUBDIRS = (Path("."), Path("VOC2012"), Path("VOCdevkit") / "VOC2012")
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageItem:
    """One input image: ``path`` to read, and ``key``, the POSIX relative output name without extension
    (``"sub/dir/img"``), unique within one discovered dataset."""

    path: Path
    key: str


@dataclass
class LoadedImage:
    """``rgb``: ``(h, w, 3)`` uint8 in display orientation, possibly downscaled so that ``max(h, w) <= max_side``.
    ``original_size``: ``(H, W)`` of the full-resolution image in display orientation (the output mask size)."""

    rgb: np.ndarray
    original_size: tuple[int, int]


# --------------------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------------------


def _looked_for() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def discover_images(source: str | Path, split: str | None = None) -> list[ImageItem]:
    """List the images of ``source``, sorted by key.

    ``source`` may be:

    * **a folder**: searched recursively for files whose extension (any case) is in :data:`IMAGE_EXTENSIONS`.
      The key is the path relative to the folder, without extension (``sub/dir/img``). Hidden files and
      folders (name starting with ``.``) are skipped. Symlinked files are followed (a broken link with an image
      name is listed, so that reading it reports it). Symlinked folders are followed, but no folder is read
      twice: real folders are walked first, then symlinked ones in sorted order, and a symlink whose target was
      already walked is skipped; this also makes symlink cycles harmless.
    * **a PASCAL VOC layout**: a folder that has ``JPEGImages/`` and ``ImageSets/Segmentation/`` itself, or in
      ``VOC2012/`` or ``VOCdevkit/VOC2012/``. With ``split=None`` every image of ``JPEGImages/`` is listed; with
      ``split="val"`` (or any name) the ids of ``ImageSets/Segmentation/<split>.txt`` are listed. Keys are the
      VOC ids (``2007_000033``), matching ``SegmentationClass/`` names. Listed ids without an image file are
      kept (reading reports them).
    * **a ``.txt`` list**: one image path per line, relative to the list's folder or absolute; blank lines and
      lines starting with ``#`` are ignored, repeated paths are listed once. The key is the path relative to
      the list's folder when the image is inside it, otherwise the file's stem. Missing files are kept
      (reading reports them). Two entries that would still share a key are an :class:`InputError`.
    * **a single image file**: one item, keyed by its stem.

    Colliding names: when two files would get the same key (``a.jpg`` and ``a.png`` in one folder; compared
    case-insensitively, so outputs cannot clash on case-insensitive file systems either), *every* colliding
    file keeps its extension in the key (``a.jpg``, ``a.png``, giving outputs ``a.jpg.png`` and ``a.png.png``),
    so no output name depends on which file happens to sort first.

    ``split`` is only valid for a VOC layout (:class:`InputError` otherwise).

    An object-store URI (``s3://``, ``gs://``) is listed the same way (:func:`_discover_objects`).
    """
    if storage.is_uri(source):
        return _discover_objects(storage.location(source), split)
    src = Path(os.path.expanduser(str(source)))
    if not src.exists():
        if src.is_symlink():
            raise InputError(f"input is a broken symlink: {src}")
        what = "input list file" if src.suffix.lower() == ".txt" else "input folder"
        raise InputError(f"{what} not found: {src}")

    if src.is_dir():
        voc_root = _find_voc_root(src)
        if voc_root is not None:
            if split is None:
                items = _walk_folder(voc_root / "JPEGImages")
                where = voc_root / "JPEGImages"
            else:
                items = _voc_split_items(voc_root, split)
                where = voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"
        else:
            if split is not None:
                raise InputError(
                    f"--split {split!r} needs a PASCAL VOC folder (with JPEGImages/ and ImageSets/Segmentation/), "
                    f"but {src} is a plain folder"
                )
            items = _walk_folder(src)
            where = src
        if not items:
            raise InputError(f"no images found in {where} (looked for {_looked_for()})")
        return items

    storage.check_regular(src)  # a FIFO or a device given as the input: refused by name, never opened
    if src.suffix.lower() == ".txt":
        if split is not None:
            raise InputError(f"--split {split!r} only applies to a PASCAL VOC folder, not to the list file {src}")
        return _list_file_items(src)

    if src.suffix.lower() in IMAGE_EXTENSIONS:
        if split is not None:
            raise InputError(f"--split {split!r} only applies to a PASCAL VOC folder, not to the image {src}")
        return [ImageItem(src, src.stem)]

    raise InputError(
        f"input is neither a folder, a .txt list nor an image ({_looked_for()}): {src}"
    )


def _discover_objects(src: storage.ObjectPath, split: str | None) -> list[ImageItem]:
    """:func:`discover_images` for an object-store prefix, from one recursive listing: a plain folder (every
    image object below it, hidden names skipped, keys as for a local folder), a VOC layout, or one image.
    A ``.txt`` list must be local (it may name image URIs)."""
    suffix = src.suffix.lower()
    if suffix == ".txt":
        raise InputError(f"a list file must be a local file (its lines may be s3:// or gs:// URIs): {src}")
    files = storage.list_files(src)
    if not files:
        if suffix in IMAGE_EXTENSIONS and storage.is_file(src):
            if split is not None:
                raise InputError(f"--split {split!r} only applies to a PASCAL VOC folder, not to the image {src}")
            return [ImageItem(src, src.stem)]
        raise InputError(f"input folder not found: {src} (no objects under this prefix)")
    listed = set(files)
    for sub in ("", "VOC2012/", "VOCdevkit/VOC2012/"):
        if any(f.startswith(sub + "JPEGImages/") for f in files) and any(
                f.startswith(sub + "ImageSets/Segmentation/") for f in files):
            jpeg = sub + "JPEGImages/"
            if split is None:
                items = _object_items(src, [f for f in files if f.startswith(jpeg)], len(jpeg))
                if not items:
                    raise InputError(f"no images found in {src / jpeg} (looked for {_looked_for()})")
                return items
            if not split or "/" in split or "\\" in split or split.startswith("."):
                raise InputError(f"bad split name {split!r}")
            split_file = src / f"{sub}ImageSets/Segmentation/{split}.txt"
            if split_file.relative_to(src) not in listed:
                raise InputError(f"VOC split {split!r} not found: {split_file}")
            by_name = {f[len(jpeg):].lower(): f for f in files if f.startswith(jpeg)}
            items, seen = [], set()
            for lineno, image_id in _parse_list_text(storage.read_bytes(split_file), split_file):
                if os.path.isabs(image_id) or any(p in ("", ".", "..") for p in image_id.split("/")):
                    raise InputError(f"{split_file}:{lineno}: bad image id {image_id!r}")
                if image_id in seen:
                    continue
                seen.add(image_id)
                candidates = [f"{image_id}.jpg"] + [f"{image_id}{ext}" for ext in sorted(IMAGE_EXTENSIONS)]
                name = next((by_name[c.lower()] for c in candidates if c.lower() in by_name), f"{jpeg}{image_id}.jpg")
                items.append(ImageItem(src / name, image_id))
            if not items:
                raise InputError(f"no image ids listed in {split_file}")
            return sorted(items, key=lambda it: it.key)
    if split is not None:
        raise InputError(f"--split {split!r} needs a PASCAL VOC folder (with JPEGImages/ and ImageSets/Segmentation/), "
                         f"but {src} is a plain folder")
    items = _object_items(src, files, 0)
    if not items:
        raise InputError(f"no images found in {src} (looked for {_looked_for()})")
    return items


def _object_items(src: storage.ObjectPath, files: list[str], strip: int) -> list[ImageItem]:
    """Image items of listed object names (relative to ``src``; the first ``strip`` characters dropped from keys),
    filtered and keyed exactly as :func:`_walk_folder` does for a local folder."""
    found: list[tuple[str, str, str]] = []  # (name below src, key without extension, extension as written)
    _refuse_unmappable(src, files)
    for name in files:
        rel = name[strip:].split("/")
        if any(part.startswith(".") for part in rel):
            continue
        stem, ext = os.path.splitext(rel[-1])
        if ext.lower() not in IMAGE_EXTENSIONS or not stem:
            continue
        found.append((name, "/".join(rel[:-1] + [stem]), ext))
    keys = _disambiguate([(k, e) for _, k, e in found])
    return sorted((ImageItem(src / name, k) for (name, _, _), k in zip(found, keys)), key=lambda it: it.key)


def _refuse_unmappable(src: storage.ObjectPath, names: list[str]) -> None:
    """Object keys are names, not paths: ``d//e.png``, ``./e.png`` or ``a/../e.png`` name objects of their own,
    which no local-style output name (nor an ObjectPath, which normalises such parts) can stand for. An
    :class:`InputError` lists them before any work, instead of reading another object or dropping them."""
    bad = [n for n in names if storage.unmappable_key(n) and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if bad:
        shown = ", ".join(repr(str(src) + "/" + n) for n in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise InputError(f"{len(bad)} image object(s) under {src} have an empty, '.' or '..' part in their key and "
                         f"cannot be mapped to an output name: {shown}; rename them or list the others in a .txt file")


def _find_voc_root(src: Path) -> Path | None:
    for sub in _VOC_SUBDIRS:
        root = src / sub
        if (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Segmentation").is_dir():
            return root if sub != Path(".") else src
    return None


def _voc_split_items(voc_root: Path, split: str) -> list[ImageItem]:
    seg_dir = voc_root / "ImageSets" / "Segmentation"
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise InputError(f"bad split name {split!r}")
    split_file = seg_dir / f"{split}.txt"
    if not split_file.is_file():
        try:
            available = sorted(p.stem for p in seg_dir.glob("*.txt"))
        except OSError:
            available = []
        hint = f" (available: {', '.join(available)})" if available else ""
        raise InputError(f"VOC split {split!r} not found: {split_file}{hint}")
    lines = _read_list_lines(split_file)
    jpeg_dir = voc_root / "JPEGImages"
    items: list[ImageItem] = []
    seen: set[str] = set()
    for lineno, line in lines:
        image_id = line
        parts = image_id.split("/")
        if os.path.isabs(image_id) or any(p in ("", ".", "..") for p in parts):
            raise InputError(f"{split_file}:{lineno}: bad image id {image_id!r}")
        if image_id in seen:
            continue
        seen.add(image_id)
        path = jpeg_dir / f"{image_id}.jpg"
        if not path.exists():
            for ext in sorted(IMAGE_EXTENSIONS):
                for cand in (jpeg_dir / f"{image_id}{ext}", jpeg_dir / f"{image_id}{ext.upper()}"):
                    if cand.exists():
                        path = cand
                        break
                else:
                    continue
                break
        items.append(ImageItem(path, image_id))
    if not items:
        raise InputError(f"no image ids listed in {split_file}")
    return sorted(items, key=lambda it: it.key)


def _walk_folder(root: Path) -> list[ImageItem]:
    """Recursive walk; real folders first, then symlinked ones (each physical folder at most once)."""
    try:
        st = os.stat(root)
    except OSError as err:
        raise InputError(f"cannot read input folder {root}: {err.strerror or err}") from err
    visited: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    found: list[tuple[Path, str, str]] = []  # (path, key without extension, extension as written)
    pending_links: list[tuple[tuple[str, ...], Path]] = []

    def walk(directory: Path, rel: tuple[str, ...], is_root: bool) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if is_root:
                raise InputError(f"cannot read input folder {directory}: {err.strerror or err}") from err
            log.warning("skipping unreadable folder %s: %s", directory, err.strerror or err)
            return
        subdirs: list[tuple[os.DirEntry, tuple[str, ...]]] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_link = entry.is_symlink()
            except OSError:
                continue
            if is_dir:
                if is_link:
                    pending_links.append((rel + (name,), Path(entry.path)))
                else:
                    subdirs.append((entry, rel + (name,)))
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or not stem:
                continue
            # Every non-folder entry with an image name is listed, also a broken symlink, a FIFO or a device:
            # reading reports it by name and skips it (a FIFO is refused from a stat, never opened).
            found.append((Path(entry.path), "/".join(rel + (stem,)), ext))
        for entry, sub_rel in subdirs:
            try:
                sst = entry.stat()
            except OSError:
                continue
            ident = (sst.st_dev, sst.st_ino)
            if ident in visited:
                continue
            visited.add(ident)
            walk(Path(entry.path), sub_rel, False)

    walk(root, (), True)
    # Symlinked folders: after every real folder, in sorted order of their path; new ones found inside them are
    # queued and handled the same way.
    while pending_links:
        pending_links.sort(key=lambda x: x[0])
        rel, path = pending_links.pop(0)
        try:
            sst = os.stat(path)
        except OSError:
            continue
        ident = (sst.st_dev, sst.st_ino)
        if ident in visited:
            log.debug("not following %s again (already walked)", path)
            continue
        visited.add(ident)
        walk(path, rel, False)

    keys = _disambiguate([(k, e) for _, k, e in found])
    items = [ImageItem(p, k) for (p, _, _), k in zip(found, keys)]
    return sorted(items, key=lambda it: it.key)


def _disambiguate(bases: list[tuple[str, str]]) -> list[str]:
    """Keys for (key-without-extension, extension) pairs: every key that collides (case-insensitively) with
    another gets its extension appended; repeated until nothing changes (``a.jpg.png`` vs ``a.jpg``...)."""
    keys = [b for b, _ in bases]
    full = [b + e for b, e in bases]
    while True:
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k.casefold(), []).append(i)
        changed = False
        for members in groups.values():
            if len(members) > 1:
                for i in members:
                    if keys[i] != full[i]:
                        keys[i] = full[i]
                        changed = True
        if not changed:
            return keys


def _read_list_lines(list_file: Path) -> list[tuple[int, str]]:
    try:
        data = storage.read_bytes(list_file)
    except OSError as err:
        raise InputError(f"cannot read list file {list_file}: {err.strerror or err}") from err
    return _parse_list_text(data, list_file)


def _parse_list_text(data: bytes, list_file: Path | storage.ObjectPath) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a list file's bytes."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"bad list file {list_file}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if "\x00" in text:
        raise InputError(f"bad list file {list_file}: contains NUL bytes (is it a text file?)")
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append((lineno, line))
    return out


def _list_file_items(list_file: Path) -> list[ImageItem]:
    lines = _read_list_lines(list_file)
    base = os.path.abspath(list_file.parent)
    entries: list[tuple[Path, str, str, int]] = []  # path, key base, ext, line number
    seen: set[str] = set()
    for lineno, line in lines:
        if storage.is_uri(line):  # an object: keyed by its name, like a local file outside the list's folder
            if storage.unmappable_key(line.partition("://")[2].partition("/")[2]):
                raise InputError(f"{list_file}:{lineno}: the object key of {line!r} has an empty, '.' or '..' part: "
                                 "segcli would read another object; rename it")
            obj = storage.location(line)
            if str(obj) not in seen:
                seen.add(str(obj))
                stem, ext = os.path.splitext(obj.name)
                entries.append((obj, stem, ext, lineno) if stem else (obj, obj.name, "", lineno))
            continue
        expanded = os.path.expanduser(line)
        path_str = os.path.normpath(expanded if os.path.isabs(expanded) else os.path.join(base, expanded))
        if path_str in seen:
            continue
        seen.add(path_str)
        rel = os.path.relpath(path_str, base)
        stem, ext = os.path.splitext(os.path.basename(path_str))
        if not stem:  # ".jpg" or a folder-like entry: keep the whole name
            stem, ext = os.path.basename(path_str) or "image", ""
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir:
            key_base = stem
        else:
            parent = Path(rel).parent
            key_base = stem if parent == Path(".") else (parent / stem).as_posix()
        entries.append((Path(path_str), key_base, ext, lineno))
    if not entries:
        raise InputError(f"no image paths listed in {list_file}")
    keys = _disambiguate([(b, e) for _, b, e, _ in entries])
    first: dict[str, int] = {}
    for (_, _, _, lineno), key in zip(entries, keys):
        if key in first:
            raise InputError(
                f"{list_file}: lines {first[key]} and {lineno} would both be written as {key!r}; "
                "rename one of the files or move the list next to them"
            )
        first[key] = lineno
    items = [ImageItem(p, k) for (p, _, _, _), k in zip(entries, keys)]
    return sorted(items, key=lambda it: it.key)


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def load_image(path: Path, max_side: int | None = 2048) -> LoadedImage:
    """Read ``path`` as RGB ``uint8`` in display orientation (EXIF orientation applied).

    If ``max_side`` is set and the image is larger, it is downscaled (aspect kept, Lanczos) so that
    ``max(h, w) <= max_side``; JPEGs are decoded at a reduced DCT scale first (``Image.draft``), so a 48-MP photo
    never occupies full-resolution memory. ``original_size`` is always the full display size ``(H, W)``.
    The whole image is decoded (truncated files are errors, never padded with grey).

    Raises :class:`BadImageError` ``"<path>: <reason>"`` for missing, empty, truncated, corrupt, unsupported,
    or too large (decompression bomb) files. An object-store ``path`` is downloaded first (a missing or
    unreadable object is a BadImageError too).
    """
    path = path if storage.is_remote(path) else Path(path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")

    def bad(reason: str) -> BadImageError:
        return BadImageError(f"{path}: {reason}")

    if storage.is_remote(path):
        source = _download(path, bad)
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise bad("file not found" + (" (broken symlink)" if os.path.islink(path) else "")) from None
        except OSError as err:
            raise bad(f"cannot read: {err.strerror or err}") from None
        what = storage.not_regular(path)
        if what is not None:
            raise bad(f"not a regular file ({what})")
        if st.st_size == 0:
            raise bad("empty file (0 bytes)")
        source = path

    try:
        with Image.open(source) as im:
            return _decode(im, max_side)
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise bad(f"image too large, refused as a possible decompression bomb ({_one_line(err)})") from None
    except UnidentifiedImageError:
        raise bad("not an image, or a format PIL cannot read") from None
    except PermissionError as err:
        raise bad(f"cannot read: {err.strerror or err}") from None
    except MemoryError:
        raise bad("not enough memory to decode this image") from None
    except (OSError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ValueError) as err:
        text = _one_line(err)
        if "truncated" in text.lower():
            raise bad(f"truncated image file ({text})") from None
        if isinstance(err, ValueError) and ("mode" in text.lower() or "conversion" in text.lower()):
            raise bad(f"unsupported image: {text}") from None
        raise bad(f"corrupt or unsupported image data ({type(err).__name__}: {text})") from None


def _download(path: storage.ObjectPath, bad) -> io.BytesIO:  # noqa: ANN001
    """An image object's bytes, or ``bad(reason)`` raised (missing, unreadable, empty)."""
    try:
        data = storage.read_bytes(path)
    except InputError as exc:
        raise bad(getattr(exc, "reason", str(exc))) from None
    if not data:
        raise bad("empty file (0 bytes)")
    return io.BytesIO(data)


def _decode(im: Image.Image, max_side: int | None) -> LoadedImage:
    try:
        orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a readable image unusable
        orientation = 1
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    sw, sh = im.size  # stored orientation
    swap = method in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                      Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)
    W, H = (sh, sw) if swap else (sw, sh)

    target: tuple[int, int] | None = None  # (w, h) in display orientation
    if max_side is not None and max(W, H) > max_side:
        scale = max_side / max(W, H)
        target = (max(1, min(max_side, round(W * scale))), max(1, min(max_side, round(H * scale))))
        if im.format in ("JPEG", "MPO"):
            # Decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the target size.
            req = (max(1, math.ceil(sw * scale)), max(1, math.ceil(sh * scale)))
            im.draft(None, req)

    im.load()  # full decode: raises on truncated data
    img: Image.Image = im
    if method is not None:
        img = img.transpose(method)
    img = _to_rgb(img)
    if target is not None and img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    rgb = np.array(img, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:  # pragma: no cover - _to_rgb guarantees it
        raise ValueError(f"conversion produced shape {rgb.shape}")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), original_size=(H, W))


def _composite_white(rgba: Image.Image) -> Image.Image:
    a = np.asarray(rgba, dtype=np.uint8)
    rgb = a[..., :3].astype(np.uint16)
    alpha = a[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def _scale_to_u8(arr: np.ndarray, is_float: bool) -> np.ndarray:
    a = arr.astype(np.float64 if arr.dtype.itemsize > 2 else np.float32)
    if is_float:
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        out = a * 255.0
    elif not is_float and lo >= 0 and hi <= 255:
        out = a
    else:
        lo = min(lo, 0.0)
        if hi <= lo:
            return np.zeros(a.shape, np.uint8)
        out = (a - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))
        grey = _scale_to_u8(arr, is_float=(mode == "F"))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_white(img.convert("RGBA"))
    if mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
        return _composite_white(img.convert("RGBA"))
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


# The signatures of the formats of IMAGE_EXTENSIONS (PIL reads them by content, not by name).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"II+\x00", b"MM\x00+", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"Pf", b"PF")
_SNIFF = 16


def image_signature_problem(head: bytes) -> str | None:
    """Why the first bytes of a file cannot start an image of a supported format, or None when they can.

    Checked before an object is downloaded (and before a local file is hashed): a 400 MB video named
    ``.png`` is skipped after a 16-byte read, not after two full downloads."""
    if not head:
        return "empty file (0 bytes)"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image, or a format PIL cannot read"


def image_digest(path: Path) -> str:
    """:func:`content_digest` of an input image, after a look at its first bytes
    (:func:`image_signature_problem`): a file that cannot be an image is a BadImageError before it is read
    whole or downloaded."""
    try:
        problem = image_signature_problem(storage.read_head(path, _SNIFF))
    except InputError as exc:
        raise BadImageError(f"{path}: {getattr(exc, 'reason', exc)}") from None
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found" + (" (broken symlink)" if os.path.islink(path) else "")) from None
    except OSError as err:
        raise BadImageError(f"{path}: cannot read: {err.strerror or err}") from None
    if problem is not None:
        raise BadImageError(f"{path}: {problem}")
    return content_digest(path)


def content_digest(path: Path) -> str:
    """SHA-256 hex digest of the file's bytes (read in 1 MiB chunks); a cache key that follows content."""
    h = hashlib.sha256()
    if storage.is_remote(path):
        try:
            h.update(storage.read_bytes(path))
        except InputError as exc:
            raise BadImageError(f"{path}: {getattr(exc, 'reason', exc)}") from None
        return h.hexdigest()
    try:
        with storage.open_regular(path, BadImageError) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as err:
        raise BadImageError(f"{path}: cannot read: {err.strerror or err}") from None
    return h.hexdigest()
