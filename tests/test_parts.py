import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from segcli.method.kmeans import KMeans
from segcli.method.parts import merge_parts, normalised_weights, part_adjacency

# ------------------------------------------------------------------------------------------ synthetic data


def shape_parts(layout: str, h: int, w: int) -> np.ndarray:
    """Part index (0..n-1) of every pixel of an h x w object box, spatially contiguous parts."""
    yy, xx = np.mgrid[0:h, 0:w]
    if layout == "halves":  # top / bottom
        return (yy >= h // 2).astype(np.int64)
    if layout == "thirds":  # left / middle / right
        return np.minimum(xx * 3 // w, 2)
    if layout == "quadrants":
        return (yy >= h // 2) * 2 + (xx >= w // 2)
    raise ValueError(layout)


CLASSES = [("halves", 2), ("thirds", 3), ("quadrants", 4)]  # class c -> its parts


def synthetic_dataset(n_images=40, grid=(24, 24), seed=0):
    """Patch grids of part ids (-1 = background) of 1-3 objects per image; objects may touch or overlap.

    Returns the grids and the ground-truth class of every part id.
    """
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [n for _, n in CLASSES])
    part_class = np.repeat(np.arange(len(CLASSES)), [n for _, n in CLASSES])
    grids = []
    for _ in range(n_images):
        g = -np.ones(grid, dtype=np.int64)
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(len(CLASSES)))
            oh, ow = (int(v) for v in rng.integers(6, 13, size=2))
            y, x = int(rng.integers(0, grid[0] - oh + 1)), int(rng.integers(0, grid[1] - ow + 1))
            g[y : y + oh, x : x + ow] = offsets[c] + shape_parts(CLASSES[c][0], oh, ow)
        grids.append(g)
    return grids, part_class


# ------------------------------------------------------------------------------------------ part_adjacency


def test_part_adjacency_counts_by_hand():
    grid = np.array(
        [
            [0, 0, 1, -1],
            [2, 0, 1, -1],
            [2, 2, -1, 1],
        ]
    )
    A = part_adjacency(grid, 4)
    expected = np.zeros((4, 4), np.int64)
    # horizontal: (0,1) row0, (2,0) row1, (0,1) row1 ; vertical: (0,2) col0 r0-r1, (0,2) col1 r1-r2
    expected[0, 1] = expected[1, 0] = 2
    expected[0, 2] = expected[2, 0] = 3
    assert A.dtype == np.int64
    assert np.array_equal(A, expected)  # background (-1) pairs and same-part pairs are not counted


def test_part_adjacency_is_symmetric_and_sums_over_images():
    grids, part_class = synthetic_dataset(n_images=5)
    n = len(part_class)
    total = sum(part_adjacency(g, n) for g in grids)
    assert np.array_equal(total, total.T)
    assert np.all(np.diag(total) == 0)
    # brute force over pixel pairs
    brute = np.zeros((n, n), np.int64)
    for g in grids:
        h, w = g.shape
        for y in range(h):
            for x in range(w):
                for dy, dx in ((0, 1), (1, 0)):
                    if y + dy < h and x + dx < w:
                        a, b = g[y, x], g[y + dy, x + dx]
                        if a >= 0 and b >= 0 and a != b:
                            brute[a, b] += 1
                            brute[b, a] += 1
    assert np.array_equal(total, brute)


def test_part_adjacency_rejects_bad_ids():
    with pytest.raises(ValueError, match="n_parts"):
        part_adjacency(np.array([[0, 5]]), 3)
    with pytest.raises(ValueError):
        part_adjacency(np.zeros((2, 2), np.float32), 3)
    assert part_adjacency(-np.ones((3, 3), np.int64), 0).shape == (0, 0)


# ------------------------------------------------------------------------------------------ merge_parts


def test_merge_recovers_classes_from_ground_truth_parts():
    grids, part_class = synthetic_dataset()
    n = len(part_class)
    A = sum(part_adjacency(g, n) for g in grids)
    sizes = np.bincount(np.concatenate([g[g >= 0] for g in grids]), minlength=n)
    labels = merge_parts(A, 3, seed=0, part_sizes=sizes)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    assert adjusted_rand_score(part_class, labels) == 1.0
    # deterministic, numbered by total size (descending)
    assert np.array_equal(labels, merge_parts(A, 3, seed=0, part_sizes=sizes))
    tot = np.bincount(labels, weights=sizes)
    assert np.all(np.diff(tot) <= 0)
    # the normalisation does not need part sizes: same partition without them
    assert adjusted_rand_score(labels, merge_parts(A, 3, seed=0)) == 1.0


def test_merge_end_to_end_with_kmeans_parts():
    """Parts found by over-clustering noisy features, not given: classes still recovered exactly."""
    grids, part_class = synthetic_dataset(n_images=60, seed=1)
    rng = np.random.default_rng(1)
    d = 32
    part_centroids = rng.standard_normal((len(part_class), d))
    feats = [part_centroids[np.maximum(g, 0)] + 0.25 * rng.standard_normal(g.shape + (d,)) for g in grids]
    fg = [g >= 0 for g in grids]
    X = np.concatenate([f[m] for f, m in zip(feats, fg)]).astype(np.float32)
    n_parts = 18  # twice the true number of parts
    model = KMeans(n_parts, seed=0).fit(X)
    A = np.zeros((n_parts, n_parts), np.int64)
    sizes = np.zeros(n_parts, np.int64)
    part_grids = []
    for f, m in zip(feats, fg):
        pg = -np.ones(m.shape, np.int64)
        pg[m] = model.predict(f[m])
        part_grids.append(pg)
        A += part_adjacency(pg, n_parts)
        sizes += np.bincount(pg[m], minlength=n_parts)
    classes = merge_parts(A, 3, seed=0, part_sizes=sizes, centroids=model.cluster_centers_)
    assert len(set(classes.tolist())) == 3
    truth = np.concatenate([part_class[g[m]] for g, m in zip(grids, fg)])
    pred = np.concatenate([classes[pg[m]] for pg, m in zip(part_grids, fg)])
    assert adjusted_rand_score(truth, pred) == 1.0


def test_merge_many_classes_with_boundary_leaks():
    """12 classes of 2-4 parts, objects overlapping, plus 'leak' parts on object borders touching every
    class (foreground-mask errors): every real part still lands with its class."""
    rng = np.random.default_rng(5)
    n_classes, grid = 12, (28, 28)
    layouts = [CLASSES[i % 3] for i in range(n_classes)]
    offsets = np.cumsum([0] + [n for _, n in layouts])
    n_real, n_leak = int(offsets[-1]), 4
    part_class = np.concatenate([np.repeat(np.arange(n_classes), [n for _, n in layouts]), -np.ones(n_leak, int)])
    freq = 1.0 / np.arange(1, n_classes + 1)
    freq /= freq.sum()
    A = np.zeros((n_real + n_leak,) * 2, np.int64)
    for _ in range(600):
        g = -np.ones(grid, np.int64)
        for _ in range(rng.integers(1, 4)):
            c = int(rng.choice(n_classes, p=freq))
            oh, ow = (int(v) for v in rng.integers(5, 14, size=2))
            y, x = int(rng.integers(0, grid[0] - oh + 1)), int(rng.integers(0, grid[1] - ow + 1))
            g[y : y + oh, x : x + ow] = offsets[c] + shape_parts(layouts[c][0], oh, ow)
        border = np.zeros(grid, bool)
        border[:, :-1] |= (g[:, :-1] < 0) & (g[:, 1:] >= 0)
        border[1:] |= (g[1:] < 0) & (g[:-1] >= 0)
        leak = border & (rng.random(grid) < 0.3)
        g[leak] = n_real + rng.integers(0, n_leak, size=int(leak.sum()))
        A += part_adjacency(g, len(part_class))
    labels = merge_parts(A, n_classes, seed=0)
    real = part_class >= 0
    assert len(set(labels.tolist())) == n_classes
    assert adjusted_rand_score(part_class[real], labels[real]) == 1.0


def test_never_more_than_n_classes():
    # 5 disconnected pairs of parts; asking for 3 must merge components (no edges between them)
    A = np.zeros((10, 10), np.int64)
    for i in range(0, 10, 2):
        A[i, i + 1] = A[i + 1, i] = 10 + i
    labels = merge_parts(A, 3)
    assert len(set(labels.tolist())) == 3
    for i in range(0, 10, 2):
        assert labels[i] == labels[i + 1]
    assert merge_parts(A, 5).tolist() == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]  # numbered by size (strength)


