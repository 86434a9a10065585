"""One k-means interface for the whole pipeline (docs/method.md, "Each stage": the levels, classes, parts and k-means).

:class:`KMeans` fits with one of four interchangeable engines and always *predicts* in numpy, so a model
gives the same labels whichever engine fitted it (and a model loaded from a file needs no engine at all:
:func:`assign_nearest`).

Engines (``backend=``):

``"numpy"``
    Lloyd's algorithm with greedy k-means++ seeding (scikit-learn's variant), written here, stopping as
    soon as no label changes, with numpy's BLAS limited to one thread while it runs. Per-image clustering
    (the image level of docs/method.md: ~1000-3000 patches, k=2) runs once per image, and at that size library overhead
    dominates. Measured for 1000x384, k=2, n_init=3 on 2 shared CPU cores (load ~3, best of 15): numpy
    6 ms on two-cluster data (10 ms on structureless Gaussian noise, which needs more iterations);
    faiss 21 ms (115 ms); scikit-learn 155 ms (250 ms). At lower load: numpy ~5 ms, faiss 16 ms,
    scikit-learn 58 ms.
``"faiss"``
    ``faiss.Kmeans`` with k-means++ seeding (when the installed faiss has it), ``nredo=n_init``, its
    early stop, faiss's own subsampling switched off (``max_samples`` governs) and, when
    ``faiss.get_num_gpus() > 0``, the GPU index. Meant for large inputs, above all on a GPU.
``"sklearn"``
    ``sklearn.cluster.KMeans`` (Lloyd, k-means++, ``n_init``) up to 50 000 rows, ``MiniBatchKMeans``
    (batch 4096) above.
``"torch"``
    The numpy engine's algorithm (greedy k-means++, Lloyd until no label changes, empty clusters re-seeded
    on the farthest rows) in torch, on the CUDA device when there is one (``backend_`` ``"torch-cuda"``),
    else on the CPU (``"torch"``). Distances and cluster sums are computed in blocks of rows (memory bounded)
    with matrix products only (no atomic scatter-adds), so a fixed seed gives the same centres twice on a
    device too. Meant for large fits on a GPU without faiss-gpu.
``"auto"`` (default)
    ``"numpy"`` when ``n * k * d <= 30e6`` (every per-image fit and small per-category fits; e.g.
    20000x384, k=2 took 0.4 s in numpy against 1.2 s in faiss and 1.1 s in scikit-learn on 2 cores), else,
    with a CUDA device present, ``"faiss"`` when the installed faiss has GPUs (faiss-gpu), otherwise
    ``"torch"`` on the device; without one ``"faiss"`` if it imports, else ``"sklearn"``. The choice depends only on the input's shape and on
    what is installed, so a fixed seed gives the same centres on a given machine; the engine used is
    stored in ``backend_``.

Determinism and order of the centres: all engines are seeded from ``seed``; the same input and seed give
bit-identical centres twice on the same machine (same thread count). After fitting, centres are *sorted*
by the number of fitting rows assigned to them, largest first (ties by the centres' coordinates), so
label 0 is the biggest cluster. Centres from different engines are close but not bit-identical.

Degenerate inputs: ``n == 0`` raises ``ValueError``; non-finite values raise ``ValueError``; float16 (or
any numeric dtype) is cast to float32. The model always has ``n_clusters`` centres. With ``n <= k`` or
all rows identical no engine runs ("trivial"): the distinct rows are the centres, followed by copies of
the first one; :func:`assign_nearest` gives exact ties to the lowest index, so the copies never receive a
label. With more rows but fewer distinct values than ``k`` the engine's own handling applies (repeated or
slightly perturbed centres; every row still goes to a centre equal or next to it). ``n_distinct_`` counts
the distinct centres.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings

import numpy as np

__all__ = ["KMeans", "assign_nearest", "cluster_embeddings", "faiss_available"]

_BACKENDS = ("auto", "numpy", "faiss", "sklearn", "torch")
_NUMPY_MAX_WORK = 30_000_000  # n * k * d at or below which "auto" uses the numpy engine
_MINIBATCH_MIN_ROWS = 50_000  # sklearn: MiniBatchKMeans above this many rows


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _as_float32_2d(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


_blas_lock = threading.Lock()
_blas_controller = None
_blas_depth = 0
_blas_limiter = None


@contextlib.contextmanager
def _single_threaded_blas():
    """Limit numpy's BLAS to one thread for the duration (threadpoolctl, when installed).

    The numpy engine only runs on small problems, where BLAS threads cost more than they bring: on a
    loaded 2-core machine, multi-threaded OpenBLAS made these tiny products 10-100x slower (spin-waiting).
    The limit is process-wide, so it is reference-counted under a lock: safe when several threads cluster
    at once (the first to enter sets it, the last to leave restores the original thread count).
    """
    global _blas_controller, _blas_depth, _blas_limiter
    with _blas_lock:
        if _blas_depth == 0:
            try:
                if _blas_controller is None:
                    from threadpoolctl import ThreadpoolController

                    _blas_controller = ThreadpoolController()
                _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
            except Exception:  # threadpoolctl missing or unable to inspect this process: run as is
                _blas_limiter = None
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def first_distinct_rows(C: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, ascending (cheap for a few hundred rows)."""
    seen: dict[bytes, int] = {}
    C = np.ascontiguousarray(C)
    for i in range(C.shape[0]):
        seen.setdefault(C[i].tobytes(), i)
    return np.fromiter(sorted(seen.values()), dtype=np.int64, count=len(seen))


