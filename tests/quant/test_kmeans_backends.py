"""k-means backends (torch / faiss-cpu assignment step) against a numpy Lloyd reference.

The reference is an independent float64 brute-force Lloyd loop started from the same
initial centroids (the K rows picked by ``torch.randperm`` with the seeded CPU generator,
as the module docstring states); the data are separated Gaussian blobs, so no distance
tie and no empty cluster occurs (the reference asserts the latter).
"""

import sys

import numpy as np
import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.quant import kmeans as KM

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not KM.faiss_available(), reason="faiss-cpu not installed"))]


def _blobs(n=3000, d=8, centres=24, seed=0):
    g = np.random.default_rng(seed)
    mu = g.normal(size=(centres, d)) * 4
    x = mu[g.integers(0, centres, n)] + g.normal(size=(n, d))
    return torch.from_numpy(x.astype(np.float32))


def _numpy_lloyd(x, k, n_iter, seed, w=None):
    """Plain Lloyd in float64: argmin of explicit ||x - c||^2, (weighted) mean update."""
    g = torch.Generator().manual_seed(seed)
    xs = x.double().numpy()
    c = xs[torch.randperm(len(xs), generator=g)[:k].numpy()].copy()
    w = np.ones(len(xs)) if w is None else w.double().numpy()
    for _ in range(n_iter):
        a = ((xs[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        cnt = np.bincount(a, weights=w, minlength=k)
        assert (np.bincount(a, minlength=k) > 0).all(), "reference hit an empty cluster"
        c = np.stack([np.bincount(a, weights=w * xs[:, j], minlength=k) for j in range(xs.shape[1])], 1)
        c /= cnt[:, None]
    a = ((xs[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c, a, float((w * ((xs - c[a]) ** 2).sum(1)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lloyd_equals_numpy_reference_from_same_init(backend):
    x = _blobs()
    r = KM.kmeans(x, 32, n_iter=12, seed=5, backend=backend)
    c_ref, a_ref, obj_ref = _numpy_lloyd(x, 32, 12, seed=5)
    assert torch.equal(r.assignments, torch.from_numpy(a_ref))
    np.testing.assert_allclose(r.centroids.numpy(), c_ref, rtol=1e-4, atol=1e-4)
    assert r.objective[-1] == pytest.approx(obj_ref, rel=1e-5)
    assert len(r.objective) == 13  # one assignment per iteration + the final one


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_lloyd_equals_numpy_reference(backend):
    x = _blobs(seed=1)
    w = torch.from_numpy(np.random.default_rng(2).uniform(0.1, 3.0, len(x)).astype(np.float32))
    r = KM.kmeans(x, 16, n_iter=8, seed=0, sample_weight=w, backend=backend)
    c_ref, a_ref, obj_ref = _numpy_lloyd(x, 16, 8, seed=0, w=w)
    assert torch.equal(r.assignments, torch.from_numpy(a_ref))
    np.testing.assert_allclose(r.centroids.numpy(), c_ref, rtol=1e-4, atol=1e-4)
    assert r.objective[-1] == pytest.approx(obj_ref, rel=1e-5)


@pytest.mark.skipif(not KM.faiss_available(), reason="faiss-cpu not installed")
def test_faiss_and_torch_backends_agree_with_metric():
    """Same seed -> same codebook through the activation-aware metric (Cholesky) path.

    Not compared through empty-cluster splits: the split centroids ``c +- e`` (``e`` ~ 1e-6
    std) are float ties for the split cluster's points, decided by each search's rounding;
    the split itself is backend-independent code (test_kmeans_codebooks)."""
    x = _blobs(n=2000, d=4, centres=6, seed=3)
    h = torch.tensor([[4.0, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0.5], [0, 0, 0.5, 3]])
    rt = KM.kmeans(x, 40, n_iter=10, seed=1, metric=h, backend="torch")
    rf = KM.kmeans(x, 40, n_iter=10, seed=1, metric=h, backend="faiss")
    assert torch.equal(rt.assignments, rf.assignments)
    torch.testing.assert_close(rf.centroids, rt.centroids, rtol=1e-4, atol=1e-4)
    assert rf.objective == pytest.approx(rt.objective, rel=1e-5)


@pytest.mark.skipif(not KM.faiss_available(), reason="faiss-cpu not installed")
def test_assign_faiss_equals_brute_force_and_keeps_omp_setting():
    import faiss

    torch.manual_seed(0)
    x, c = torch.randn(5000, 8), torch.randn(100, 8)
    before = faiss.omp_get_max_threads()
    a, d = KM.assign_faiss(x, c)
    assert faiss.omp_get_max_threads() == before
    dd = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert torch.equal(a, dd.argmin(1))
    torch.testing.assert_close(d, dd.min(1).values, rtol=1e-4, atol=1e-4)


def test_update_sums_equal_index_add():
    """The index_put_(accumulate) update gives the same per-cluster means as index_add_."""
    torch.manual_seed(0)
    x, a = torch.randn(20000, 8), torch.randint(0, 64, (20000,))
    old = torch.zeros(64, 8)
    ref = torch.zeros(64, 8).index_add_(0, a, x) / torch.bincount(a, minlength=64)[:, None]
    assert torch.equal(KM._update(x, a, None, old), ref)


def test_backend_resolution_and_errors(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert KM.resolve_backend("torch", cpu) == "torch"
    assert KM.resolve_backend("auto", cuda) == "torch"  # faiss-cpu never for GPU tensors
    assert KM.resolve_backend("auto", cpu) == ("faiss" if KM.faiss_available() else "torch")
    monkeypatch.setenv(KM.BACKEND_ENV, "torch")
    assert KM.resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(KM.BACKEND_ENV, "fais")
    with pytest.raises(ConfigError, match=r"enc\.fc1.*QTRAIN_KMEANS_BACKEND='fais'.*faiss"):
        KM.kmeans(torch.randn(10, 2), 2, name="enc.fc1")
    with pytest.raises(ConfigError, match=r"backend='gpu'.*allowed.*'auto', 'torch', 'faiss'"):
        KM.kmeans(torch.randn(10, 2), 2, backend="gpu")
    if KM.faiss_available():
        with pytest.raises(ConfigError, match="CPU tensors only.*cuda"):
            KM.resolve_backend("faiss", cuda)
    # faiss-cpu not installed: an import of it fails as Python reports a missing module
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert KM.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        KM.kmeans(torch.randn(10, 2), 2, backend="faiss")


@pytest.mark.skipif(not KM.faiss_available(), reason="faiss-cpu not installed")
def test_faiss_clustering_runs_the_loop_and_empty_clusters_keep_fairseq_split():
    """Unweighted faiss backend: the Lloyd loop is faiss's Clustering (its result IS the
    kmeans result); data whose random init must leave clusters empty (many duplicate rows)
    make faiss split -> the run is redone with this module's loop and split (bit for bit;
    not compared with the torch backend: identical centroids make exact distance ties,
    broken differently by the two searches)."""
    x = _blobs(n=2000, d=8, centres=20, seed=3)
    g = torch.Generator().manual_seed(4)
    init = x[torch.randperm(len(x), generator=g)[:32]].clone()
    direct = KM._faiss_lloyd(x.contiguous(), init, 10)
    assert direct is not None
    r = KM.kmeans(x, 32, n_iter=10, seed=4, backend="faiss")
    assert torch.equal(r.centroids, direct[0]) and torch.equal(r.assignments, direct[1])
    assert r.objective == direct[2] and len(r.objective) == 11
    dup = torch.cat([torch.zeros(300, 8), torch.ones(300, 8), _blobs(n=40, seed=5)])
    g = torch.Generator().manual_seed(0)
    init = dup[torch.randperm(len(dup), generator=g)[:16]].clone()
    assert KM._faiss_lloyd(dup, init, 5) is None  # duplicate initial centroids -> splits
    rf = KM.kmeans(dup, 16, n_iter=5, seed=0, backend="faiss")
    # this module's loop with the faiss search (unit weights take it: same sums and counts)
    rl = KM.kmeans(dup, 16, n_iter=5, seed=0, backend="faiss", sample_weight=torch.ones(len(dup)))
    assert torch.equal(rf.assignments, rl.assignments)
    assert torch.equal(rf.centroids, rl.centroids)
    assert rf.objective == rl.objective
