"""Label formats (palette / grayscale / 16-bit / colour-coded) and the dataset presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.errors import InputError, UsageError
from segcli.evaluate import EvaluationConfig, evaluate
from segcli.evaluate.labels import gt_lookup, resolve_spec
from segcli.evaluate.palettes import CAMVID_COLOURS, voc_colours
from segcli.evaluate.presets import COCOSTUFF27_GROUPS, PRESETS


def write(path: Path, arr, mode: str = "L", palette=None) -> Path:
    arr = np.ascontiguousarray(np.asarray(arr))
    if arr.ndim == 1:
        arr = arr[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        img = Image.frombytes("RGB", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    elif mode == "I;16":
        img = Image.frombytes("I;16", (arr.shape[1], arr.shape[0]), arr.astype("<u2").tobytes())
    else:
        img = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def score(tmp_path: Path, pred, gt, pred_mode="L", gt_mode="L", gt_palette=None, pred_palette=None, **cfg):
    write(tmp_path / "pred" / "x.png", pred, pred_mode, pred_palette)
    write(tmp_path / "gt" / "x.png", gt, gt_mode, gt_palette)
    return evaluate(tmp_path / "pred", tmp_path / "gt", EvaluationConfig(workers=1, **cfg))


def codes(preset: str, values) -> list[int]:
    spec = resolve_spec(EvaluationConfig(preset=preset))
    out = gt_lookup(spec)[np.asarray(values)]
    return [int(v) if v < spec.num_classes else -1 for v in out]  # -1: ignored


def test_voc_preset_reads_palette_png_indices_not_colours(tmp_path):
    flat = [v for c in voc_colours() for v in c]
    # prediction: mode P with a scrambled palette, so colour != index; values must be read as indices
    scrambled = flat[::-1]
    res = score(tmp_path, [3, 3, 7, 7, 7, 9], [0, 0, 15, 15, 255, 1], "P", "P", flat, scrambled, preset="voc")
    assert res.num_classes == 21 and res.spec.ignore == 255
    assert res.pred_ids == [3, 7, 9] and res.method == "hungarian"
    assert res.mapping == {3: 0, 7: 15, 9: 1}
    assert res.miou == 1.0 and res.ignored_pixels == 1
    assert res.class_names[15] == "person"


def test_camvid_preset_ignores_11_and_rejects_other_values(tmp_path):
    res = score(tmp_path / "a", [0, 1, 2, 2], [10, 4, 11, 11], preset="camvid")
    assert res.num_classes == 11 and res.ignored_pixels == 2 and res.miou == 1.0
    with pytest.raises(InputError, match="values 12"):
        score(tmp_path / "b", [0, 1], [10, 12], preset="camvid")


def test_cityscapes27_is_label_id_minus_7():
    assert codes("cityscapes27", [7, 8, 24, 26, 33]) == [0, 1, 17, 19, 26]
    assert codes("cityscapes27", [0, 1, 6, 34, 255]) == [-1] * 5
    assert PRESETS["cityscapes27"].class_names[0] == "road"
    assert PRESETS["cityscapes27"].class_names[26] == "bicycle"


def test_cocostuff27_fine_to_coarse_table():
    fines = sorted(f for _, group in COCOSTUFF27_GROUPS for f in group)
    assert fines == list(range(182))  # every fine id 0..181 maps to exactly one coarse class
    assert len(COCOSTUFF27_GROUPS) == 27
    # spot checks against STEGO's fine_to_coarse: person 0 -> 9, bicycle 1 -> 11, banner 91 -> 17,
    # clouds 105 -> 23, sky-other 156 -> 23, tree 168 -> 22, wall-brick 170 -> 18, wood 181 -> 24
    assert codes("cocostuff27", [0, 1, 91, 105, 156, 168, 170, 181]) == [9, 11, 17, 23, 23, 22, 18, 24]
    assert codes("cocostuff27", [182, 200, 255]) == [-1, -1, -1]
    names = PRESETS["cocostuff27"].class_names
    assert (names[9], names[23], names[22]) == ("person", "sky", "plant")


def test_cocostuff27_end_to_end(tmp_path):
    # fine ids 123 (grass) and 168 (tree) both mean "plant"; 156 is sky; 255 unlabelled
    res = score(tmp_path, [0, 0, 1, 1, 1], [123, 168, 156, 156, 255], preset="cocostuff27")
    assert res.mapping == {0: 22, 1: 23} and res.miou == 1.0 and res.ignored_pixels == 1


def test_colour_coded_ground_truth_with_named_palette(tmp_path):
    rgb = np.array([[CAMVID_COLOURS[0], CAMVID_COLOURS[3], CAMVID_COLOURS[11], CAMVID_COLOURS[3]]])
    res = score(tmp_path / "a", [5, 6, 5, 6], rgb, gt_mode="RGB", preset="camvid", palette="camvid")
    assert res.mapping == {5: 0, 6: 3} and res.ignored_pixels == 1 and res.miou == 1.0
    voc = voc_colours()
    rgb = np.array([[voc[0], voc[12], voc[255]]])
    res = score(tmp_path / "b", [1, 2, 1], rgb, gt_mode="RGB", preset="voc", palette="voc")
    assert res.mapping == {1: 0, 2: 12} and res.ignored_pixels == 1


def test_palette_file_and_unknown_colour(tmp_path):
    pal = tmp_path / "pal.txt"
    pal.write_text("# value r g b\n0 10 10 10\n1, 200, 0, 0\n9 255 255 255\n")
    rgb = np.array([[(10, 10, 10), (200, 0, 0), (255, 255, 255)]])
    res = score(tmp_path / "a", [0, 1, 1], rgb, gt_mode="RGB", num_classes=2, ignore=9, palette=str(pal))
    assert res.miou == 1.0 and res.ignored_pixels == 1
    with pytest.raises(InputError, match=r"colour \(1, 2, 3\)"):
        bad = np.array([[(10, 10, 10), (1, 2, 3)]])
        score(tmp_path / "b", [0, 1], bad, gt_mode="RGB", num_classes=2, palette=str(pal))
    with pytest.raises(UsageError, match="palette"):
        resolve_spec(EvaluationConfig(num_classes=2, palette="nonexistent-palette"))


def test_colour_images_without_palette_are_refused(tmp_path):
    with pytest.raises(InputError, match="--palette"):
        score(tmp_path / "a", [0, 1], np.array([[(0, 0, 0), (128, 0, 0)]]), gt_mode="RGB", preset="voc")
    with pytest.raises(InputError, match="cluster ids"):
        score(tmp_path / "b", np.array([[(0, 0, 0), (128, 0, 0)]]), [0, 1], pred_mode="RGB", preset="voc")


def test_16bit_labels(tmp_path):
    res = score(tmp_path / "a", [0, 1, 1], [300, 301, 999], "I;16", "I;16", num_classes=302, ignore=999)
    assert res.mapping == {0: 300, 1: 301} and res.ignored_pixels == 1
    with pytest.raises(InputError, match="cluster ids must be 0..255"):
        score(tmp_path / "b", [0, 300], [0, 1], "I;16", "L", num_classes=2)


def test_label_option_validation():
    with pytest.raises(UsageError, match="--preset"):
        resolve_spec(EvaluationConfig())
    with pytest.raises(UsageError, match="contradicts"):
        resolve_spec(EvaluationConfig(preset="voc", num_classes=20))
    with pytest.raises(UsageError, match="contradicts"):
        resolve_spec(EvaluationConfig(preset="camvid", ignore=255))
    with pytest.raises(UsageError, match="is a class id"):
        resolve_spec(EvaluationConfig(num_classes=5, ignore=3))
    with pytest.raises(UsageError, match="unknown --preset"):
        resolve_spec(EvaluationConfig(preset="ade20k"))
    assert resolve_spec(EvaluationConfig(preset="voc", num_classes=21, ignore=255)).num_classes == 21
    assert resolve_spec(EvaluationConfig(num_classes=3)).ignore == 255


def test_voc_palette_values():
    colours = voc_colours()
    assert colours[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    assert colours[15] == (192, 128, 128) and colours[255] == (224, 224, 192)
