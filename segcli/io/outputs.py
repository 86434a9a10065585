"""Writing results safely.

* Every file is written atomically (:func:`atomic_write`): a hidden ``.<name>.segcli-<pid>-<random>.tmp`` file in
  the target folder, fsynced, then renamed over the target. An interrupted run leaves either the old file, the
  new file, or such a leftover, never a half-written result that a resumed run would take as done. Only names of
  that pattern whose writer process is gone are ever swept (:func:`remove_stale_temporaries`): a user's own
  ``*.tmp`` files and the temporaries of a concurrent run on the same folder are left alone.
* Output folders this process created are removed again when the command fails before writing anything into
  them (:func:`remove_created_if_empty`): a refused run leaves no empty ``--out`` behind.
* Output names come from image keys and never leave the output folder (:func:`output_path`).
* Label maps are palette PNGs (mode ``P``): pixel value = class id, shown with the PASCAL VOC colour map.
* Every function also takes object-store locations (:class:`segcli.io.storage.ObjectPath`, ``s3://``/``gs://``):
  an object is uploaded whole in one request, which is atomic for readers (:func:`segcli.io.storage.put_atomic`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image

from segcli.io import storage
from segcli.errors import OutputError


def _voc_palette() -> bytes:
    """The PASCAL VOC colour map (``VOCdevkit``'s ``labelcolormap``): bits of the id interleaved into R, G, B."""
    out = bytearray()
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += bytes((r, g, b))
    return bytes(out)


# The highest class id a label PNG (8-bit palette) holds: every path that writes ids goes through label_ids.
MAX_LABEL_ID = 255


def label_ids(labels: np.ndarray) -> np.ndarray:
    """``labels`` as the uint8 ids of a label PNG, refusing ids that do not fit (``ValueError``) instead of
    letting a cast wrap them (256 would become 0, background). The one id-width check."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8:
        return labels
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > MAX_LABEL_ID):
        raise ValueError(f"class ids {int(labels.min())}..{int(labels.max())} do not fit a label PNG (0..{MAX_LABEL_ID})")
    return labels.astype(np.uint8)


VOC_PALETTE: bytes = _voc_palette()
PALETTE_RGB: np.ndarray = np.frombuffer(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)  # (256, 3): colour of id i
_PALETTE_RGB = PALETTE_RGB
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


# Folders prepare_output_dir created in this process (outermost first), for remove_created_if_empty.
_CREATED: list[Path] = []
# The name of every temporary segcli writes: ".<target>.segcli-<pid>-<random>.tmp" (see _temp_pid).
TEMP_TAG = ".segcli-"
_TEMP_NAME = re.compile(r"^\..*\.segcli-(\d+)-[A-Za-z0-9_]+\.tmp$")


def _create_folder(out: Path) -> None:
    """``mkdir -p out``, remembering each folder it created."""
    missing = []
    p = out
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    _CREATED.extend(reversed(missing))


def remove_created_if_empty() -> None:
    """Remove the output folders this process created that are still empty (innermost first): called when a
    command fails, so that a refused run (bad model, --prior, --device...) leaves no empty --out behind."""
    while _CREATED:
        folder = _CREATED.pop()
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            pass


def forget_created() -> None:
    """The command succeeded: its folders are results, never removed."""
    _CREATED.clear()


def prepare_output_dir(out_dir: str | Path | storage.ObjectPath) -> Path | storage.ObjectPath:
    """Create ``out_dir`` (and parents) if needed, check that files can be created in it, return it resolved.

    :class:`OutputError` if it exists as a file, cannot be created, or is not writable. An object-store prefix
    needs no creation: a probe object is written and deleted under it (missing bucket, no credentials, no
    write access: one line, before any work).
    """
    if storage.is_uri(out_dir):
        out = storage.location(out_dir)
        storage.check_writable(out)
        return out
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder is a file: {out}")
    try:
        _create_folder(out)
    except FileExistsError:
        raise OutputError(f"cannot create output folder {out}: a file is in the way") from None
    except OSError as err:
        raise OutputError(f"cannot create output folder {out}: {_reason(err)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".segcli-write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"output folder is not writable: {out} ({_reason(err)})") from None
    return out.resolve()


def check_file_destination(path: Path, option: str, create: bool = False) -> None:
    """A single output file (``evaluate --json/--plot``) goes into an existing folder, or into a new folder
    whose own parent exists (as ``mkdir`` without ``-p``; with ``create``, that folder is made). A longer
    missing chain is a typo to report (:class:`OutputError`), not folders to create."""
    path = Path(os.path.expanduser(str(path)))
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    if folder.is_dir():
        return
    if os.path.lexists(folder):
        raise OutputError(f"{option} {path}: {folder} is a file, not a folder")
    if not folder.parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {folder.parent} does not exist (segcli creates at most "
                          "the file's own folder)")
    if create:
        try:
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create folder {folder}: {_reason(err)}") from None


def output_path(out_dir: Path, key: str, suffix: str = ".png") -> Path:
    """``out_dir / (key + suffix)``, with its parent folders created.

    :class:`OutputError` for keys that are empty, absolute, contain empty, ``.`` or ``..`` parts, or whose path
    would land outside ``out_dir`` (for example through a symlinked subfolder planted in the output); the check
    is made before any folder is created, so nothing is ever created outside ``out_dir``.
    """
    if not isinstance(key, str) or not key:
        raise OutputError(f"refusing empty output name {key!r}")
    if "\x00" in key or "\x00" in suffix or "/" in suffix:
        raise OutputError(f"refusing output name {key + suffix!r}: bad character")
    if key.startswith("/") or os.path.isabs(key) or (len(key) > 1 and key[1] == ":"):
        raise OutputError(f"refusing absolute output name {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OutputError(f"refusing output name {key!r}: empty, '.' or '..' path parts")
    if storage.is_remote(out_dir):  # no folders and no symlinks in an object store: the checked name is the path
        return out_dir.joinpath(*parts[:-1], parts[-1] + suffix)
    root = Path(out_dir).resolve()

    def inside(p: Path) -> bool:
        return p == root or root in p.parents

    current = root
    for part in parts[:-1]:
        current = current / part
        if os.path.lexists(current):
            if not inside(current.resolve()):
                raise OutputError(f"refusing output path {current}: it leads outside the output folder {root}")
            if not current.is_dir():
                raise OutputError(f"cannot write under {current}: it is a file, not a folder")
        else:
            try:
                current.mkdir()
            except FileExistsError:
                if not current.is_dir() or not inside(current.resolve()):
                    raise OutputError(f"cannot create folder {current}") from None
            except OSError as err:
                raise OutputError(f"cannot create folder {current}: {_reason(err)}") from None
    target = current / (parts[-1] + suffix)
    if not inside(target.resolve()):
        raise OutputError(f"refusing output path {target}: it leads outside the output folder {root}")
    if target.is_dir():
        raise OutputError(f"cannot write {target}: a folder of that name exists")
    return target


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a hidden temp file in the same folder (``.<name>.*.tmp``),
    which is flushed, fsynced and renamed over ``path``. On any exception the temp file is removed and the
    exception re-raised (``OSError`` as :class:`OutputError` naming the file); ``path`` is left untouched.
    An object-store ``path`` is uploaded whole once ``write`` has finished (:func:`segcli.io.storage.put_atomic`).
    """
    if storage.is_remote(path):
        storage.put_atomic(path, write)
        return
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}{TEMP_TAG}{os.getpid()}-", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            try:
                os.fchmod(f.fileno(), _FILE_MODE)
            except (AttributeError, OSError):  # pragma: no cover - not on every platform
                pass
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(f"cannot write {path}: {_reason(err)}") from err
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels array is empty")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"label values must be in 0..255 for a palette PNG, got {lo}..{hi}")
    return labels.astype(np.uint8, copy=False)


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """Save an ``(H, W)`` integer array of class ids (0..255) as a mode ``P`` PNG with :data:`VOC_PALETTE`,
    atomically. ``ValueError`` for other shapes, non-integer dtypes or values outside 0..255."""
    arr = _check_labels(labels)
    im = Image.fromarray(np.ascontiguousarray(arr))  # mode L
    im.putpalette(VOC_PALETTE)  # -> mode P, pixel values unchanged
    atomic_write(storage.location(path), lambda f: im.save(f, format="PNG"))


