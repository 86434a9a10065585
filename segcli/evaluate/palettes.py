"""Colour tables: decoding colour-coded ground truth (``--palette``) and colouring ``--remap-out`` pictures.

Named palettes map an RGB colour to a raw label value (the value a grayscale/index PNG would hold):

- ``voc``        the 256-entry PASCAL VOC palette (bit-interleaved colours; 255 = (224, 224, 192) void).
- ``camvid``     SegNet's CamVid colours for ids 0..10, black (0, 0, 0) = 11 unlabelled.
- ``cityscapes`` Cityscapes colours -> labelId 0..33 (first id wins for shared colours: all-black void ids give 0,
                 polegroup gives pole's 17). Use with ``--preset cityscapes27``.

A palette file holds one colour per line, ``R G B`` (value = line number among colour lines) or ``VALUE R G B``;
blank lines and ``#`` comments are skipped. Commas are accepted as separators.
"""

from __future__ import annotations

from pathlib import Path

from segcli.errors import InputError, UsageError

Colour = tuple[int, int, int]

CAMVID_COLOURS: tuple[Colour, ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
)  # fmt: skip

CITYSCAPES_COLOURS: tuple[Colour, ...] = (  # labelId 0..33
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81), (128, 64, 128),
    (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

NAMED_PALETTES = ("voc", "camvid", "cityscapes")


def voc_colours(n: int = 256) -> list[Colour]:
    """The PASCAL VOC palette (the same table segcli writes its masks with)."""
    from segcli.io.outputs import VOC_PALETTE

    return [tuple(VOC_PALETTE[3 * i: 3 * i + 3]) for i in range(n)]


def colour_table(name_or_file: str) -> tuple[tuple[int, Colour], ...]:
    """(raw value, colour) pairs for decoding RGB ground truth; the first value listed for a colour wins."""
    if name_or_file == "voc":
        pairs = list(enumerate(voc_colours()))
    elif name_or_file == "camvid":
        pairs = list(enumerate(CAMVID_COLOURS))
    elif name_or_file == "cityscapes":
        pairs = list(enumerate(CITYSCAPES_COLOURS))
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise UsageError(
                f"--palette {name_or_file!r} is neither a known palette ({', '.join(NAMED_PALETTES)}) nor a file"
            )
        pairs = _read_palette_file(path)
    seen: dict[Colour, int] = {}
    for value, colour in pairs:
        seen.setdefault(colour, value)
    return tuple((v, c) for c, v in seen.items())


def _read_palette_file(path: Path) -> list[tuple[int, Colour]]:
    pairs: list[tuple[int, Colour]] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read palette file {path}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if not text:
            continue
        try:
            nums = [int(t) for t in text]
        except ValueError:
            raise InputError(f"palette file {path}, line {lineno}: expected 'R G B' or 'VALUE R G B'") from None
        if len(nums) == 3:
            value, rgb = len(pairs), nums
        elif len(nums) == 4:
            value, rgb = nums[0], nums[1:]
        else:
            raise InputError(f"palette file {path}, line {lineno}: expected 'R G B' or 'VALUE R G B'")
        if not all(0 <= x <= 255 for x in rgb) or not 0 <= value <= 65535:
            raise InputError(f"palette file {path}, line {lineno}: values out of range")
        pairs.append((value, (rgb[0], rgb[1], rgb[2])))
    if not pairs:
        raise InputError(f"palette file {path} holds no colours")
    return pairs


def output_palette(name: str) -> list[int]:
    """A flat 768-value PIL palette for remapped predictions (class ids), by preset palette name."""
    colours = voc_colours()
    if name == "camvid":
        colours[: len(CAMVID_COLOURS)] = CAMVID_COLOURS
    elif name == "cityscapes27":
        nonvoid = CITYSCAPES_COLOURS[7:]
        colours[: len(nonvoid)] = nonvoid
    return [v for colour in colours for v in colour]
