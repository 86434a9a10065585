"""The batched, device-resident foreground step equals the per-image step (segcli.batched vs segcli.steps).

Run on the CPU (the same tensor code runs on a GPU): a fitted model, images of different patch grids in one
batch, clean and noisy features, the three priors; and the device crops against the host crops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segcli import steps
from segcli.batched import crop_batch, foreground_batch
from segcli.config import SegmentConfig
from segcli.images import discover_images
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
    from segcli.backbone import resize_normalise

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