def read_label_png(path: Path) -> np.ndarray:
    """The pixel values (class ids) of a palette or greyscale PNG as ``uint8`` (palette not applied)."""
    with Image.open(storage.readable(storage.location(path))) as im:
        im.load()
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: not a label PNG (mode {im.mode}, expected P or L)")
        return np.array(im, dtype=np.uint8)


def overlay_image(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5, legend=None,
                  colours: np.ndarray | None = None, skip: int = 0) -> Image.Image:
    """The picture of :func:`save_overlay` as a PIL image: ``colours[id]`` (default the VOC palette of the label
    PNGs) blended over ``rgb``; pixels of id ``skip`` (the background, 0) are left as they are; boundaries in the
    full colour. ``legend`` (a :class:`segcli.io.legend.Legend`): draw the ids present (all but ``skip``) with
    their colours and names in the top-left corner, unless ``legend.show`` is false."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    lab = _check_labels(labels)
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"rgb must be an (h, w, 3) array, got shape {img.shape}")
    img = np.ascontiguousarray(img[..., :3].astype(np.uint8, copy=False))
    H, W = lab.shape
    if img.shape[:2] != (H, W):
        img = np.asarray(Image.fromarray(img).resize((W, H), Image.Resampling.BILINEAR))

    table = _PALETTE_RGB if colours is None else np.asarray(colours, dtype=np.uint8).reshape(256, 3)
    colour = table[lab].astype(np.float32)
    fg = lab != skip
    out = img.astype(np.float32)
    a = float(alpha)
    out[fg] = (1.0 - a) * out[fg] + a * colour[fg]

    edge = _boundaries(lab, width=max(1, round(max(H, W) / 400))) & fg
    out[edge] = colour[edge]
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if legend is not None and legend.show:
        from segcli.io.legend import draw_legend

        present = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
        draw_legend(result, [int(i) for i in present if i != skip], legend, table)
    return result


def save_overlay(path: Path, rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5, legend=None) -> None:
    """A picture for people: class colours (VOC palette) blended over the image with weight ``alpha``; background
    (id 0) is left as it is; region boundaries are drawn in the full class colour. ``rgb`` is resized to the
    labels' size when they differ. With ``legend`` (:class:`segcli.io.legend.Legend`), the ids present are listed
    with their colour and name in the top-left corner. JPEG when ``path`` ends in ``.jpg``/``.jpeg``, PNG
    otherwise; atomic."""
    result = overlay_image(rgb, labels, alpha, legend)
    path = storage.location(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        atomic_write(path, lambda f: result.save(f, format="JPEG", quality=90))
    else:
        atomic_write(path, lambda f: result.save(f, format="PNG"))


def _boundaries(lab: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels (4-neighbour shifts) of a pixel with a different label."""
    edge = np.zeros(lab.shape, dtype=bool)
    for d in range(1, width + 1):
        diff_v = lab[d:, :] != lab[:-d, :]
        edge[d:, :] |= diff_v
        edge[:-d, :] |= diff_v
        diff_h = lab[:, d:] != lab[:, :-d]
        edge[:, d:] |= diff_h
        edge[:, :-d] |= diff_h
    return edge


