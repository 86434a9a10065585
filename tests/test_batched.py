"""The batched, device-resident foreground step equals the per-image step (segcli.method.batched vs segcli.method.steps).

Run on the CPU (the same tensor code runs on a GPU): a fitted model, images of different patch grids in one
batch, clean and noisy features, the three priors; and the device crops against the host crops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segcli.method import steps
from segcli.method.batched import foreground_batch
from segcli.method.regions import crop_batch
from segcli.config import SegmentConfig
from segcli.io.images import discover_images
from segcli.pipeline import Segmenter
from tests.synthetic import make_dataset


def _fitted(tmp_path, prior="levels", noise=0.25, image_k=None):
    roots = []
    for i, grid in enumerate([(8, 10), (7, 11), (9, 9)]):
        root = tmp_path / f"d{i}"
        make_dataset(root, n_images=6, grid=grid, noise=noise, seed=i, proposal=True, nested=False)
        roots.append(root)
    cfg = SegmentConfig(k=4, assign="pooled", prior=prior, seed=3)
    seg = Segmenter(cfg, features_dir=roots[0] / "features", cache_dir=tmp_path / "cache")
    seg.fit(discover_images(roots[0] / "images"))
    feats = []
    for root in roots:  # the same model labels features of other grids (same dimension)
        src = Segmenter(model=seg.model_, features_dir=root / "features", cache_dir=tmp_path / "cache").source
        feats += [f for _, f in src.features(discover_images(root / "images"))]
    return seg.model_, feats


@pytest.mark.parametrize("prior,noise", [("levels", 0.25), ("levels", 1.5), ("vote", 0.8), ("maskdistill", 0.25)])
def test_batched_foreground_equals_the_per_image_step(tmp_path, prior, noise):
    model, feats = _fitted(tmp_path, prior, noise)
    assert len({f.grid for f in feats}) == 3
    batched = foreground_batch(model, feats, "cpu")
    for f, (hard, soft, clusters) in zip(feats, batched):
        h0, s0, c0 = steps.foreground(model, f)
        assert np.array_equal(hard, h0)
        np.testing.assert_allclose(soft, s0, rtol=0, atol=1e-6)
        assert (clusters is None) == (c0 is None)
        if c0 is not None:
            assert np.array_equal(clusters, c0)


def test_batched_foreground_special_cases_and_empty(tmp_path):
    model, feats = _fitted(tmp_path)
    f = feats[0]
    flat = dataclasses.replace(f, feats=np.ones_like(f.feats))  # every patch identical: the special case
    out = foreground_batch(model, [flat, feats[1]], "cpu")
    for g, (hard, soft, clusters) in zip([flat, feats[1]], out):
        h0, s0, c0 = steps.foreground(model, g)
        assert np.array_equal(hard, h0) and np.array_equal(clusters, c0)
    assert foreground_batch(model, [], "cpu") == []


def test_device_crops_match_the_host_crops():
    from segcli.vit.backbone import resize_normalise

    rng = np.random.default_rng(0)
    rgb = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    rgb[10:40, 20:60] = [200, 30, 30]
    boxes = [(10, 40, 20, 60), (0, 60, 0, 80), (5, 9, 70, 80)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dev = crop_batch(torch.from_numpy(rgb).permute(2, 0, 1), boxes, 32, mean, std)
    host = torch.stack([resize_normalise(rgb[y0:y1, x0:x1], 32, 32, mean, std) for y0, y1, x0, x1 in boxes])
    assert dev.shape == host.shape == (3, 3, 32, 32)
    # PIL and torch antialiased bicubic agree to a fraction of a grey level on average; on white noise
    # upscaled 8x (the 4 x 10 crop) single pixels differ by up to 16 levels (measured: mean 0.16, max 16).
    diff = (dev - host).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255
    assert float(diff.mean()) < 0.5 and float(diff.max()) <= 24


def _scenes(root, n=6):
    from tests.test_cli_backbone import scene

    root.mkdir()
    sizes = [(60, 40), (40, 60), (50, 50)]
    for i in range(n):
        scene(*sizes[i % 3], seed=300 + i).save(root / f"s{i}.png")
    return discover_images(root)


@pytest.mark.parametrize("assign", ["pooled", "cls"])
def test_device_engine_gives_the_local_engines_masks(tmp_path, assign):
    """The device engine (batched foreground, refinement and crops on the device) run on the CPU against the
    per-image path: byte-identical masks with pooled embeddings; with crop embeddings the crops are resized by
    torch instead of PIL (a fraction of a grey level), so the embeddings differ in the last digits."""
    from segcli.engines.device import DeviceEngine
    from segcli.io.outputs import read_label_png
    from tests.checkpoints import TINY, checkpoint_file

    items = _scenes(tmp_path / "images")
    cfg = SegmentConfig(backbone=TINY, k=3, short_side=224, max_side=448, assign=assign, fusion="any", seed=1)
    kw = dict(weights=checkpoint_file(TINY, "timm"), device="cpu", precision="fp32", batch_size=4)
    masks, embs = {}, {}
    for name in ("local", "device"):
        seg = Segmenter(cfg, cache_dir=tmp_path / f"cache-{name}", **kw)
        if name == "device":
            seg.engine = DeviceEngine.for_backbone(seg.source.backbone, cfg, 4, timings=seg.timings)
        seg.fit(items)
        seg.predict(items, tmp_path / name)
        masks[name] = {i.key: read_label_png(tmp_path / name / f"{i.key}.png") for i in items}
        embs[name] = [r["emb"] for _, _, r in seg._results(items, "check", need_features=False)]
    assert len(masks["device"]) == len(items)
    if assign == "pooled":
        assert all(np.array_equal(masks["device"][k], masks["local"][k]) for k in masks["local"])
    else:
        for a, b in zip(embs["device"], embs["local"]):
            assert a.shape == b.shape
            if len(a):
                assert float(np.min(np.sum(a * b, axis=1))) > 0.9999  # unit vectors: cosine (measured >= 0.9999995)
        same = np.mean([np.mean(masks["device"][k] == masks["local"][k]) for k in masks["local"]])
        assert same > 0.99  # measured: 1.0


def test_no_feature_cache_recomputes_and_gives_the_same_masks(tmp_path):
    """--no-feature-cache: nothing under the cache's feature folders, the same masks as with the cache."""
    from typer.testing import CliRunner

    from segcli.cli import app
    from tests.checkpoints import TINY, checkpoint_file

    _scenes(tmp_path / "images", n=4)
    runner = CliRunner()
    out = {}
    for name, flag in {"cached": "--feature-cache", "uncached": "--no-feature-cache"}.items():
        args = ["segment", tmp_path / "images", "--out", tmp_path / name, "--weights", checkpoint_file(TINY, "timm"),
                "--cache", tmp_path / f"cache-{name}", "--k", "3", "--short-side", "224", "--device", "cpu",
                "--precision", "fp32", "--fusion", "any", "--quiet", flag]
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        out[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))}
    assert len(out["cached"]) == 4 and out["uncached"] == out["cached"]
    cached_files = {p.suffix for p in (tmp_path / "cache-cached").rglob("*") if p.is_file()}
    uncached = [p for p in (tmp_path / "cache-uncached").rglob("*.npz") if "regions" not in p.parts]
    assert ".npz" in cached_files and uncached == []
    r = runner.invoke(app, ["cluster-dataset", str(tmp_path / "images"), "--shard", "1/2", "--no-feature-cache"])
    assert r.exit_code == 2 and "--no-feature-cache" in r.output


def test_cli_device_path_gives_the_host_paths_masks(tmp_path):
    """`--device-path` (forced on the CPU) and `--host-path` write the same bytes (--features, pooled)."""
    from typer.testing import CliRunner

    from segcli.cli import app

    root = tmp_path / "data"
    make_dataset(root, n_images=8, noise=0.8, seed=5)
    out = {}
    for flag in ("--device-path", "--host-path"):
        args = ["segment", root / "images", "--features", root / "features", "--out", tmp_path / flag, "--k", "4",
                "--assign", "pooled", "--cache", tmp_path / f"cache{flag}", "--quiet", "--workers", "0", flag]
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        out[flag] = {p.relative_to(tmp_path / flag): p.read_bytes() for p in sorted((tmp_path / flag).rglob("*.png"))}
    assert len(out["--host-path"]) == 8 and out["--device-path"] == out["--host-path"]
