"""--prior levels|maskdistill|vote through the CLI: on synthetic --features folders whose answer is known, and on
the real voc-mini images with a random-weight ViT-S/16 checkpoint (tests/checkpoints.py); the model file keeps
the choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segcli.io.outputs import read_label_png
from tests.checkpoints import SMALL, checkpoint_file
from tests.synthetic import PATCH, make_dataset, matched_miou
from tests.cli_helpers import cli, ok, pngs

VOC_MINI = Path(os.environ.get("SEGCLI_VOC_MINI", "/work/shared/data/voc-mini"))
FAST = ["--short-side", 64, "--max-side", 128, "--crf-max-side", 64, "--work-max-side", 256, "--device", "cpu", "--quiet"]


def model_meta(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + n])["__metadata__"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """12 images with one or two objects; `proposal` in every feature file = the first object only."""
    root = tmp_path_factory.mktemp("prior-synthetic")
    gts = make_dataset(root, proposal=True)
    proposals = {}
    for key in gts:
        with np.load(root / "features" / f"{key}.npz") as z:
            proposals[key] = z["proposal"]
    return root, gts, proposals


def test_maskdistill_foreground_is_the_proposal(synthetic, tmp_path):
    root, gts, proposals = synthetic
    out = tmp_path / "md"
    ok(cli("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4, "--assign", "pooled",
           "--prior", "maskdistill", "--no-crf", "--cache", tmp_path / "cache", "--quiet"))
    two_objects = 0
    for key, prop in proposals.items():
        fg = read_label_png(out / f"{key}.png") > 0
        np.testing.assert_array_equal(fg[PATCH // 2:: PATCH, PATCH // 2:: PATCH], prop, err_msg=key)  # patch centres
        full = np.kron(prop, np.ones((PATCH, PATCH), bool))  # pixels: only corners rounded by bilinear upsampling
        assert (fg & full).sum() / (fg | full).sum() > 0.97, key
        two_objects += len(np.unique(gts[key])) == 3
    assert two_objects >= 2  # the second object of those images is background: the proposal finds one object


def test_vote_keeps_objects_the_three_levels_agree_on(synthetic, tmp_path):
    root, gts, _ = synthetic
    out = tmp_path / "vote"
    ok(cli("segment", root / "images", "--features", root / "features", "--out", out, "--k", 4, "--assign", "pooled",
           "--prior", "vote", "--cache", tmp_path / "cache", "--quiet"))
    preds = {k: read_label_png(out / f"{k}.png") for k in gts}
    assert matched_miou(preds, gts, 4) > 0.95  # second objects (no proposal vote) survive on three level votes


@pytest.mark.parametrize("command", ["segment", "cluster-dataset"])
@pytest.mark.parametrize("prior", ["maskdistill", "vote"])
def test_missing_proposal_in_features_folder_is_reported_before_any_work(tmp_path, command, prior):
    root = tmp_path / "data"
    make_dataset(root, n_images=4)  # no proposal arrays
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [command, root / "images", "--features", root / "features", "--k", 3, "--assign", "pooled",
            "--prior", prior, "--cache", cache, "--quiet"]
    args += ["--out", out] if command == "segment" else ["--out", tmp_path / "m.segcli", "--masks", out]
    r = ok(cli(*args), 3)
    assert f"--prior {prior} needs a 'proposal' array" in r.output and "4 of 4" in r.output
    assert "Traceback" not in r.output
    assert not list(out.rglob("*.png")) if out.exists() else True
    assert not (tmp_path / "m.segcli").exists()
    assert not (cache / "regions").exists()
    # the same folder is fine with the three levels
    ok(cli(*[a if a != prior else "levels" for a in args]))


def test_bad_prior_options(synthetic, tmp_path):
    root, _, _ = synthetic
    common = ["segment", root / "images", "--features", root / "features", "--out", tmp_path / "o", "--quiet"]
    r = ok(cli(*common, "--prior", "saliency"), 2)
    assert "--prior" in r.output and "levels, maskdistill, vote" in r.output
    r = ok(cli(*common, "--proposal-heads", "-1"), 2)
    assert "--proposal-heads" in r.output


@pytest.mark.parametrize("prior", ["levels", "maskdistill", "vote"])
def test_model_file_round_trips_the_prior(synthetic, tmp_path, prior):
    from segcli.method.model import SegModel

    root, gts, _ = synthetic
    common = ["--features", root / "features", "--k", 4, "--assign", "pooled", "--quiet"]
    model = tmp_path / "m.segcli"
    ok(cli("cluster-dataset", root / "images", "--prior", prior, "--proposal-heads", 3, "--out", model,
           "--masks", tmp_path / "A", "--cache", tmp_path / "c1", *common))
    m = SegModel.load(model)
    assert m.config.prior == prior and m.config.proposal_heads == 3
    assert model_meta(model)["format_version"] == ("1" if prior == "levels" else "2")
    if prior == "maskdistill":
        assert len(m.categories) == 0 and m.dataset.centroids.shape == (0, m.feature_dim)
    # predict with the model in a fresh cache, no --prior given: the model's prior is used
    ok(cli("segment", root / "images", "--model", model, "--out", tmp_path / "B", "--cache", tmp_path / "c2", *common))
    a, b = pngs(tmp_path / "A"), pngs(tmp_path / "B")
    assert len(a) == len(gts) and a == b


def test_older_reader_refuses_a_vote_model(synthetic, tmp_path, monkeypatch):
    """An older segcli (format 1) would ignore the prior and silently use the three levels: it must refuse."""
    import segcli.method.model as mf
    from segcli.errors import ModelError

    root, _, _ = synthetic
    model = tmp_path / "m.segcli"
    ok(cli("cluster-dataset", root / "images", "--features", root / "features", "--k", 4, "--assign", "pooled",
           "--prior", "vote", "--out", model, "--cache", tmp_path / "c", "--quiet"))
    monkeypatch.setattr(mf, "FORMAT_VERSION", 1)
    with pytest.raises(ModelError, match="newer segcli"):
        mf.SegModel.load(model)


# ------------------------------------------------------------------ real images, random-weight backbone
@pytest.fixture
def extract_calls(monkeypatch):
    from segcli.vit.backbone import Backbone

    counts = {"images": 0}
    extract = Backbone.extract

    def counting(self, batch, *args, **kwargs):
        counts["images"] += int(batch.shape[0])
        return extract(self, batch, *args, **kwargs)

    monkeypatch.setattr(Backbone, "extract", counting)
    return counts


@pytest.mark.skipif(not (VOC_MINI / "images").is_dir() or not (VOC_MINI / "SegmentationClass").is_dir(),
                    reason=f"{VOC_MINI} (voc-mini images and SegmentationClass) not available")
def test_each_prior_on_voc_mini_with_a_random_weight_checkpoint(tmp_path, extract_calls):
    from PIL import Image

    images = sorted(p for p in (VOC_MINI / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    weights = checkpoint_file(SMALL, "dino")  # the official DINO layout, as MaskDistill loads it
    cache = tmp_path / "cache"
    results = {}
    for i, prior in enumerate(("levels", "maskdistill", "vote")):
        out = tmp_path / prior
        ok(cli("segment", VOC_MINI / "images", "--out", out, "--weights", weights, "--k", 4, "--prior", prior,
               "--fusion", "any", "--regions", "whole", "--cache", cache, *FAST))
        # the proposal is cached with the features: only the first run runs the backbone
        assert extract_calls["images"] == (len(images) if i == 0 else 0), (prior, extract_calls)
        extract_calls["images"] = 0
        results[prior] = pngs(out)
        assert len(results[prior]) == len(images) == 11
        for img in images:
            with Image.open(out / f"{img.stem}.png") as m, Image.open(img) as im:
                assert m.size == im.size and np.array(m).max() <= 3
        report = tmp_path / f"{prior}.json"
        ok(cli("evaluate", out, VOC_MINI / "SegmentationClass", "--preset", "voc", "--json", report))
        assert json.loads(report.read_text())["images"] == 11
    # every cached feature file holds a proposal on its grid, with its seed in it
    files = sorted((cache / "features").rglob("*.npz"))
    assert len(files) == 11
    for f in files:
        with np.load(f) as z:
            assert z["proposal"].dtype == bool and z["proposal"].shape == z["attn"].shape and z["proposal"].any()
    assert results["maskdistill"] != results["levels"]

    # fit / predict with --prior vote: the model file carries it, predictions equal the fit's masks
    model = tmp_path / "vote.segcli"
    ok(cli("cluster-dataset", VOC_MINI / "images", "--out", model, "--masks", tmp_path / "fit", "--weights", weights,
           "--k", 4, "--prior", "vote", "--fusion", "any", "--regions", "whole", "--cache", cache, *FAST))
    ok(cli("segment", VOC_MINI / "images", "--model", model, "--out", tmp_path / "pred", "--weights", weights,
           "--cache", cache, *FAST))
    assert pngs(tmp_path / "fit") == pngs(tmp_path / "pred")