def is_complete_png(path: Path) -> bool:
    """True when ``path`` is a PNG that ends with its IEND chunk and decodes fully (a finished result).

    An object is checked by its last bytes only (one ranged read, no download): objects are published whole,
    so one that ends with IEND was written completely.
    """
    if storage.is_remote(path):
        return storage.read_tail(path, len(_PNG_END)) == _PNG_END
    path = Path(path)
    try:
        if not path.is_file():
            return False
        size = path.stat().st_size
        if size < 8 + len(_PNG_END):
            return False
        with open(path, "rb") as f:
            f.seek(size - len(_PNG_END))
            if f.read() != _PNG_END:
                return False
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not done, redo it"
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user holds that id
        return True
    return True


def _stale_temporary(p: Path) -> bool:
    """Whether ``p`` is a temporary of :func:`atomic_write` whose writer process no longer runs."""
    m = _TEMP_NAME.match(p.name)
    return m is not None and not _pid_alive(int(m.group(1)))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the leftovers of killed writers below ``folder`` (``.<name>.segcli-<pid>-*.tmp`` of a process that is
    gone); returns how many.

    SIGKILL leaves no chance to clean up, so a restarted run sweeps them before writing anything, and a run
    whose worker processes were stopped (Ctrl-C) sweeps theirs before it exits. Only names segcli generates
    are considered (a user's own hidden ``*.tmp`` files stay), and only those of dead processes (a concurrent
    run's temporaries stay). An object-store folder has none: nothing is staged there.
    """
    if storage.is_remote(folder):
        return 0
    removed = 0
    for p in Path(folder).rglob(f".*{TEMP_TAG}*.tmp"):
        if _stale_temporary(p) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    return removed



def check_apart_from_inputs(outputs: dict[str, Path | None], input_dirs: list[Path], input_files: list[Path],
                            output_files: dict[str, Path | None] | None = None) -> None:
    """Refuse (:class:`UsageError`, exit 2) any output that could replace a user's input.

    ``outputs`` are folders segcli writes into (``--out``, ``--overlay``, ``--masks``, ``--cache``): none may
    be, contain or lie inside an input folder (``input_dirs``: the image folder, ``--features``), nor contain
    an input file (``input_files``: every image, list file, weights or model file). ``output_files`` (the
    model file of ``cluster-dataset --out``) may neither be an input file nor lie inside an input folder.
    Paths are compared resolved, so symlinks cannot hide an overlap. Nothing is created before this check.
    Object-store locations are compared by their canonical URI (``s3a://`` is ``s3://``, ``gcs://`` is
    ``gs://``) and prefix; a local path never overlaps an object.
    """
    from segcli.errors import UsageError

    def real(p: Path | storage.ObjectPath) -> Path | storage.ObjectPath:
        if storage.is_uri(p):
            return storage.location(p)
        return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()

    dirs = [real(d) for d in input_dirs]
    files = {real(f) for f in input_files}
    file_parents: set[Path] = set()
    for f in files:
        file_parents.update(f.parents)
    for option, path in outputs.items():
        if path is None:
            continue
        o = real(path)
        for d in dirs:
            if o == d or d in o.parents or o in d.parents:
                how = "is" if o == d else ("lies inside" if d in o.parents else "contains")
                raise UsageError(f"{option} {path} {how} the input folder {d}: segcli never writes among its "
                                 "inputs; choose a folder outside it")
        if o in file_parents or o in files:
            inside = sorted((f for f in files if o in f.parents or o == f), key=str)[0]
            raise UsageError(f"{option} {path} holds the input {inside}: segcli never writes among its inputs; "
                             "choose a folder outside it")
    for option, path in (output_files or {}).items():
        if path is None:
            continue
        o = real(path)
        if o in files or any(d == o or d in o.parents for d in dirs):
            raise UsageError(f"{option} {path} is an input or lies in an input folder: segcli never writes among "
                             "its inputs; choose a path outside them")
