"""Reading label images and turning raw ground-truth values into class ids.

- Predictions: pixel values are cluster ids 0..255. Mode ``P`` PNGs are read as their index values (never
  converted to colours), ``L``/``1``/16-bit/32-bit grayscale as their values. Colour images are refused.
- Ground truth: the same modes, plus colour-coded RGB(A) images when a palette is given (``--palette``).
  Raw values then go through the :class:`LabelSpec` lookup table: class id, ignored, or invalid (an error that
  names the file and the values, which usually means a wrong ``--preset``/``--num-classes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from segcli.io import storage
from segcli.errors import InputError, UsageError
from segcli.evaluate.config import EvaluationConfig
from segcli.evaluate.presets import PRESETS

MAX_RAW = 65536  # ground-truth values are read as at most 16-bit
NUM_PRED_IDS = 256  # prediction ids are 0..255


@dataclass(frozen=True)
class LabelSpec:
    """How ground-truth values become classes. Small and picklable: it travels to the worker processes."""

    num_classes: int
    ignore: int
    class_names: tuple[str, ...]
    preset: str | None = None
    raw_to_class: tuple[tuple[int, int], ...] | None = None  # None: identity on 0..num_classes-1
    colour_table: tuple[tuple[int, tuple[int, int, int]], ...] | None = None
    palette_name: str | None = None
    output_palette: str = "voc"

    @property
    def ignore_code(self) -> int:
        """Code of an ignored pixel after the lookup table (a column after the classes)."""
        return self.num_classes

    @property
    def invalid_code(self) -> int:
        return self.num_classes + 1

    def describe(self) -> str:
        what = f"preset {self.preset}" if self.preset else "custom labels"
        text = f"{what}: {self.num_classes} classes, ignore {self.ignore}"
        if self.raw_to_class is not None:
            text += " (and every unmapped value)"
        if self.palette_name:
            text += f"; colour ground truth decoded with palette {self.palette_name}"
        return text


def resolve_spec(config: EvaluationConfig) -> LabelSpec:
    """Check the label options and build the :class:`LabelSpec` (raises UsageError on bad values)."""
    from segcli.evaluate.palettes import colour_table

    table = None
    palette_name = None
    if config.palette is not None:
        table = colour_table(config.palette)
        palette_name = config.palette
    if config.preset is not None:
        preset = PRESETS.get(config.preset)
        if preset is None:
            raise UsageError(f"unknown --preset {config.preset!r}; choose one of {', '.join(PRESETS)}")
        if config.num_classes is not None and config.num_classes != preset.num_classes:
            raise UsageError(
                f"--num-classes {config.num_classes} contradicts --preset {preset.name} ({preset.num_classes} classes)"
            )
        if config.ignore is not None and config.ignore != preset.ignore:
            raise UsageError(f"--ignore {config.ignore} contradicts --preset {preset.name} (ignore {preset.ignore})")
        return LabelSpec(
            num_classes=preset.num_classes,
            ignore=preset.ignore,
            class_names=preset.class_names,
            preset=preset.name,
            raw_to_class=preset.raw_to_class,
            colour_table=table,
            palette_name=palette_name,
            output_palette=preset.output_palette,
        )
    if config.num_classes is None:
        raise UsageError("give --preset (voc, camvid, cityscapes27, cocostuff27) or --num-classes N")
    n = config.num_classes
    if not 1 <= n <= 65535:
        raise UsageError(f"--num-classes must be between 1 and 65535, not {n}")
    ignore = 255 if config.ignore is None else config.ignore
    if not 0 <= ignore < MAX_RAW:
        raise UsageError(f"--ignore must be between 0 and 65535, not {ignore}")
    if ignore < n:
        raise UsageError(f"--ignore {ignore} is a class id (classes are 0..{n - 1}); pick a value >= {n}")
    return LabelSpec(
        num_classes=n,
        ignore=ignore,
        class_names=tuple(str(i) for i in range(n)),
        colour_table=table,
        palette_name=palette_name,
    )


@lru_cache(maxsize=8)
def gt_lookup(spec: LabelSpec) -> np.ndarray:
    """uint16 table raw value -> class id, ``spec.ignore_code`` or ``spec.invalid_code``."""
    lut = np.full(MAX_RAW, spec.invalid_code, dtype=np.uint16)
    if spec.raw_to_class is None:
        lut[: spec.num_classes] = np.arange(spec.num_classes, dtype=np.uint16)
    else:
        lut[:256] = spec.ignore_code  # a remapping preset ignores every 8-bit value it does not map
        raw, cls = np.array(spec.raw_to_class, dtype=np.int64).T
        lut[raw] = cls
    lut[spec.ignore] = spec.ignore_code
    return lut


def open_label(path: Path, what: str):
    """Open a label image lazily (PIL), with a one-line error for unreadable files."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(storage.readable(path))
        img.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"cannot read {what} {path}: image too large, refused as a possible decompression bomb "
                         f"({' '.join(str(exc).split())})") from None
    except MemoryError:
        raise InputError(f"cannot read {what} {path}: not enough memory to decode it") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {what} {path}: {reason}") from None
    if img.width == 0 or img.height == 0:
        raise InputError(f"{what} {path} is empty (0 pixels)")
    return img


