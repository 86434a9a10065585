import sys
import warnings

import numpy as np
import pytest
from scipy import ndimage

import segcli.method.crf as crf_mod
from segcli.method.crf import CRFParams, CRFUnavailableWarning, crf_available, refine_foreground

needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf (pip install pydensecrf2) not installed")


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def disc_scene(h=120, w=160, seed=0):
    """A red disc on a blue background with pixel noise, and a blurred, shifted soft guess of the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - 60) ** 2 + (xx - 75) ** 2 <= 35**2
    rgb = np.where(disc[..., None], [200, 60, 50], [40, 90, 160]).astype(np.float64)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    guess = np.roll(disc, (7, -9), axis=(0, 1)).astype(np.float64)  # misplaced, like an upsampled patch map
    prob = ndimage.gaussian_filter(guess, 8)
    prob = 0.15 + 0.7 * prob  # never confident
    return rgb, prob, disc


@needs_crf
def test_crf_snaps_to_the_object():
    rgb, prob, disc = disc_scene()
    before = iou(prob > 0.5, disc)
    mask = refine_foreground(rgb, prob)
    assert mask.shape == disc.shape and mask.dtype == bool
    after = iou(mask, disc)
    assert before < 0.8
    assert after > 0.95
    assert after > before + 0.1


@needs_crf
def test_crf_accepts_read_only_and_extreme_inputs():
    rgb, prob, disc = disc_scene()
    rgb.flags.writeable = False  # e.g. np.asarray(PIL image)
    hard = (prob > 0.5).astype(np.float32)  # exact 0 and 1: clipped, no inf unaries
    mask = refine_foreground(rgb, hard)
    assert mask.shape == disc.shape
    assert (mask == (hard > 0.5)).mean() > 0.99  # confident unaries (-log 1e-5) dominate the pairwise terms
    mask = refine_foreground(rgb, prob)  # read-only image, soft map
    assert iou(mask, disc) > 0.95
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(refine_foreground(rgba, prob), refine_foreground(rgb, prob))
    # zero iterations: the CRF returns the unaries' own argmax
    assert np.array_equal(refine_foreground(rgb, prob, CRFParams(iterations=0)), prob > 0.5)


@needs_crf
def test_rgb_and_bgr_agree():
    """One srgb for all channels: the exact kernel is symmetric in channel order; the lattice nearly so."""
    rgb, prob, _ = disc_scene(seed=1)
    a = refine_foreground(rgb, prob)
    b = refine_foreground(np.ascontiguousarray(rgb[:, :, ::-1]), prob)
    assert (a != b).mean() < 0.01


def test_bad_inputs_raise():
    rgb, prob, _ = disc_scene()
    with pytest.raises(ValueError, match="fg_prob"):
        refine_foreground(rgb, prob[:, :, None])
    with pytest.raises(ValueError, match="x"):
        refine_foreground(rgb, prob[:-1])
    with pytest.raises(ValueError, match="uint8"):
        refine_foreground(rgb.astype(np.float32), prob)
    bad = prob.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_foreground(rgb, bad)


def test_missing_package_warns_once_and_thresholds(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # `import pydensecrf...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setattr(crf_mod, "_warned_missing", False)
    assert not crf_available()
    rgb, prob, _ = disc_scene()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = refine_foreground(rgb, prob)
        second = refine_foreground(rgb, 1.0 - prob)
    relevant = [w for w in caught if issubclass(w.category, CRFUnavailableWarning)]
    assert len(relevant) == 1
    assert "pip install pydensecrf2" in str(relevant[0].message)
    assert np.array_equal(first, prob > 0.5)
    assert np.array_equal(second, (1.0 - prob) > 0.5)
