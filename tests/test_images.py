"""Discovery and reading of input images (segcli.io.images). Every test builds its own inputs in tmp_path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from segcli.errors import BadImageError, InputError
from segcli.io.images import (
    IMAGE_EXTENSIONS,
    ImageItem,
    LoadedImage,
    content_digest,
    discover_images,
    load_image,
)

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, size=(8, 6), color=(200, 30, 40), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _keys(items):
    return [it.key for it in items]


# ---------------------------------------------------------------------------------------------------- discovery


def test_extensions_constant():
    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
    )


def test_nested_folders_sorted_and_keyed(tmp_path):
    _img(tmp_path / "b.png")
    _img(tmp_path / "a" / "z.jpg")
    _img(tmp_path / "a" / "deep" / "er" / "x.JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "data.npy").write_bytes(b"\x93NUMPY")
    items = discover_images(tmp_path)
    assert _keys(items) == ["a/deep/er/x", "a/z", "b"]
    assert all(isinstance(it, ImageItem) for it in items)
    assert items[0].path == tmp_path / "a" / "deep" / "er" / "x.JPEG"
    # deterministic
    assert discover_images(str(tmp_path)) == items


def test_hidden_files_and_folders_skipped(tmp_path):
    _img(tmp_path / "ok.png")
    _img(tmp_path / ".hidden.png")
    _img(tmp_path / ".cache" / "inside.png")
    _img(tmp_path / "sub" / ".DS_img.jpg")
    assert _keys(discover_images(tmp_path)) == ["ok"]


def test_corrupt_file_with_image_extension_is_listed(tmp_path):
    (tmp_path / "broken.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    assert _keys(discover_images(tmp_path)) == ["broken", "empty"]


def test_symlinked_file_and_folder_followed(tmp_path):
    outside = tmp_path / "outside"
    _img(outside / "photos" / "p.png")
    _img(outside / "single.jpg")
    data = tmp_path / "data"
    _img(data / "real.png")
    (data / "linked_file.jpg").symlink_to(outside / "single.jpg")
    (data / "linked_dir").symlink_to(outside / "photos", target_is_directory=True)
    items = discover_images(data)
    assert _keys(items) == ["linked_dir/p", "linked_file", "real"]
    assert load_image(items[1].path).rgb.shape == (6, 8, 3)


def test_symlink_cycle_and_duplicate_folder_link(tmp_path):
    data = tmp_path / "data"
    _img(data / "a" / "img.png")
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)  # cycle back to the root
    (data / "a" / "self").symlink_to(data / "a", target_is_directory=True)  # cycle to itself
    (data / "0_alias").symlink_to(data / "a", target_is_directory=True)  # sorts before 'a': real folder still wins
    items = discover_images(data)
    assert _keys(items) == ["a/img"]


def test_broken_symlink_listed_then_reported(tmp_path):
    _img(tmp_path / "good.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    items = discover_images(tmp_path)
    assert _keys(items) == ["dangling", "good"]
    with pytest.raises(BadImageError, match="dangling.png: file not found"):
        load_image(items[0].path)


def test_duplicate_stems_all_keep_extension(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "a.png")
    _img(tmp_path / "A.bmp")  # collides case-insensitively too
    _img(tmp_path / "b.png")
    _img(tmp_path / "sub" / "a.png")  # other folder: no collision
    items = discover_images(tmp_path)
    assert _keys(items) == ["A.bmp", "a.jpg", "a.png", "b", "sub/a"]
    assert len({it.key for it in items}) == len(items)
    by_key = {it.key: it.path.name for it in items}
    assert by_key["a.jpg"] == "a.jpg" and by_key["a.png"] == "a.png"


def test_duplicate_stem_second_round(tmp_path):
    # 'a.jpg' and 'a.png' become keys 'a.jpg'/'a.png'; then 'a.jpg.png' (stem 'a.jpg') collides and keeps its ext
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "a.png")
    _img(tmp_path / "a.jpg.png")
    keys = _keys(discover_images(tmp_path))
    assert sorted(keys) == ["a.jpg", "a.jpg.png", "a.png"]


def _voc(root: Path, ids_all, splits):
    jp = root / "JPEGImages"
    for i in ids_all:
        _img(jp / f"{i}.jpg")
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for name, ids in splits.items():
        (seg / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    _img(root / "SegmentationClass" / "2007_000001.png")


def test_voc_layout_with_split(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _voc(voc, ["2007_000001", "2007_000002", "2008_000003"], {"val": ["2008_000003", "2007_000001"],
                                                               "train": ["2007_000002"]})
    for src in (tmp_path, tmp_path / "VOCdevkit", voc):
        items = discover_images(src, split="val")
        assert _keys(items) == ["2007_000001", "2008_000003"]
        assert items[0].path == voc / "JPEGImages" / "2007_000001.jpg"
        # split=None: every JPEGImages image, never the SegmentationClass PNGs
        assert _keys(discover_images(src)) == ["2007_000001", "2007_000002", "2008_000003"]
    with pytest.raises(InputError, match=r"split 'test' not found.*available: train, val"):
        discover_images(tmp_path, split="test")


def test_voc_split_missing_image_is_kept(tmp_path):
    _voc(tmp_path, ["x1"], {"val": ["x1", "missing_id"]})
    items = discover_images(tmp_path, split="val")
    assert _keys(items) == ["missing_id", "x1"]
    with pytest.raises(BadImageError, match="missing_id.jpg: file not found"):
        load_image(items[0].path)


def test_split_on_plain_folder_is_error(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(InputError, match="VOC"):
        discover_images(tmp_path, split="val")


def test_list_file(tmp_path):
    base = tmp_path / "set"
    _img(base / "imgs" / "one.png")
    _img(base / "two.jpg")
    outside = _img(tmp_path / "elsewhere" / "three.png")
    lst = base / "list.txt"
    lst.write_text(
        "# my images\n"
        "\n"
        "imgs/one.png\n"
        f"  {outside}  \n"
        "two.jpg\r\n"
        "./imgs/one.png\n"  # repeat of line 3: listed once
        "missing/four.png\n"  # missing: listed, reported when read
    )
    items = discover_images(lst)
    assert _keys(items) == ["imgs/one", "missing/four", "three", "two"]
    assert {it.key: it.path for it in items}["three"] == outside
    with pytest.raises(BadImageError, match="four.png: file not found"):
        load_image(items[1].path)
    with pytest.raises(InputError, match="split"):
        discover_images(lst, split="val")


def test_list_file_colliding_outside_names(tmp_path):
    a = _img(tmp_path / "a" / "x.png")
    b = _img(tmp_path / "b" / "x.png")
    lst = tmp_path / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text(f"{a}\n{b}\n")
    with pytest.raises(InputError, match="lines 1 and 2"):
        discover_images(lst)


def test_bad_list_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no image paths listed"):
        discover_images(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(InputError, match="bad list file"):
        discover_images(binary)


def test_missing_and_empty_input_messages(tmp_path):
    with pytest.raises(InputError, match=r"^input folder not found: .*nope$"):
        discover_images(tmp_path / "nope")
    with pytest.raises(InputError, match="input list file not found"):
        discover_images(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    _img(tmp_path / "empty" / ".hidden.png")
    with pytest.raises(InputError, match=r"no images found in .*empty \(looked for .*\.jpg.*\.png") as ei:
        discover_images(tmp_path / "empty")
    assert "\n" not in str(ei.value)


def test_single_image_and_other_file(tmp_path):
    p = _img(tmp_path / "photo.png")
    assert discover_images(p) == [ImageItem(p, "photo")]
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="neither a folder"):
        discover_images(other)


def test_non_ascii_and_space_names(tmp_path):
    p = _img(tmp_path / "fotos é" / "straße café 1.png", color=(1, 2, 3))
    items = discover_images(tmp_path)
    assert _keys(items) == ["fotos é/straße café 1"]
    li = load_image(items[0].path)
    assert li.rgb[0, 0].tolist() == [1, 2, 3]
    assert len(content_digest(p)) == 64


# ---------------------------------------------------------------------------------------------------- bad files


def _jpeg_bytes(size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(size=(64, 48)) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a picture\n" * 10, "not an image"),
        ("trunc.jpg", None, "truncated"),
        ("trunc.png", None, "truncated"),
    ],
)
def test_bad_files_raise_bad_image_error(tmp_path, name, data, reason):
    if name == "trunc.jpg":
        full = _jpeg_bytes()
        data = full[: len(full) // 2]
    elif name == "trunc.png":
        full = _png_bytes()
        data = full[: len(full) // 2]
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(BadImageError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ")
    assert reason in msg
    assert "\n" not in msg
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImageError, match="not a regular file"):
        load_image(tmp_path / "dir.png")


def test_decompression_bomb(tmp_path, monkeypatch):
    p = _img(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2 x limit -> refused
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(p)


# ---------------------------------------------------------------------------------------------------- modes


def _check(li: LoadedImage, hw):
    assert isinstance(li, LoadedImage)
    assert li.rgb.dtype == np.uint8 and li.rgb.shape == (*hw, 3)
    assert li.original_size == hw
    assert li.rgb.flags["C_CONTIGUOUS"]


def test_mode_L(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8)).save(p)
    li = load_image(p)
    _check(li, (2, 2))
    assert li.rgb[..., 0].tolist() == [[0, 100], [200, 255]]
    assert (li.rgb[..., 0] == li.rgb[..., 2]).all()


def test_mode_LA_composited_over_white(tmp_path):
    p = tmp_path / "la.png"
    arr = np.zeros((2, 2, 2), np.uint8)
    arr[..., 0] = 50
    arr[..., 1] = [[255, 0], [128, 255]]
    Image.frombytes("LA", (2, 2), arr.tobytes()).save(p)
    li = load_image(p)
    _check(li, (2, 2))
    assert li.rgb[0, 0].tolist() == [50, 50, 50]  # opaque
    assert li.rgb[0, 1].tolist() == [255, 255, 255]  # transparent -> white
    assert 140 <= li.rgb[1, 0, 0] <= 160  # half: (50 + 255) / 2


def test_mode_P(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (4, 3))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(p)
    li = load_image(p)
    _check(li, (3, 4))
    assert li.rgb[1, 1].tolist() == [10, 200, 30]
    assert li.rgb[0, 0].tolist() == [0, 0, 0]


def test_mode_P_with_transparency_gif_and_png(tmp_path):
    for name in ("t.png", "t.gif"):
        p = tmp_path / name
        im = Image.new("P", (4, 3), 0)
        im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        im.putpixel((1, 1), 1)
        im.save(p, transparency=0)
        li = load_image(p)
        _check(li, (3, 4))
        assert li.rgb[0, 0].tolist() == [255, 255, 255], name  # transparent index -> white, not black
        assert li.rgb[1, 1].tolist() == [10, 200, 30], name


def test_mode_RGBA(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., :3] = (0, 0, 0)  # hidden colour of transparent pixels is black
    arr[0, 0] = (10, 20, 30, 255)
    Image.fromarray(arr).save(p)
    li = load_image(p)
    _check(li, (2, 2))
    assert li.rgb[0, 0].tolist() == [10, 20, 30]
    assert li.rgb[1, 1].tolist() == [255, 255, 255]


def test_mode_CMYK_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    li = load_image(p)
    _check(li, (16, 16))
    r, g, b = li.rgb[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_mode_I16_png_has_contrast(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(arr).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")  # really stored as 16-bit
    li = load_image(p)
    _check(li, (32, 64))
    g = li.rgb[..., 0]
    assert g.min() == 0 and g.max() == 255
    assert 100 < g.mean() < 155  # a ramp, not all-white
    assert len(np.unique(g)) > 200


def test_mode_I16_12bit_data_stretched(tmp_path):
    p = tmp_path / "12bit.png"
    arr = np.zeros((8, 8), np.uint16)
    arr[:, 4:] = 4095
    Image.fromarray(arr).save(p)
    li = load_image(p)
    assert li.rgb[0, 0, 0] == 0 and li.rgb[0, 7, 0] == 255


def test_mode_48bit_rgb_png(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = 4, 5
    arr = np.zeros((h, w, 3), ">u2")
    arr[..., 0] = 65535
    arr[..., 1] = np.arange(w) * 16000
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    p = tmp_path / "rgb48.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    li = load_image(p)
    _check(li, (h, w))
    assert li.rgb[0, :, 0].tolist() == [255] * w
    assert li.rgb[0, :, 1].tolist() == [0, 62, 125, 187, 250]


def test_mode_I32_and_F_tiff(tmp_path):
    pi = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 1000], [-1000, 100000]], np.int32)).save(pi)
    li = load_image(pi)
    _check(li, (2, 2))
    assert li.rgb[1, 0, 0] == 0 and li.rgb[1, 1, 0] == 255
    pf = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, np.nan]], np.float32)).save(pf)
    lf = load_image(pf)
    _check(lf, (2, 2))
    assert lf.rgb[..., 0].tolist() == [[0, 128], [255, 0]]


def test_mode_1_bilevel(tmp_path):
    p = tmp_path / "bw.png"
    im = Image.new("1", (5, 4), 0)
    im.putpixel((2, 1), 1)
    im.save(p)
    li = load_image(p)
    _check(li, (4, 5))
    assert li.rgb[1, 2].tolist() == [255, 255, 255]
    assert li.rgb[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".ppm", ".pgm", ".tiff", ".gif"])
def test_other_formats(tmp_path, ext):
    p = tmp_path / f"x{ext}"
    mode = "L" if ext == ".pgm" else "RGB"
    im = Image.new(mode, (7, 5), 90 if mode == "L" else (90, 90, 90))
    im.save(p, **({"lossless": True} if ext == ".webp" else {}))
    li = load_image(p)
    _check(li, (5, 7))
    assert abs(int(li.rgb[2, 3, 0]) - 90) <= 2


def test_one_by_one(tmp_path):
    p = _img(tmp_path / "dot.png", size=(1, 1), color=(9, 8, 7))
    li = load_image(p, max_side=1024)
    _check(li, (1, 1))
    assert li.rgb[0, 0].tolist() == [9, 8, 7]


# ---------------------------------------------------------------------------------------------------- EXIF


def _exif_jpeg(path: Path, orientation: int) -> None:
    # stored 60 wide x 40 high, grey, with a red 20x20 block in the stored top-left corner
    arr = np.full((40, 60, 3), 128, np.uint8)
    arr[:20, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)


def _is_red(px) -> bool:
    r, g, b = (int(v) for v in px)
    return r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    "orientation,corner",
    [
        (1, (0, 0)),  # no change: top-left
        (6, (0, -1)),  # rotate 90 CW to display: stored top-left -> top-right
        (8, (-1, 0)),  # rotate 90 CCW to display: stored top-left -> bottom-left
        (3, (-1, -1)),  # 180
    ],
)
def test_exif_orientation(tmp_path, orientation, corner):
    p = tmp_path / f"o{orientation}.jpg"
    _exif_jpeg(p, orientation)
    li = load_image(p)
    expected = (60, 40) if orientation in (6, 8) else (40, 60)
    _check(li, expected)
    h, w = expected
    cy = 5 if corner[0] == 0 else h - 6
    cx = 5 if corner[1] == 0 else w - 6
    assert _is_red(li.rgb[cy, cx])
    # the other three corners are grey
    for oy in (5, h - 6):
        for ox in (5, w - 6):
            if (oy, ox) != (cy, cx):
                assert not _is_red(li.rgb[oy, ox])


def test_exif_orientation_with_downscale(tmp_path):
    p = tmp_path / "o6.jpg"
    _exif_jpeg(p, 6)
    li = load_image(p, max_side=30)
    assert li.original_size == (60, 40)
    assert li.rgb.shape == (30, 20, 3)
    assert _is_red(li.rgb[2, -3])


# ---------------------------------------------------------------------------------------------------- size


def test_downscale_keeps_aspect_and_original_size(tmp_path):
    p = _img(tmp_path / "wide.png", size=(300, 100))
    li = load_image(p, max_side=120)
    assert li.rgb.shape == (40, 120, 3)
    assert li.original_size == (100, 300)
    full = load_image(p, max_side=None)
    assert full.rgb.shape == (100, 300, 3)
    small = load_image(p, max_side=300)
    assert small.rgb.shape == (100, 300, 3)
    with pytest.raises(ValueError):
        load_image(p, max_side=0)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("huge") / "huge 8000x6000.jpg"
    im = Image.new("RGB", (8000, 6000), (30, 120, 200))
    im.paste((250, 250, 0), (0, 0, 4000, 3000))  # yellow top-left quarter
    im.save(p, quality=75)
    del im
    return p


def test_huge_jpeg_tracemalloc(huge_jpeg):
    tracemalloc.start()
    try:
        li = load_image(huge_jpeg, max_side=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert li.original_size == (6000, 8000)
    assert li.rgb.shape == (768, 1024, 3)
    assert peak < 30e6, f"peak {peak / 1e6:.1f} MB"  # full decode as an array: 144 MB
    r, g, b = li.rgb[100, 100].astype(int)
    assert r > 200 and g > 200 and b < 80  # yellow quarter in the right place
    assert li.rgb[700, 1000, 2] > 150


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_huge_jpeg_process_memory(huge_jpeg):
    """PIL's pixel memory is invisible to tracemalloc: measure the peak RSS (VmHWM) of a fresh process instead.
    (Not ru_maxrss: Linux carries it over from the parent across exec, and the parent just made the JPEG.)"""
    code = textwrap.dedent(
        """
        import sys
        import numpy, PIL.Image
        from segcli.io.images import load_image

        def hwm_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

        before = hwm_kb()
        li = load_image(sys.argv[1], max_side=1024)
        print(li.rgb.shape, li.original_size, (hwm_kb() - before) // 1024)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, str(huge_jpeg)], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert "(768, 1024, 3) (6000, 8000)" in res.stdout
    grown_mb = int(res.stdout.split()[-1])
    assert grown_mb < 60, f"process grew by {grown_mb} MB (a full decode needs > 144 MB)"


# ---------------------------------------------------------------------------------------------------- digest


def test_content_digest(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * (3 << 20) + b"tail")
    import hashlib

    assert content_digest(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    b = tmp_path / "b.bin"
    b.write_bytes(b"x" * (3 << 20) + b"tale")
    assert content_digest(a) != content_digest(b)
    with pytest.raises(BadImageError, match="gone"):
        content_digest(tmp_path / "gone")
