"""Overlay legends (segcli/io/legend.py, segcli.io.outputs.overlay_image) and --class-names / --no-legend on segment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segcli.errors import UsageError
from segcli.evaluate.class_names import read_class_names
from segcli.io.legend import Legend, legend_entries
from segcli.io.outputs import PALETTE_RGB, overlay_image, save_overlay
from tests.cli_helpers import cli, ok
from tests.synthetic import make_dataset


def test_class_names_from_preset_text_and_evaluation(tmp_path):
    assert read_class_names("camvid")[3] == "road"
    plain = tmp_path / "names.txt"
    plain.write_text("# my names\nsky\n\nroad\n")
    assert read_class_names(plain) == {0: "sky", 2: "road"}
    numbered = tmp_path / "numbered.txt"
    numbered.write_text("3 parked car\n7: tree\n")
    assert read_class_names(numbered) == {3: "parked car", 7: "tree"}
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"mapping_names": {"1": "cat", "2": None, "5": "dog"}}))
    assert read_class_names(ev) == {1: "cat", 5: "dog"}


@pytest.mark.parametrize("content, suffix, fragment", [
    ("", ".txt", "no names"),
    ("300 far\n", ".txt", "outside 0..255"),
    ("{not json", ".json", "not valid JSON"),
    ('{"a": 1}', ".json", "--json output of segcli evaluate"),
    ('{"mode": "per-image", "mapping_names": {}}', ".json", "names no cluster"),
])
def test_bad_class_names_are_one_line_usage_errors(tmp_path, content, suffix, fragment):
    path = tmp_path / f"names{suffix}"
    path.write_text(content)
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.")):
        read_class_names(path)
    with pytest.raises(UsageError, match="not a preset"):
        read_class_names(tmp_path / "missing.txt")


def test_legend_entries_name_what_is_named():
    legend = Legend.of({2: "car"})
    assert legend_entries([1, 2], legend) == [(1, "1"), (2, "2 car")]


def _count(img: np.ndarray, colour) -> int:
    return int((img == np.array(colour, np.uint8)).all(axis=-1).sum())


def test_overlay_legend_shows_the_palette_colours_of_the_ids_present():
    labels = np.zeros((120, 160), np.uint8)
    labels[60:, :80] = 7
    labels[60:, 80:] = 15
    rgb = np.full((120, 160, 3), 255, np.uint8)
    plain = np.asarray(overlay_image(rgb, labels))
    with_legend = np.asarray(overlay_image(rgb, labels, legend=Legend.of({7: "car"})))
    off = np.asarray(overlay_image(rgb, labels, legend=Legend.of({7: "car"}, show=False)))
    assert np.array_equal(off, plain)  # --no-legend: the overlay of before
    corner = with_legend[:40, :80]
    for i in (7, 15):  # each swatch is a solid square of the id's palette colour, in the (otherwise white) corner
        assert _count(corner, PALETTE_RGB[i]) >= 16, i
    assert _count(corner, PALETTE_RGB[3]) == 0  # an id that is not in the image is not listed
    assert np.array_equal(with_legend[60:, 100:], plain[60:, 100:])  # the rest of the picture is unchanged


def test_legend_of_many_ids_fits_a_small_image():
    labels = (np.arange(40 * 40).reshape(40, 40) % 60).astype(np.uint8)
    out = overlay_image(np.zeros((40, 40, 3), np.uint8), labels, legend=Legend.of())
    assert out.size == (40, 40)


def test_save_overlay_with_legend_jpeg(tmp_path):
    labels = np.ones((64, 64), np.uint8)
    save_overlay(tmp_path / "o.jpg", np.zeros((64, 64, 3), np.uint8), labels, legend=Legend.of({1: "x"}))
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.format == "JPEG" and im.size == (64, 64)


def test_segment_overlay_legend_and_no_legend(tmp_path):
    make_dataset(tmp_path / "d", n_images=4, nested=False)
    names = tmp_path / "names.txt"
    names.write_text("background\nred thing\nblue thing\nyellow thing\n")
    common = ["--features", tmp_path / "d" / "features", "--k", 4, "--assign", "pooled", "--quiet"]
    ok(cli("segment", tmp_path / "d" / "images", "--out", tmp_path / "m1", "--overlay", tmp_path / "o1",
           "--cache", tmp_path / "c", "--class-names", names, *common))
    ok(cli("segment", tmp_path / "d" / "images", "--out", tmp_path / "m2", "--overlay", tmp_path / "o2",
           "--cache", tmp_path / "c", "--no-legend", *common))
    record = json.loads((tmp_path / "m1" / "segcli-run.json").read_text())
    assert record["class_names"]["1"] == "red thing"
    differ = 0
    for p in sorted((tmp_path / "o1").glob("*.jpg")):
        a = np.asarray(Image.open(p), np.int16)
        b = np.asarray(Image.open(tmp_path / "o2" / p.name), np.int16)
        assert a.shape == b.shape
        differ += int(np.abs(a[:12, :40] - b[:12, :40]).max() > 40)  # the legend's corner
        assert np.abs(a[-20:, -20:] - b[-20:, -20:]).max() <= 12  # elsewhere the same picture (JPEG noise)
    assert differ == 4
    r = cli("segment", tmp_path / "d" / "images", "--out", tmp_path / "m3", "--class-names", tmp_path / "none.txt", *common)
    assert r.exit_code == 2 and "--class-names" in r.output
