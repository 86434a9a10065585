import sys
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import segcli.method.kmeans as km_mod
from segcli.method.kmeans import KMeans, assign_nearest, cluster_embeddings, faiss_available

BACKENDS = ["numpy", "sklearn", "torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed"))]


def blobs(n_per=150, k=4, d=16, spread=0.05, seed=0, normalise=False):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    X = centers[y] + spread * rng.standard_normal((len(y), d))
    if normalise:
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_blobs(backend):
    X, y = blobs()
    model = KMeans(4, seed=0, backend=backend).fit(X)
    assert model.backend_.startswith(backend)
    assert model.cluster_centers_.shape == (4, 16)
    assert model.cluster_centers_.dtype == np.float32
    assert adjusted_rand_score(y, model.predict(X)) == 1.0
    assert np.array_equal(model.fit_predict(X), model.predict(X))


def test_auto_uses_numpy_for_small_and_library_for_large(monkeypatch):
    X, y = blobs()
    assert KMeans(4).fit(X).backend_ == "numpy"
    monkeypatch.setattr(km_mod, "_NUMPY_MAX_WORK", 0)
    model = KMeans(4).fit(X)
    assert model.backend_ in ("faiss", "faiss-gpu") if faiss_available() else model.backend_ == "sklearn"
    assert adjusted_rand_score(y, model.predict(X)) == 1.0


def test_auto_falls_back_to_sklearn_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    monkeypatch.setattr(km_mod, "_NUMPY_MAX_WORK", 0)
    X, y = blobs()
    model = KMeans(4).fit(X)
    assert model.backend_ == "sklearn"
    assert adjusted_rand_score(y, model.predict(X)) == 1.0
    with pytest.raises(ValueError, match="faiss"):
        KMeans(4, backend="faiss").fit(X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_centres(backend):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((800, 16)).astype(np.float32)  # no structure: init matters
    a = KMeans(5, seed=7, backend=backend).fit(X).cluster_centers_
    b = KMeans(5, seed=7, backend=backend).fit(X).cluster_centers_
    assert np.array_equal(a, b)
    assert not np.array_equal(a, KMeans(5, seed=8, backend=backend).fit(X).cluster_centers_)  # seed is used


def test_subsampling_is_seeded():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5000, 8)).astype(np.float32)
    a = KMeans(3, seed=1, max_samples=500).fit(X)
    b = KMeans(3, seed=1, max_samples=500).fit(X)
    c = KMeans(3, seed=2, max_samples=500).fit(X)
    assert a.n_fit_samples_ == 500
    assert np.array_equal(a.cluster_centers_, b.cluster_centers_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_centres_sorted_by_cluster_size():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.1, (50, 3)), rng.normal(5, 0.1, (300, 3)), rng.normal(-5, 0.1, (120, 3))])
    for backend in ("numpy", "sklearn"):
        model = KMeans(3, backend=backend).fit(X)
        assert np.bincount(model.predict(X)).tolist() == [300, 120, 50]
        assert model.cluster_centers_[0] == pytest.approx([5, 5, 5], abs=0.1)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="0 samples"):
        KMeans(2).fit(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError):
        KMeans(2).fit(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="n_clusters"):
        KMeans(0).fit(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="backend"):
        KMeans(2, backend="cuml").fit(np.zeros((4, 2)))


def test_non_finite_raises():
    X = np.ones((10, 3), np.float32)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        KMeans(2).fit(X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_rows_than_clusters(backend):
    X = np.array([[0, 0], [1, 1], [0, 0]], np.float32)
    model = KMeans(5, backend=backend).fit(X)
    assert model.cluster_centers_.shape == (5, 2)
    assert model.n_distinct_ == 2
    labels = model.predict(X)
    assert labels[0] == labels[2] != labels[1]
    assert set(labels.tolist()) <= {0, 1}  # padded copies never win a tie


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_rows(backend):
    X = np.tile(np.arange(6, dtype=np.float32), (200, 1))
    model = KMeans(3, backend=backend).fit(X)
    assert model.cluster_centers_.shape == (3, 6)
    assert np.all(model.cluster_centers_ == X[0])
    assert np.all(model.predict(X) == 0)
    assert model.inertia_ == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_distinct_rows_than_clusters(backend):
    X = np.array([[0, 0]] * 6 + [[1, 2]] * 4, np.float32)
    model = KMeans(5, backend=backend).fit(X)
    assert model.cluster_centers_.shape == (5, 2)
    labels = model.predict(X)
    assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:].tolist())) == 1 and labels[0] != labels[6]


def test_float16_input():
    X, y = blobs()
    model = KMeans(4).fit(X.astype(np.float16))
    assert model.cluster_centers_.dtype == np.float32
    assert adjusted_rand_score(y, model.predict(X.astype(np.float16))) == 1.0