def assign_nearest(X: np.ndarray, centers: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
    """Index of the nearest centre (squared L2) for every row of ``X``, as int64.

    Computed in float64 as ``|c|^2 - 2 x.c`` (the ``|x|^2`` term does not change the argmin) on blocks of
    at most ``chunk_size`` rows, so memory stays bounded and the result does not depend on the chunking.
    Exactly equal centres tie to the lowest index. ``X`` may be empty (returns an empty array).
    """
    X = np.asarray(X)
    C = np.asarray(centers, dtype=np.float64)
    if X.ndim != 2 or C.ndim != 2:
        raise ValueError(f"X and centers must be 2-D, got shapes {X.shape} and {C.shape}")
    if C.shape[0] == 0:
        raise ValueError("centers is empty")
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features but the centres have {C.shape[1]}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    # Exact duplicate centres: keep the first of each, so ties can never depend on BLAS rounding.
    n_centers = C.shape[0]
    keep = first_distinct_rows(C + 0.0)  # + 0.0: -0.0 and 0.0 are one value
    if len(keep) < n_centers:
        C = C[keep]
    half_sq = 0.5 * np.einsum("ij,ij->i", C, C)
    CT = np.ascontiguousarray(C.T)
    out = np.empty(X.shape[0], dtype=np.int64)
    small = X.shape[0] * C.shape[0] * C.shape[1] <= _NUMPY_MAX_WORK
    with _single_threaded_blas() if small else contextlib.nullcontext():
        for start in range(0, X.shape[0], chunk_size):
            block = np.asarray(X[start : start + chunk_size], dtype=np.float64)
            scores = block @ CT  # x.c ; nearest centre maximises x.c - |c|^2/2
            scores -= half_sq
            out[start : start + chunk_size] = np.argmax(scores, axis=1)
    return keep[out] if len(keep) < n_centers else out


# --------------------------------------------------------------------------------------------- engines


def _sq_dists(X: np.ndarray, x_sq: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = X @ np.ascontiguousarray(C.T)
    d *= -2.0
    d += x_sq[:, None]
    d += np.einsum("ij,ij->i", C, C)[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def kmeans_pp(X: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step, keep the best)."""
    n = X.shape[0]
    n_trials = 2 + int(math.log(k))
    centers = np.empty((k, X.shape[1]), dtype=X.dtype)
    centers[0] = X[rng.integers(n)]
    closest = _sq_dists(X, x_sq, centers[:1])[:, 0]
    pot = closest.sum()
    for c in range(1, k):
        if pot <= 0:  # every row already sits on a centre
            cand = rng.integers(n, size=n_trials)
        else:
            cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(n_trials) * pot)
            np.minimum(cand, n - 1, out=cand)
        d_cand = _sq_dists(X, x_sq, X[cand])  # (n, trials)
        np.minimum(d_cand, closest[:, None], out=d_cand)
        pots = d_cand.sum(axis=0)
        best = int(np.argmin(pots))
        centers[c] = X[cand[best]]
        closest = d_cand[:, best]
        pot = pots[best]
    return centers


def _cluster_sums(X: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    k = len(counts)
    if k * X.shape[0] <= 4_000_000:  # one-hot (k, n) product: fastest measured (single-threaded BLAS)
        onehot = (labels[None, :] == np.arange(k)[:, None]).astype(X.dtype)
        return onehot @ X
    order = np.argsort(labels, kind="stable")
    sums = np.zeros((k, X.shape[1]), dtype=X.dtype)
    present = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
    sums[present] = np.add.reduceat(X[order], starts, axis=0)
    return sums


def _lloyd_numpy(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    with _single_threaded_blas():
        return _lloyd_numpy_impl(X, k, seed, n_init, max_iter)


def _lloyd_numpy_impl(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    x_sq = np.einsum("ij,ij->i", X, X)
    best_c, best_inertia = None, np.inf
    for _ in range(n_init):
        C = kmeans_pp(X, x_sq, k, rng)
        labels = None
        for _ in range(max_iter):
            d = _sq_dists(X, x_sq, C)
            new = np.argmin(d, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=k)
            sums = _cluster_sums(X, labels, counts)
            empty = np.flatnonzero(counts == 0)
            C = sums / np.maximum(counts, 1)[:, None].astype(X.dtype)
            if len(empty):  # re-seed empty clusters on the rows farthest from their centre
                far = np.argsort(-d[np.arange(n), labels], kind="stable")[: len(empty)]
                C[empty[: len(far)]] = X[far]
        inertia = float(_sq_dists(X, x_sq, C).min(axis=1).sum(dtype=np.float64))
        if inertia < best_inertia:
            best_c, best_inertia = C, inertia
    return best_c


def _fit_faiss(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> tuple[np.ndarray, str]:
    import faiss

    gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    params = dict(
        niter=max_iter,
        nredo=n_init,
        seed=int(seed) % (2**31),
        max_points_per_centroid=X.shape[0] + 1,  # no faiss-side subsampling: max_samples governs
        min_points_per_centroid=1,  # silences faiss's "please provide at least ..." warning
        verbose=False,
    )
    probe = faiss.ClusteringParameters()
    if hasattr(probe, "init_method") and hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        params["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    if gpu:
        params["gpu"] = True
    km = faiss.Kmeans(X.shape[1], k, **params)
    km.train(X)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, X.shape[1]), ("faiss-gpu" if gpu else "faiss")


def _fit_sklearn(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> tuple[np.ndarray, str]:
    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # "Number of distinct clusters found smaller than n_clusters": handled by the caller's padding rules
        warnings.simplefilter("ignore", ConvergenceWarning)
        if X.shape[0] > _MINIBATCH_MIN_ROWS:
            model = MiniBatchKMeans(
                n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter, batch_size=4096
            )
            name = "sklearn-minibatch"
        else:
            model = SKKMeans(n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter, algorithm="lloyd")
            name = "sklearn"
        model.fit(X)
    return np.asarray(model.cluster_centers_, dtype=np.float32), name


def _cuda_available() -> bool:
    """A CUDA device is usable (torch imported only when it is installed; the numpy engines never need it)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


_TORCH_BLOCK_ROWS = 65536  # rows per distance / sum block of the torch engine: memory ~ block * (k + d)


def _fit_torch(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int,
               device: str | None = None) -> tuple[np.ndarray, str]:
    """The numpy engine's algorithm in torch, on CUDA when available (see the module docstring)."""
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if _cuda_available() else "cpu")
    gen = torch.Generator().manual_seed(int(seed))  # every random draw on the CPU: the same on any device
    Xt = torch.from_numpy(X).to(dev)
    n = Xt.shape[0]
    x_sq = (Xt * Xt).sum(dim=1)

    def sq_dists(C: torch.Tensor) -> torch.Tensor:
        d = torch.cat([x_sq[s:s + _TORCH_BLOCK_ROWS, None] - 2.0 * (Xt[s:s + _TORCH_BLOCK_ROWS] @ C.T)
                       for s in range(0, n, _TORCH_BLOCK_ROWS)])
        return (d + (C * C).sum(dim=1)[None, :]).clamp_min_(0.0)

    def seed_centres() -> torch.Tensor:  # greedy k-means++, as kmeans_pp
        trials = 2 + int(math.log(k))
        C = Xt.new_empty((k, Xt.shape[1]))
        C[0] = Xt[int(torch.randint(n, (1,), generator=gen))]
        closest = sq_dists(C[:1])[:, 0]
        pot = float(closest.sum(dtype=torch.float64))
        for c in range(1, k):
            if pot <= 0:
                cand = torch.randint(n, (trials,), generator=gen)
            else:
                cum = torch.cumsum(closest.double(), 0).cpu()
                cand = torch.searchsorted(cum, torch.rand(trials, generator=gen, dtype=torch.float64) * pot)
                cand = cand.clamp_(max=n - 1)
            d_cand = torch.minimum(sq_dists(Xt[cand.to(dev)]), closest[:, None])
            pots = d_cand.sum(dim=0, dtype=torch.float64)
            best = int(torch.argmin(pots))
            C[c] = Xt[int(cand[best])]
            closest = d_cand[:, best]
            pot = float(pots[best])
        return C

    def cluster_sums(labels: torch.Tensor) -> torch.Tensor:
        sums = Xt.new_zeros((k, Xt.shape[1]))
        ids = torch.arange(k, device=dev)[:, None]
        for s in range(0, n, _TORCH_BLOCK_ROWS):  # one-hot products: deterministic, unlike index_add_ on CUDA
            onehot = (labels[None, s:s + _TORCH_BLOCK_ROWS] == ids).to(Xt.dtype)
            sums += onehot @ Xt[s:s + _TORCH_BLOCK_ROWS]
        return sums

    best_c, best_inertia = None, math.inf
    with torch.inference_mode():
        for _ in range(n_init):
            C = seed_centres()
            labels = None
            for _ in range(max_iter):
                d = sq_dists(C)
                new = torch.argmin(d, dim=1)
                if labels is not None and torch.equal(new, labels):
                    break
                labels = new
                counts = torch.bincount(labels, minlength=k)
                C = cluster_sums(labels) / counts.clamp_min(1)[:, None].to(Xt.dtype)
                empty = torch.nonzero(counts == 0).flatten()
                if len(empty):  # re-seed empty clusters on the rows farthest from their centre
                    far = torch.argsort(-d[torch.arange(n, device=dev), labels], stable=True)[: len(empty)]
                    C[empty[: len(far)]] = Xt[far]
            inertia = float(sq_dists(C).min(dim=1).values.sum(dtype=torch.float64))
            if inertia < best_inertia:
                best_c, best_inertia = C, inertia
    return best_c.cpu().numpy().astype(np.float32), ("torch-cuda" if dev.type == "cuda" else "torch")


# --------------------------------------------------------------------------------------------- model


class KMeans:
    """k-means with scikit-learn's conventions: parameters in ``__init__``, fitted state ends in ``_``.

    Fitted attributes: ``cluster_centers_`` (k, d) float32, sorted by cluster size (largest first);
    ``backend_`` ("numpy", "faiss", "faiss-gpu", "sklearn", "sklearn-minibatch", "torch", "torch-cuda" or "trivial" for the
    degenerate cases); ``n_distinct_`` (number of distinct centres, < k only for degenerate inputs);
    ``inertia_`` (sum of squared distances of the fitting rows to their centre); ``n_fit_samples_``.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        seed: int = 0,
        backend: str = "auto",
        max_samples: int = 100_000,
        n_init: int = 3,
        max_iter: int = 100,
    ):
        self.n_clusters = n_clusters
        self.seed = seed
        self.backend = backend
        self.max_samples = max_samples
        self.n_init = n_init
        self.max_iter = max_iter

    def __repr__(self) -> str:
        return (
            f"KMeans(n_clusters={self.n_clusters}, seed={self.seed}, backend={self.backend!r}, "
            f"max_samples={self.max_samples}, n_init={self.n_init}, max_iter={self.max_iter})"
        )

    def _check_params(self) -> None:
        if int(self.n_clusters) != self.n_clusters or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {self.n_clusters!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.max_samples < 1 or self.n_init < 1 or self.max_iter < 1:
            raise ValueError("max_samples, n_init and max_iter must be >= 1")

    def _choose_backend(self, n: int, d: int, k: int) -> str:
        if self.backend != "auto":
            return self.backend
        if n * k * d <= _NUMPY_MAX_WORK:
            return "numpy"
        if _cuda_available():
            return "faiss" if _faiss_gpus() > 0 else "torch"
        return "faiss" if faiss_available() else "sklearn"

    def fit(self, X: np.ndarray) -> "KMeans":
        self._check_params()
        X = np.asarray(X)
        if X.ndim == 2 and X.shape[0] == 0:
            raise ValueError("cannot fit k-means on 0 samples (the input has no rows)")
        X = _as_float32_2d(X)
        k = int(self.n_clusters)
        n, d = X.shape
        if n > self.max_samples:
            rng = np.random.default_rng(self.seed)
            X = X[np.sort(rng.choice(n, size=int(self.max_samples), replace=False))]
            n = X.shape[0]
        self.n_fit_samples_ = n

        if n <= k or not np.any(X.max(axis=0) > X.min(axis=0)):
            # fewer rows than centres, or every row identical: the distinct rows are the centres
            centers = X[first_distinct_rows(X + 0.0)[:k]] if n <= k else X[:1]
            backend = "trivial"
        else:
            backend = self._choose_backend(n, d, k)
            if backend == "faiss" and not faiss_available():
                raise ValueError("backend='faiss' requested but faiss is not installed (pip install faiss-cpu)")
            if backend == "numpy":
                centers = _lloyd_numpy(X, k, self.seed, self.n_init, self.max_iter)
            elif backend == "faiss":
                centers, backend = _fit_faiss(X, k, self.seed, self.n_init, self.max_iter)
            elif backend == "torch":
                centers, backend = _fit_torch(X, k, self.seed, self.n_init, self.max_iter)
            else:
                centers, backend = _fit_sklearn(X, k, self.seed, self.n_init, self.max_iter)
            centers = np.asarray(centers, dtype=np.float32)

        n_distinct = len(first_distinct_rows(centers + 0.0))  # + 0.0: -0.0 and 0.0 are one value
        if len(centers) < k:
            centers = np.concatenate([centers, np.repeat(centers[:1], k - len(centers), axis=0)])
        labels = assign_nearest(X, centers)
        counts = np.bincount(labels, minlength=k)
        # order: size descending, then coordinates (lexicographic) -> independent of the engine's order
        order = np.lexsort(tuple(centers.T[::-1]) + (-counts,))
        centers = np.ascontiguousarray(centers[order], dtype=np.float32)
        rank = np.empty(k, dtype=np.int64)
        rank[order] = np.arange(k)
        diff = X - centers[rank[labels]]
        self.inertia_ = float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        self.cluster_centers_ = centers
        self.backend_ = backend
        self.n_distinct_ = int(n_distinct)
        return self

    def predict(self, X: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this KMeans instance is not fitted yet; call fit() first")
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}")
        return assign_nearest(X, self.cluster_centers_, chunk_size=chunk_size)

    def fit_predict(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).predict(X)


# --------------------------------------------------------------------------------------------- step 9


def _looks_normalised(X: np.ndarray) -> bool:
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) < 1e-3))


def cluster_embeddings(
    X: np.ndarray, n_clusters: int, method: str = "kmeans", seed: int = 0
) -> np.ndarray:
    """Cluster embeddings (region CLS tokens: docs/method.md, "Each stage", classes) into ``n_clusters`` centres, float32 (k, d).

    ``method="kmeans"``: :class:`KMeans` centres (sorted by cluster size).
    ``method="spectral"``: scikit-learn ``SpectralClustering`` on a symmetric k-nearest-neighbour graph
    (``n_neighbors = clip(round(log2 n) + 5, 5, 30)``, capped at ``n - 1``) weighted by cosine similarity
    clipped to [1e-6, 1]; each centre is the mean of its members, L2-normalised when every input row has
    unit norm. Centres are ordered by cluster size (largest first). With ``n <= n_clusters`` both methods
    fall back to the k-means degenerate-input rules.
    Predict with :func:`assign_nearest` (on L2-normalised data, squared L2 ranks like cosine).
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"cluster_embeddings needs a non-empty 2-D array, got shape {X.shape}")
    X = _as_float32_2d(X)
    if method == "kmeans":
        return KMeans(n_clusters, seed=seed).fit(X).cluster_centers_
    if method != "spectral":
        raise ValueError(f"method must be 'kmeans' or 'spectral', got {method!r}")
    n = X.shape[0]
    k = int(n_clusters)
    if n <= k + 1 or len(first_distinct_rows(X + 0.0)) <= k:
        return KMeans(k, seed=seed).fit(X).cluster_centers_

    from scipy import sparse
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import NearestNeighbors

    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    n_neighbors = int(min(n - 1, np.clip(round(math.log2(n)) + 5, 5, 30)))
    nn = NearestNeighbors(n_neighbors=n_neighbors + 1, metric="cosine", algorithm="brute").fit(Xn)
    dist, idx = nn.kneighbors(Xn)
    sim = np.clip(1.0 - dist[:, 1:], 1e-6, 1.0)  # drop self
    rows = np.repeat(np.arange(n), n_neighbors)
    A = sparse.csr_matrix((sim.ravel(), (rows, idx[:, 1:].ravel())), shape=(n, n))
    A = A.maximum(A.T)
    with warnings.catch_warnings():
        # disconnected kNN graphs are expected for well-separated classes
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(
            n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans", n_init=10
        ).fit_predict(A)
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, X.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, X.astype(np.float64))
    centers = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    if len(empty):  # an empty spectral cluster: give it the rows least similar to their own centre
        own = np.einsum("ij,ij->i", Xn, centers[labels] / np.maximum(np.linalg.norm(centers[labels], axis=1, keepdims=True), 1e-12))
        far = np.argsort(own, kind="stable")[: len(empty)]
        centers[empty[: len(far)]] = X[far]
    if _looks_normalised(X):
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    order = np.lexsort(tuple(centers.T[::-1]) + (-counts,))
    return np.ascontiguousarray(centers[order], dtype=np.float32)
