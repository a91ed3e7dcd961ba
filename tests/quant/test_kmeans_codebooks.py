"""k-means / PQ / RQ / scalar codebooks against brute-force references."""

import pytest
import torch

from qtrain.quant import kmeans as KM


def _brute_nearest(x, c):
    d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return d.min(1)


BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not KM.faiss_available(), reason="faiss-cpu not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_assignments_equal_brute_force_and_objective_non_increasing(backend):
    torch.manual_seed(0)
    x = torch.randn(3000, 4) + torch.randint(0, 5, (3000, 1)).float() * 2
    r = KM.kmeans(x, 32, n_iter=15, seed=1, backend=backend)
    dmin, _ = _brute_nearest(x, r.centroids)
    d_assigned = ((x - r.centroids[r.assignments]) ** 2).sum(1)
    torch.testing.assert_close(d_assigned, dmin, atol=1e-4, rtol=1e-4)
    obj = torch.tensor(r.objective)
    assert (obj[1:] <= obj[:-1] * (1 + 1e-6) + 1e-6).all(), obj
    assert obj[-1] < obj[0]
    # final recorded objective is the real objective of the returned solution
    assert r.objective[-1] == pytest.approx(float(d_assigned.sum()), rel=1e-5)
    # update step == per-cluster mean computed with an explicit loop
    upd = KM._update(x, r.assignments, None, r.centroids)
    for k in range(32):
        pts = x[r.assignments == k]
        ref = pts.mean(0) if len(pts) else r.centroids[k]
        torch.testing.assert_close(upd[k], ref, atol=1e-5, rtol=1e-5)


def test_chunked_assign_equals_unchunked():
    torch.manual_seed(0)
    x, c = torch.randn(1000, 8), torch.randn(50, 8)
    a1, d1 = KM.assign(x, c, chunk_elems=50 * 7)
    _, a_ref = _brute_nearest(x, c)
    assert torch.equal(a1, a_ref)
    a2, d, d2 = KM.assign(x, c, second=True)
    dd = ((x[:, None] - c[None]) ** 2).sum(-1).sort(1).values
    torch.testing.assert_close(d2, dd[:, 1], atol=1e-4, rtol=1e-4)


def test_seeded_and_no_empty_clusters():
    torch.manual_seed(0)
    # many duplicate points: random init picks duplicates -> empty clusters must be split
    x = torch.cat([torch.zeros(500, 2), torch.ones(500, 2), torch.randn(40, 2) * 5])
    # backend='torch': with exact ties (500 identical points, split centroids c +- e at the
    # same float distance) the non-empty count depends on the search's tie-breaking
    r1 = KM.kmeans(x, 16, n_iter=10, seed=3, backend="torch")
    r2 = KM.kmeans(x, 16, n_iter=10, seed=3, backend="torch")
    assert torch.equal(r1.centroids, r2.centroids) and torch.equal(r1.assignments, r2.assignments)
    counts = torch.bincount(r1.assignments, minlength=16)
    assert (counts > 0).sum() >= 14  # at most a split of identical points can stay empty


def test_split_empty_cluster_unit():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.2]])
    c = torch.tensor([[0.05], [10.1], [100.0]])  # cluster 2 is empty
    a = torch.tensor([0, 0, 1, 1])
    a2, moved = KM._split_empty(x, c, a.clone(), None, 1e-3, torch.Generator().manual_seed(0))
    assert torch.bincount(a2, minlength=3).min() >= 1
    assert moved is not None and len(moved) == 2


def test_weighted_kmeans_update_is_weighted_mean():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    w = torch.tensor([3.0, 1.0, 1.0, 1.0])
    r = KM.kmeans(x, 2, n_iter=5, seed=0, sample_weight=w)
    cs = r.centroids.flatten().sort().values
    torch.testing.assert_close(cs, torch.tensor([0.25, 10.5]))


def test_metric_kmeans_minimises_activation_weighted_distance():
    torch.manual_seed(0)
    w = torch.randn(64, 16)
    inputs = torch.randn(256, 16) * torch.tensor([10.0, 0.1] * 8)  # anisotropic inputs
    r = KM.pq_fit(w, 2, 16, n_iter=15, seed=0, sample_inputs=inputs)
    h = KM.pooled_input_metric(inputs, 2)
    blocks = KM.blocks_of(w, 2)
    diff = blocks[:, None, :] - r.centroids[None]
    dist = torch.einsum("nkd,de,nke->nk", diff, h, diff)
    torch.testing.assert_close(dist.gather(1, r.assignments[:, None]).flatten(), dist.min(1).values,
                               atol=1e-3, rtol=1e-3)
    # activation-aware reconstruction beats plain k-means on ||x (W - W_hat)^T||
    plain = KM.pq_fit(w, 2, 16, n_iter=15, seed=0)
    err = lambda res: (inputs @ (w - KM.pq_reconstruct(res.centroids, res.assignments, w.shape)).t()).norm()  # noqa: E731
    assert err(r) < err(plain)


def test_pq_reconstruct_layout_and_storage():
    w = torch.arange(24.0).reshape(2, 12)
    r = KM.pq_fit(w, 4, 6, n_iter=3)  # 6 blocks, K=6: exact
    torch.testing.assert_close(KM.pq_reconstruct(r.centroids, r.assignments, w.shape), w)
    assert torch.equal(KM.blocks_of(w, 4)[1], torch.tensor([4.0, 5, 6, 7]))
    assert KM.pq_storage_bits(96, 256, 8) == 96 * 8 + 16 * 256 * 8


def test_bad_inputs_name_layer_and_value():
    with pytest.raises(ValueError, match=r"enc\.fc1.*block_size=5.*12"):
        KM.pq_fit(torch.randn(4, 12), 5, 2, name="enc.fc1")
    with pytest.raises(ValueError, match=r"enc\.fc2.*n_centroids=256.*12"):
        KM.pq_fit(torch.randn(4, 12), 4, 256, name="enc.fc2")
    with pytest.raises(ValueError, match="NaN"):
        KM.kmeans(torch.tensor([[float("nan")], [1.0]]), 1)


def test_scalar_kmeans_and_residual_quantization():
    torch.manual_seed(0)
    w = torch.randn(32, 32)
    book, codes = KM.scalar_kmeans(w, 3)
    assert book.numel() == 8 and codes.shape == w.shape
    nearest = (w.reshape(-1, 1) - book[None]).abs().argmin(1).reshape(w.shape)
    torch.testing.assert_close(book[codes], book[nearest])
    books, codes = KM.rq_fit(w, 4, n_stages=3, n_centroids=16, n_iter=10)
    errs = []
    for m in range(1, 4):
        rec = KM.rq_reconstruct(books[:m], codes[:m], w.shape)
        errs.append(float((rec - w).pow(2).sum()))
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="bits"):
        KM.scalar_kmeans(w, 0)