def test_predict_equals_brute_force_and_chunking():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((777, 8)).astype(np.float32)
    C = rng.standard_normal((7, 8)).astype(np.float32)
    brute = np.argmin(((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1), axis=1)
    got = assign_nearest(X, C)
    assert got.dtype == np.int64
    assert np.array_equal(got, brute)
    for chunk in (1, 7, 64, 776, 100_000):
        assert np.array_equal(assign_nearest(X, C, chunk_size=chunk), brute)
    model = KMeans(7).fit(X)
    assert np.array_equal(model.predict(X, chunk_size=13), assign_nearest(X, model.cluster_centers_))
    assert assign_nearest(np.zeros((0, 8), np.float32), C).shape == (0,)


def test_duplicate_centres_tie_to_lowest_index():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 5)).astype(np.float32)
    C = np.stack([X[0] + 10, X[1], X[1], X[1]])
    assert set(assign_nearest(X, C).tolist()) <= {0, 1}


def test_predict_before_fit_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(2).predict(np.zeros((3, 2)))


def test_per_image_fit_is_cheap():
    """Step 5 runs once per image: ~1000 keys of dim 384, k=2 (target well under 10 ms; loose bound here)."""
    X, _ = blobs(n_per=500, k=2, d=384, spread=0.03, normalise=True)
    KMeans(2).fit(X)
    best = min(_timed(lambda: KMeans(2).fit(X)) for _ in range(5))
    assert best < 0.05


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_cluster_embeddings_on_blobs(method):
    X, y = blobs(n_per=60, k=5, d=32, spread=0.08, normalise=True)
    centres = cluster_embeddings(X, 5, method=method, seed=0)
    assert centres.shape == (5, 32) and centres.dtype == np.float32
    assert adjusted_rand_score(y, assign_nearest(X, centres)) == 1.0
    if method == "spectral":
        assert np.allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)
        assert np.array_equal(centres, cluster_embeddings(X, 5, method=method, seed=0))


def test_cluster_embeddings_degenerate():
    X = np.eye(3, dtype=np.float32)
    for method in ("kmeans", "spectral"):
        centres = cluster_embeddings(X, 5, method=method)
        assert centres.shape == (5, 3)
    with pytest.raises(ValueError):
        cluster_embeddings(np.zeros((0, 3)), 2)
    with pytest.raises(ValueError, match="method"):
        cluster_embeddings(X, 2, method="dbscan")


def test_threads_give_same_centres_and_restore_blas_threads():
    from concurrent.futures import ThreadPoolExecutor

    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.ThreadpoolController().select(user_api="blas").info()]

    rng = np.random.default_rng(0)
    Xs = [rng.standard_normal((400, 32)).astype(np.float32) for _ in range(16)]
    before = blas_threads()
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda X: KMeans(2, seed=0).fit(X).cluster_centers_, Xs))
    assert blas_threads() == before
    for X, centres in zip(Xs, parallel):
        assert np.array_equal(centres, KMeans(2, seed=0).fit(X).cluster_centers_)


def test_torch_engine_matches_the_numpy_engine():
    """The torch engine (the device path of large fits, here on the CPU) runs the numpy engine's algorithm:
    same partition on separable data, and an inertia as good on structureless data."""
    X, y = blobs(n_per=300, k=6, d=32, spread=0.2)
    a = KMeans(6, seed=3, backend="numpy").fit(X)
    b = KMeans(6, seed=3, backend="torch").fit(X)
    assert b.backend_ == "torch"
    assert adjusted_rand_score(a.predict(X), b.predict(X)) == 1.0
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    noise = np.random.default_rng(1).standard_normal((3000, 24)).astype(np.float32)
    inertia = {e: KMeans(8, seed=0, backend=e).fit(noise).inertia_ for e in ("numpy", "sklearn", "torch")}
    assert inertia["torch"] <= 1.02 * min(inertia["numpy"], inertia["sklearn"]), inertia


def test_torch_engine_blocks_and_empty_clusters(monkeypatch):
    """Results do not depend on the row blocking, and clusters that empty are re-seeded."""
    X, _ = blobs(n_per=200, k=5, d=8, spread=0.3)
    whole = KMeans(5, seed=0, backend="torch").fit(X).cluster_centers_
    monkeypatch.setattr(km_mod, "_TORCH_BLOCK_ROWS", 97)
    np.testing.assert_allclose(KMeans(5, seed=0, backend="torch").fit(X).cluster_centers_, whole, atol=1e-5)
    dup = np.repeat(np.eye(3, dtype=np.float32), 50, axis=0)
    model = KMeans(3, seed=0, backend="torch").fit(dup)
    assert sorted(map(tuple, model.cluster_centers_.round(6))) == sorted(map(tuple, np.eye(3, dtype=np.float32)))


def test_auto_puts_large_fits_on_the_device(monkeypatch):
    monkeypatch.setattr(km_mod, "_NUMPY_MAX_WORK", 0)
    monkeypatch.setattr(km_mod, "_cuda_available", lambda: True)
    monkeypatch.setattr(km_mod, "_faiss_gpus", lambda: 0)
    assert KMeans(4)._choose_backend(1000, 16, 4) == "torch"
    monkeypatch.setattr(km_mod, "_faiss_gpus", lambda: 1)
    assert KMeans(4)._choose_backend(1000, 16, 4) == "faiss"
    monkeypatch.setattr(km_mod, "_cuda_available", lambda: False)
    assert KMeans(4)._choose_backend(1000, 16, 4) in ("faiss", "sklearn")