def test_isolated_parts_follow_centroids():
    A = np.zeros((6, 6), np.int64)  # no adjacency at all
    centroids = np.array([[0, 0], [10, 10], [0.1, 0], [10, 9.9], [0, 0.2], [9.8, 10]])
    labels = merge_parts(A, 2, part_sizes=np.ones(6), centroids=centroids)
    assert adjusted_rand_score([0, 1, 0, 1, 0, 1], labels) == 1.0
    # without centroids: still exactly n_classes communities, no crash
    assert len(set(merge_parts(A, 2).tolist())) == 2


def test_isolated_parts_do_not_take_class_slots():
    grids, part_class = synthetic_dataset()
    n = len(part_class)
    A = np.zeros((n + 3, n + 3), np.int64)  # 3 extra parts that never touch anything (empty clusters)
    A[:n, :n] = sum(part_adjacency(g, n) for g in grids)
    rng = np.random.default_rng(0)
    class_centre = rng.standard_normal((3, 8)) * 10
    centroids = class_centre[np.concatenate([part_class, [2, 0, 1]])] + rng.standard_normal((n + 3, 8))
    sizes = np.concatenate([np.bincount(np.concatenate([g[g >= 0] for g in grids]), minlength=n), [0, 0, 0]])
    labels = merge_parts(A, 3, part_sizes=sizes, centroids=centroids)
    assert adjusted_rand_score(np.concatenate([part_class, [2, 0, 1]]), labels) == 1.0
    labels = merge_parts(A, 3)  # no centroids: they join the largest community, still 3 classes
    assert len(set(labels.tolist())) == 3
    assert adjusted_rand_score(part_class, labels[:n]) == 1.0
    assert set(labels[n:].tolist()) == {0}


def test_merge_degenerate_inputs():
    assert merge_parts(np.zeros((0, 0)), 3).shape == (0,)
    A = np.ones((4, 4)) - np.eye(4)
    assert sorted(merge_parts(A, 10).tolist()) == [0, 1, 2, 3]  # n_classes >= n_parts: one part each
    assert merge_parts(A, 1).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        merge_parts(np.ones((3, 4)), 2)
    with pytest.raises(ValueError):
        merge_parts(-A, 2)
    with pytest.raises(ValueError):
        merge_parts(A, 0)
    with pytest.raises(ValueError, match="part_sizes"):
        merge_parts(A, 2, part_sizes=np.ones(3))


def test_normalised_weights():
    A = np.array([[0, 4, 0], [4, 0, 1], [0, 1, 0]])
    W = normalised_weights(A)
    s = A.sum(1)
    assert W[0, 1] == pytest.approx(4 / np.sqrt(s[0] * s[1]))
    assert np.allclose(W, W.T)
    assert normalised_weights(np.zeros((2, 2))).sum() == 0
