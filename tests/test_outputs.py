"""Safe writing of results (segcli.io.outputs). Every test builds its own output folder in tmp_path."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.errors import OutputError
from segcli.io.outputs import (
    VOC_PALETTE,
    atomic_write,
    is_complete_png,
    output_path,
    prepare_output_dir,
    read_label_png,
    save_label_png,
    save_overlay,
)


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------- palette


def test_voc_palette():
    pal = list(VOC_PALETTE)
    assert len(pal) == 768
    colours = [tuple(pal[3 * i : 3 * i + 3]) for i in range(256)]
    assert colours[0] == (0, 0, 0)
    assert colours[1] == (128, 0, 0)  # aeroplane
    assert colours[2] == (0, 128, 0)
    assert colours[3] == (128, 128, 0)
    assert colours[15] == (192, 128, 128)  # person
    assert colours[20] == (0, 64, 128)  # tvmonitor
    assert colours[255] == (224, 224, 192)  # VOC's "void" border colour
    assert len(set(colours)) == 256


# ---------------------------------------------------------------------------------------------------- folders


def test_prepare_output_dir_creates_parents(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b" / "masks")
    assert out.is_dir() and out == (tmp_path / "a" / "b" / "masks").resolve()
    assert list(out.iterdir()) == []  # the write probe is gone
    assert prepare_output_dir(str(out)) == out  # existing folder is fine


def test_prepare_output_dir_on_a_file(tmp_path):
    f = tmp_path / "masks"
    f.write_text("I am a file")
    with pytest.raises(OutputError, match="output folder is a file"):
        prepare_output_dir(f)
    with pytest.raises(OutputError, match="cannot create output folder"):
        prepare_output_dir(f / "sub")


def _permissions_enforced(folder: Path) -> bool:
    """False when running as root (or on a file system that ignores modes): then a read-only folder is writable."""
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def test_prepare_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if not _permissions_enforced(ro):
            pytest.skip("permissions are not enforced here (running as root?)")
        with pytest.raises(OutputError, match="not writable"):
            prepare_output_dir(ro)
        with pytest.raises(OutputError, match="cannot create output folder"):
            prepare_output_dir(ro / "new")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_prepare_output_dir_not_writable_simulated(tmp_path, monkeypatch):
    """The same check without relying on file modes (which root ignores): the write probe fails."""
    import tempfile

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", deny)
    with pytest.raises(OutputError, match=r"output folder is not writable: .*Permission denied"):
        prepare_output_dir(tmp_path / "x")


# ---------------------------------------------------------------------------------------------------- names


def test_output_path_nested_and_suffix(tmp_path):
    out = prepare_output_dir(tmp_path / "out")
    p = output_path(out, "sub/dir/img")
    assert p == out / "sub" / "dir" / "img.png"
    assert p.parent.is_dir() and not p.exists()
    assert output_path(out, "a.jpg", ".overlay.jpg") == out / "a.jpg.overlay.jpg"
    q = output_path(out, "fotos é/straße café 1")
    assert q.name == "straße café 1.png" and q.parent.is_dir()


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../x", "a//b", "a/./b", "", "a/", "..", "x\x00y"])
def test_output_path_refuses_bad_keys(tmp_path, key):
    out = prepare_output_dir(tmp_path / "out")
    with pytest.raises(OutputError):
        output_path(out, key)
    assert not (tmp_path / "x.png").exists()


def test_output_path_refuses_symlink_escape(tmp_path):
    out = prepare_output_dir(tmp_path / "out")
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutputError, match="outside"):
        output_path(out, "evil/img")
    with pytest.raises(OutputError, match="outside"):
        output_path(out, "evil/deeper/img")
    assert list(outside.iterdir()) == []  # nothing created outside
    # a planted file symlink is refused too
    (out / "trap.png").symlink_to(outside / "victim.png")
    with pytest.raises(OutputError, match="outside"):
        output_path(out, "trap")
    # a symlink that stays inside the output folder is fine
    (out / "real").mkdir()
    (out / "alias").symlink_to(out / "real", target_is_directory=True)
    assert output_path(out, "alias/img") == out / "alias" / "img.png"


def test_output_path_file_in_the_way(tmp_path):
    out = prepare_output_dir(tmp_path / "out")
    (out / "sub").write_text("file")
    with pytest.raises(OutputError, match="is a file"):
        output_path(out, "sub/img")
    (out / "dir.png").mkdir()
    with pytest.raises(OutputError, match="folder"):
        output_path(out, "dir")


# ---------------------------------------------------------------------------------------------------- atomic


def test_atomic_write_success_replaces(tmp_path):
    p = tmp_path / "r.bin"
    p.write_bytes(b"old")
    atomic_write(p, lambda f: f.write(b"new content"))
    assert p.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == []
    assert stat.S_IMODE(p.stat().st_mode) & 0o044  # not left at mkstemp's private 0600


def test_atomic_write_failure_leaves_nothing(tmp_path):
    p = tmp_path / "r.png"

    def boom(f):
        f.write(b"partial" * 1000)
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(p, boom)
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []

    p.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, lambda f: (f.write(b"half"), (_ for _ in ()).throw(KeyboardInterrupt()))[0])
    assert p.read_bytes() == b"previous result"
    assert _leftovers(tmp_path) == []


def test_atomic_write_temp_name_is_hidden(tmp_path):
    p = tmp_path / "img.png"
    seen = []

    def spy(f):
        f.write(b"x")
        seen.extend(q.name for q in tmp_path.iterdir())  # only the temp file exists while writing

    atomic_write(p, spy)
    assert len(seen) == 1 and seen[0].startswith(".img.png.") and seen[0].endswith(".tmp")
    assert [q.name for q in tmp_path.iterdir()] == ["img.png"]


def test_atomic_write_os_error_is_output_error(tmp_path):
    def disk_full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"r.png: No space left"):
        atomic_write(tmp_path / "r.png", disk_full)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- labels


def test_save_label_png_round_trip(tmp_path):
    labels = np.arange(12 * 23, dtype=np.int64).reshape(12, 23) % 256
    labels[0, 0] = 255
    p = tmp_path / "m.png"
    save_label_png(p, labels)
    with Image.open(p) as im:
        assert im.mode == "P" and im.size == (23, 12)
        assert bytes(im.getpalette()[:768]) == bytes(VOC_PALETTE)
    back = read_label_png(p)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    assert is_complete_png(p)
    assert _leftovers(tmp_path) == []


def test_save_label_png_bool_and_small(tmp_path):
    save_label_png(tmp_path / "b.png", np.array([[True, False]]))
    assert read_label_png(tmp_path / "b.png").tolist() == [[1, 0]]
    save_label_png(tmp_path / "one.png", np.array([[7]], np.uint16))
    assert read_label_png(tmp_path / "one.png").tolist() == [[7]]


@pytest.mark.parametrize(
    "bad",
    [np.array([[0, 256]]), np.array([[-1, 0]]), np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32),
     np.zeros((0, 3), np.uint8)],
)
def test_save_label_png_rejects(tmp_path, bad):
    with pytest.raises(ValueError):
        save_label_png(tmp_path / "bad.png", bad)
    assert list(tmp_path.iterdir()) == []


def test_read_label_png_rejects_rgb(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        read_label_png(tmp_path / "rgb.png")


# ---------------------------------------------------------------------------------------------------- complete


def test_is_complete_png(tmp_path):
    good = tmp_path / "good.png"
    save_label_png(good, np.random.default_rng(0).integers(0, 21, (50, 60)))
    assert is_complete_png(good)
    data = good.read_bytes()
    for name, content in [("half.png", data[: len(data) // 2]), ("noend.png", data[:-12]), ("zero.png", b""),
                          ("text.png", b"hello world, not a png at all")]:
        (tmp_path / name).write_bytes(content)
        assert not is_complete_png(tmp_path / name), name
    assert not is_complete_png(tmp_path / "missing.png")
    (tmp_path / "dir.png").mkdir()
    assert not is_complete_png(tmp_path / "dir.png")
    jpg = tmp_path / "j.png"
    Image.new("RGB", (4, 4)).save(jpg, format="JPEG")
    assert not is_complete_png(jpg)


# ---------------------------------------------------------------------------------------------------- overlay


def test_overlay_shape_colours_and_resize(tmp_path):
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 20:50] = 15  # person, (192, 128, 128)
    rgb = np.full((20, 30, 3), 100, np.uint8)  # half size: resized to the labels
    p = tmp_path / "ov.png"
    save_overlay(p, rgb, labels, alpha=0.5)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (60, 40)
        out = np.asarray(im)
    assert out[0, 0].tolist() == [100, 100, 100]  # background untouched
    assert out[20, 35].tolist() == [146, 114, 114]  # 0.5 * 100 + 0.5 * colour
    assert out[10, 35].tolist() == [192, 128, 128]  # boundary in full class colour
    assert out[9, 35].tolist() == [100, 100, 100]  # background side of the boundary untouched
    assert _leftovers(tmp_path) == []


def test_overlay_jpeg(tmp_path):
    labels = np.ones((8, 8), np.uint8)
    rgb = np.zeros((8, 8, 3), np.uint8)
    p = tmp_path / "ov.jpg"
    save_overlay(p, rgb, labels)
    with Image.open(p) as im:
        assert im.format == "JPEG" and im.size == (8, 8)
    with pytest.raises(ValueError):
        save_overlay(tmp_path / "x.png", rgb, labels, alpha=1.5)
