"""segcli report: the data behind the page (segcli/html_report_data.py), the command, bad input, and the page
itself opened in a real headless browser (tests/browser.py: Debian's chromium through selenium).

The run is a real ``segment`` on synthetic images with precomputed features (no backbone: seconds), scored by
a real ``evaluate``; one image carries ``<script>`` in its name, one is broken (skipped), one loses its input
image and one its ground truth after the run.
"""

from __future__ import annotations

import html.parser
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.errors import InputError
from segcli.html_report_data import (
    UNMATCHED_COLOUR,
    ImageRow,
    class_colours,
    gather_rows,
    image_scores,
    load_evaluation,
    sample_rows,
    score_row,
)
from segcli.io.outputs import PALETTE_RGB
from tests.browser import browser, console_errors, file_url
from tests.cli_helpers import cli, ok
from tests.synthetic import make_dataset

EVIL_KEY = "x<script>alert('owned')<b>&\"'"


# ---------------------------------------------------------------------------------------------- the data


def test_image_scores_under_a_mapping():
    conf = np.zeros((256, 4), np.int64)  # 2 classes + ignore + invalid columns
    conf[1, 0] = 30  # cluster 1: 30 px of class 0
    conf[2, 1] = 10  # cluster 2: 10 px of class 1 and 10 of class 0
    conf[2, 0] = 10
    conf[3, 2] = 99  # ignored pixels never count
    miou, acc = image_scores(conf, {1: 0, 2: 1}, 2)
    assert acc == pytest.approx(40 / 50)
    assert miou == pytest.approx((30 / 40 + 10 / 20) / 2)
    miou, acc = image_scores(conf, {1: 0}, 2)  # cluster 2 unmatched: its pixels are errors
    assert acc == pytest.approx(30 / 50) and miou == pytest.approx((30 / 40 + 0) / 2)
    assert image_scores(np.zeros((256, 4), np.int64), {}, 2) == (None, None)


def test_class_colours_take_the_largest_matched_cluster():
    colours = class_colours({1: 0, 4: 0, 2: 1, 3: None}, {1: 10, 4: 50, 2: 5}, 3, PALETTE_RGB)
    assert colours[0].tolist() == PALETTE_RGB[4].tolist()
    assert colours[1].tolist() == PALETTE_RGB[2].tolist()
    assert colours[2].tolist() == list(UNMATCHED_COLOUR)


def _rows(scores):
    return [ImageRow(f"k{i:02d}", mask=Path(f"k{i}.png"), miou=s, accuracy=s) for i, s in enumerate(scores)]


def test_sample_takes_the_worst_half_and_spreads_the_rest():
    scores = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4, 0.95]
    rows = _rows(scores)
    rows.append(ImageRow("skipped", status="skipped", reason="bad"))
    picked = sample_rows(rows, 4)
    assert len(picked) == 4
    assert {1, 5} <= set(picked)  # the two worst (0.1, 0.2)
    assert 9 in picked  # the best one is shown too
    assert 10 not in sample_rows(rows, 100)  # a skipped image has no mask to picture
    assert sample_rows(rows, 100) == list(range(10))
    assert sample_rows(rows, 0) == []
    unscored = _rows([None] * 9)
    assert sample_rows(unscored, 3) == [0, 4, 8]


