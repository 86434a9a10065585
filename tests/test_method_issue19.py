"""Issue 19, method loose ends: the attention tie is a tolerance (|a - b| < 0.05), and the default number of
CLS-token categories scales with the number of images."""

from __future__ import annotations

import numpy as np
import pytest

from segcli.config import IMAGES_PER_CATEGORY, SegmentConfig
from segcli.method.foreground import ATTENTION_TIE, label_clusters


def _two_clusters(a: float, b: float, border_a: float, border_b: float):
    """Cluster 0 and 1, 50 patches each, with exact mean attention a / b and border share border_a / border_b."""
    labels = np.repeat([0, 1], 50)
    attn = np.concatenate([np.full(50, a), np.full(50, b)])
    border = np.concatenate([np.arange(50) < 50 * border_a, np.arange(50) < 50 * border_b]).astype(float)
    return labels, attn, border


@pytest.mark.parametrize("a,b,tied", [
    (0.124, 0.126, True),   # 0.002 apart across a 0.05 rounding boundary: the old grid split them
    (0.101, 0.149, True),   # 0.048 apart inside one grid cell: tied then and now
    (0.100, 0.160, False),  # 0.06 apart: attention decides
])
def test_attention_tie_is_a_tolerance(a, b, tied):
    assert ATTENTION_TIE == 0.05
    # cluster 1 has the higher attention but touches the border more
    labels, attn, border = _two_clusters(a, b, border_a=0.0, border_b=0.8)
    fg = label_clusters(labels, 2, attn, border)
    assert fg.tolist() == ([True, False] if tied else [False, True])


def test_keep_one_of_each_rules_use_the_same_tolerance():
    """With 3+ clusters the fallbacks pick the most / least foreground cluster by the same tolerance."""
    from segcli.method.foreground import _least_foreground, _most_foreground

    mean = np.array([0.124, 0.126, 0.50, -np.inf])
    border = np.array([0.9, 0.1, 0.5, np.inf])
    assert _least_foreground(mean, border) == 3  # an empty cluster is never foreground
    assert _least_foreground(mean[:3], border[:3]) == 0  # 0.002 apart: the one touching the border more
    assert _most_foreground(np.array([0.50, 0.46, 0.1]), np.array([0.6, 0.2, 0.0])) == 1  # 0.04 apart: less border
    assert _most_foreground(np.array([0.50, 0.44, 0.1]), np.array([0.6, 0.2, 0.0])) == 0  # 0.06 apart


@pytest.mark.parametrize("n_images,expected", [(1, 1), (11, 1), (25, 2), (200, 20), (5000, 20)])
def test_default_categories_scale_with_images(n_images, expected):
    cfg = SegmentConfig(k=21)
    assert cfg.n_things == 20 and IMAGES_PER_CATEGORY == 10
    assert cfg.category_count(n_images) == expected


def test_explicit_categories_are_kept_up_to_one_per_image():
    assert SegmentConfig(k=21, categories=5).category_count(3) == 3
    assert SegmentConfig(k=21, categories=5).category_count(11) == 5