_INDEX_MODES = {"P", "L", "1", "I;16", "I;16L", "I;16B", "I;16N", "I"}


def label_array(img, path: Path, what: str, colour_table=None) -> np.ndarray:
    """Pixel values of an opened label image as a 2-D integer array (uint8, uint16 or int32)."""
    mode = img.mode
    if mode in ("PA", "LA"):
        img = img.getchannel(0)
        mode = img.mode
    if mode in _INDEX_MODES:
        arr = np.asarray(img)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        elif arr.dtype.byteorder == ">" or arr.dtype not in (np.uint8, np.uint16, np.int32):
            arr = arr.astype(np.int32)
        return arr
    if mode in ("RGB", "RGBA") and colour_table is not None:
        return decode_colours(np.asarray(img.convert("RGB") if mode == "RGBA" else img), colour_table, path, what)
    if mode in ("RGB", "RGBA"):
        if what == "prediction":
            raise InputError(
                f"prediction {path} is a colour ({mode}) image; evaluate needs label PNGs whose pixel values are "
                "cluster ids (mode P or L)"
            )
        raise InputError(
            f"ground truth {path} is a colour ({mode}) image; give --palette (voc, camvid, cityscapes or a file)"
        )
    raise InputError(f"{what} {path} has unsupported image mode {mode}; use 8-bit label PNGs (mode P or L)")


def decode_colours(rgb: np.ndarray, table, path: Path, what: str) -> np.ndarray:
    """Map every RGB colour to its raw value through the palette table; unknown colours are an error."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed.ravel(), return_inverse=True)
    known = {(r << 16) | (g << 8) | b: v for v, (r, g, b) in table}
    values = np.empty(len(colours), dtype=np.int32)
    for i, c in enumerate(colours.tolist()):
        v = known.get(c)
        if v is None:
            rgb_txt = f"({c >> 16}, {(c >> 8) & 255}, {c & 255})"
            raise InputError(f"{what} {path} has colour {rgb_txt}, which the palette does not list")
        values[i] = v
    return values[inverse].reshape(packed.shape)


def prediction_ids(arr: np.ndarray, path: Path) -> np.ndarray:
    """Prediction values as uint8 cluster ids (0..255), or a one-line error."""
    if arr.dtype == np.uint8:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= NUM_PRED_IDS:
        bad = hi if hi >= NUM_PRED_IDS else lo
        raise InputError(f"prediction {path} holds id {bad}; cluster ids must be 0..255")
    return arr.astype(np.uint8)


def gt_codes(arr: np.ndarray, spec: LabelSpec, path: Path) -> np.ndarray:
    """Ground-truth values -> class ids / ignore code / invalid code (uint16); negative or >16-bit: error."""
    if arr.dtype not in (np.uint8, np.uint16):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= MAX_RAW:
            raise InputError(f"ground truth {path} holds value {lo if lo < 0 else hi}, outside 0..65535")
        arr = arr.astype(np.uint16)
    return gt_lookup(spec)[arr]


def invalid_values_error(values, spec: LabelSpec, path: Path) -> InputError:
    """One-line error naming ground-truth values that are neither a class nor ignored."""
    bad = [int(v) for v in list(values)[:6]]
    hint = f"--preset {spec.preset}" if spec.preset else f"--num-classes {spec.num_classes} / --ignore {spec.ignore}"
    return InputError(
        f"ground truth {path} has values {', '.join(map(str, bad))} that are neither classes 0..{spec.num_classes - 1} "
        f"nor the ignore value {spec.ignore} (check {hint})"
    )