def test_gather_rows_missing_images_and_skipped(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for key in ("a", "b"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / f"{key}.png")
    (tmp_path / "a.jpg").write_bytes(b"x")
    record = {"items": [["a", str(tmp_path / "a.jpg")], ["b", str(tmp_path / "gone.jpg")], ["c", str(tmp_path / "c.jpg")]],
              "skipped": {"c": "c.jpg: cannot decode image"}}
    rows = gather_rows(masks, record, None)
    assert [(r.key, r.status) for r in rows] == [("a", "ok"), ("b", "ok"), ("c", "skipped")]
    assert rows[0].image == str(tmp_path / "a.jpg") and not rows[0].notes
    assert rows[1].image is None and rows[1].notes == ["input image not found"]
    assert rows[2].reason == "c.jpg: cannot decode image"
    no_record = gather_rows(masks, None, None)
    assert no_record[0].notes == ["input image not found"]


def test_mask_with_ids_beyond_the_palette_is_unreadable_not_fatal(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(path)  # 16-bit: id 300 has no palette colour
    row = ImageRow("wide", mask=path)
    score_row(row, None, None)
    assert row.status == "unreadable" and "300" in row.reason


def test_load_evaluation_refuses_other_json(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text('{"mode": "dataset"}')
    with pytest.raises(InputError, match="not the --json output"):
        load_evaluation(bad)
    bad.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_evaluation(bad)


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """segment (features, no backbone) + evaluate + report on 8 synthetic images, with the bad cases."""
    root = tmp_path_factory.mktemp("report")
    gts = make_dataset(root / "d", n_images=8, nested=False)
    images, feats, gt = root / "d" / "images", root / "d" / "features", root / "gt"
    gt.mkdir()
    for key, mask in gts.items():
        Image.fromarray(mask.astype(np.uint8)).save(gt / f"{key}.png")
    for folder, suffix in ((images, ".png"), (feats, ".npz"), (gt, ".png")):  # a name with HTML in it
        (folder / f"img000{suffix}").rename(folder / f"{EVIL_KEY}{suffix}")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped by segment, with its reason
    masks = root / "masks"
    r = cli("segment", images, "--out", masks, "--features", feats, "--cache", root / "cache", "--k", 4,
            "--assign", "pooled", "--class-names", "voc", "--quiet")
    ok(r, 4)  # one image skipped
    (images / "img003.png").unlink()  # a mask whose input image is gone
    (gt / "img005.png").unlink()  # a mask without ground truth
    ok(cli("evaluate", masks, gt, "--num-classes", 4, "--allow-missing", "--json", root / "eval.json"))
    out = root / "report" / "report.html"
    r = ok(cli("report", masks, "--eval", root / "eval.json", "--out", out, "--quiet"))
    return {"root": root, "masks": masks, "images": images, "gt": gt, "out": out, "output": r.output,
            "eval": json.loads((root / "eval.json").read_text())}


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_page_is_self_contained_and_escaped(run):
    page = run["out"].read_text(encoding="utf-8")
    assert "report: wrote" in run["output"]
    parser = _Tags()
    parser.feed(page)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert len(scripts) == 2 and scripts[0].get("type") == "application/json"  # the data and the page's code
    assert "<script>alert" not in page  # the file name is data, never markup
    assert "\\u003cscript\\u003ealert" in page
    # Nothing outside the page: no http(s) URL in any src/href, and a policy that forbids fetching.
    for tag, attrs in parser.tags:
        for name in ("src", "href"):
            assert not str(attrs.get(name, "data:")).startswith(("http", "//")), (tag, attrs)
    assert "default-src 'none'" in page and "https://" not in page and "http://" not in page
    # How the run was made, and the evaluation's figures.
    record = json.loads((run["masks"] / "segcli-run.json").read_text())
    for value in (record["model_digest"], record["tool"], "assign=pooled", "Cluster-to-class matching",
                  "Confusion matrix after matching", "IoU per class"):
        assert value in page, value
    assert run["out"].stat().st_size < 2_000_000


def test_report_rows_cover_every_bad_case(run):
    page = run["out"].read_text(encoding="utf-8")
    start = page.index('id="report-data">') + len('id="report-data">')
    data = json.loads(page[start:page.index("</script>", start)])
    rows = {r["k"]: r for r in data["rows"]}
    assert rows["broken"]["s"] == "skipped" and "broken" in rows["broken"]["r"]
    assert rows["img003"]["t"] >= 0 and data["thumbs"][rows["img003"]["t"]]["i"] is None  # no input picture
    assert "input image not found" in rows["img003"]["n"]
    assert rows["img005"]["m"] is None and "no ground truth" in rows["img005"]["n"]
    assert rows[EVIL_KEY]["s"] == "ok" and rows[EVIL_KEY]["m"] is not None
    scored = [r for r in data["rows"] if r["m"] is not None]
    assert len(scored) == 7  # 8 masks, one without ground truth
    # The page's per-image pixel accuracy, weighted by pixels, is the evaluation's (dataset matching).
    ev = run["eval"]
    assert 0 <= ev["pixel_accuracy"] <= 1
    assert min(r["a"] for r in scored) <= ev["pixel_accuracy"] <= max(r["a"] for r in scored)


def test_report_path_inside_an_input_is_refused(run):
    for inside in (run["masks"] / "r.html", run["images"] / "r.html", run["gt"] / "sub" / "r.html"):
        r = cli("report", run["masks"], "--eval", run["root"] / "eval.json", "--out", inside)
        assert r.exit_code == 2, r.output
        assert "never writes among its inputs" in r.output and "Traceback" not in r.output
        assert not inside.exists()


@pytest.mark.parametrize("args, code, fragment", [
    (["--eval", "{root}/nope.json"], 3, "not found"),
    (["--eval", "{root}/masks/segcli-run.json"], 3, "not the --json output of segcli evaluate"),
    (["--max-images", "-1"], 2, "--max-images"),
    (["--thumb-side", "4"], 2, "--thumb-side"),
])
def test_report_bad_options_are_one_line(run, tmp_path, args, code, fragment):
    args = [a.replace("{root}", str(run["root"])) for a in args]
    r = cli("report", run["masks"], "--out", tmp_path / "r.html", *args)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert not (tmp_path / "r.html").exists()


def test_report_without_evaluation_or_record(run, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(run["masks"], masks)
    (masks / "segcli-run.json").unlink()
    out = tmp_path / "plain.html"
    ok(cli("report", masks, "--out", out, "--images", run["images"], "--max-images", 2, "--quiet"))
    page = out.read_text(encoding="utf-8")
    assert "No run record" in page and "Not evaluated" in page and "pass --images DIR" not in page
    assert page.count("data:image/jpeg;base64,") == 4  # two images, input and prediction each


# ---------------------------------------------------------------------------------------------- in a browser


def _row_values(driver, column: str) -> list:
    cells = driver.find_elements("css selector", f"#rows tr.row td.{column}")
    return [c.text for c in cells]


def _mious(driver) -> list[float | None]:
    return [float(v) if v else None for v in
            (tr.get_attribute("data-miou") for tr in driver.find_elements("css selector", "#rows tr.row"))]


def test_report_in_a_headless_browser(run):
    with browser() as driver:
        driver.get(file_url(run["out"]))
        assert console_errors(driver) == []
        assert "segcli report" in driver.title
        names = _row_values(driver, "name")
        assert EVIL_KEY in names  # shown as text, and no alert was raised (selenium would fail on one)
        # Worst first by default: scored rows ascending, unscored after them.
        m = _mious(driver)
        scored = [v for v in m if v is not None]
        assert len(scored) == 7 and scored == sorted(scored) and m[:len(scored)] == scored
        header = driver.find_element("css selector", "th[data-sort='miou']")
        header.click()  # now best first
        scored = [v for v in _mious(driver) if v is not None]
        assert scored == sorted(scored, reverse=True)
        header.click()
        assert [v for v in _mious(driver) if v is not None] == sorted(scored)
        driver.find_element("css selector", "th[data-sort='name']").click()
        assert _row_values(driver, "name") == sorted(names)
        # Filters: the problem images only, then one class only.
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("id", "status")).select_by_value("problems")
        assert _row_values(driver, "name") == ["broken"]
        assert "cannot" in driver.find_element("css selector", "#rows td.status").text or \
               "broken" in driver.find_element("css selector", "#rows td.status").text
        Select(driver.find_element("id", "status")).select_by_value("all")
        Select(driver.find_element("id", "cls")).select_by_value("g3")
        with_3 = _row_values(driver, "name")
        assert 0 < len(with_3) < len(names)
        Select(driver.find_element("id", "cls")).select_by_value("")
        assert console_errors(driver) == []
        # What a person sees: the legend's palette colours are on screen.
        legend_ids = sorted({int(s.text.split()[0]) for s in driver.find_elements("css selector", "#legend .item")})
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    assert legend_ids and shot.shape[0] > 200
    for i in legend_ids:
        if i == 0:
            continue  # id 0's colour is black, like text
        hits = int((shot == PALETTE_RGB[i]).all(axis=-1).sum())
        assert hits >= 50, f"the legend colour of id {i} {PALETTE_RGB[i].tolist()} is not on screen ({hits} px)"


def test_report_of_a_per_image_evaluation_takes_its_figures(run, tmp_path):
    ev = tmp_path / "per_image.json"
    ok(cli("evaluate", run["masks"], run["gt"], "--num-classes", 4, "--allow-missing", "--per-image", "--json", ev))
    out = tmp_path / "per_image.html"
    ok(cli("report", run["masks"], "--eval", ev, "--out", out, "--quiet"))
    page = out.read_text(encoding="utf-8")
    start = page.index('id="report-data">') + len('id="report-data">')
    rows = {r["k"]: r for r in json.loads(page[start:page.index("</script>", start)])["rows"]}
    figures = {r["name"]: r for r in json.loads(ev.read_text())["per_image"]}
    assert figures and all(rows[k]["m"] == pytest.approx(f["miou"]) and rows[k]["mp"] is not None
                           for k, f in figures.items())
    assert "Per-image matching" in page
