"""Deep Compression math (qtrain.quant.pruning) and the linear k-means init, against
brute-force loops and sizes worked by hand."""

import math

import numpy as np
import pytest
import torch

from qtrain.quant import kmeans as KM
from qtrain.quant import pruning as P


def _brute_keep(w: torch.Tensor, s: float) -> set:
    """Indices kept: sort (|w|, flat index) ascending in Python, drop the first round(s n)."""
    flat = w.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))
    k = int(math.floor(s * len(flat) + 0.5))
    return set(order[k:])


def test_magnitude_mask_keeps_exact_top_fraction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 13, generator=g)
    for s in (0.0, 0.3, 0.7, 0.92):
        m = P.magnitude_mask(w, s)
        assert set(m.flatten().nonzero().flatten().tolist()) == _brute_keep(w, s)
        assert int(m.sum()) == 481 - int(math.floor(s * 481 + 0.5))
    with pytest.raises(ValueError, match="sparsity"):
        P.magnitude_mask(w, 1.0, name="fc1")


def test_magnitude_mask_ties_and_previous_mask():
    # ties: equal magnitudes are pruned in flat-index order (lower index first)
    w = torch.tensor([[1.0, -1.0, 0.5, 1.0], [-0.5, 1.0, 2.0, -1.0]])
    m = P.magnitude_mask(w, 0.5)  # prune 4: the two 0.5s, then the 1s at flat 0 and 1
    assert m.flatten().tolist() == [False, False, False, True, False, True, True, True]
    # a surviving weight that is exactly 0 ranks above every already-pruned weight
    w2 = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0, 2.0])
    prev = torch.tensor([False, True, True, False, True, True])  # flat 0 and 3 pruned
    m2 = P.magnitude_mask(w2, 0.5, prev)  # prune 3: flat 0, 3 (pruned), then flat 1 (0.0)
    assert m2.tolist() == [False, False, True, False, True, True]
    assert not (m2 & ~prev).any()
    assert P.sparsity_ramp(0.9, 3) == pytest.approx([0.3, 0.6, 0.9])


def test_centroid_grad_equals_bruteforce_sum():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(9, 11, generator=g)
    codes = torch.randint(0, 6, (9, 11), generator=g)
    mask = torch.rand(9, 11, generator=g) > 0.4
    ref = torch.zeros(6)
    for i in range(9):
        for j in range(11):
            if mask[i, j]:
                ref[codes[i, j]] += grad[i, j]
    torch.testing.assert_close(P.centroid_grad(grad, codes, mask, 6), ref)
    c = torch.arange(6.0)
    w = P.shared_weight(c, codes, mask)
    assert (w[~mask] == 0).all() and (w[mask] == codes[mask].float()).all()
    torch.testing.assert_close(P.cluster_means(w, codes, mask, c + 10), torch.where(
        torch.bincount(codes[mask], minlength=6) > 0, c, c + 10))


def _brute_encode(mask_row, index_bits):
    """Reference encoder (paper Fig. 2): walk the row; a gap larger than 2^b inserts a filler
    zero at prev + 2^b. Returns (stored index values, filler flags)."""
    span = 2**index_bits
    prev, gaps, fill = -1, [], []
    for i, nz in enumerate(mask_row):
        if not nz:
            continue
        while i - prev > span:
            gaps.append(span - 1)
            fill.append(True)
            prev += span
        gaps.append(i - prev - 1)
        fill.append(False)
        prev = i
    return gaps, fill


def test_relative_index_paper_figure_2():
    m = torch.zeros(16, dtype=torch.bool)
    m[[1, 4, 15]] = True  # 3-bit indices: one filler zero at 12
    gaps, filler, source = P.relative_index_stream(m, 3)
    assert gaps.tolist() == [1, 2, 7, 2] and filler.tolist() == [False, False, True, False]
    decoded = (torch.cumsum(gaps + 1, 0) - 1).tolist()  # absolute positions of the entries
    assert decoded == [1, 4, 12, 15] and P.n_fillers(m, 3) == 1


def test_relative_index_vs_bruteforce_loop():
    g = torch.Generator().manual_seed(2)
    for trial in range(12):
        n = int(torch.randint(1, 300, (1,), generator=g))
        density = [0.02, 0.1, 0.5, 0.95][trial % 4]
        row = torch.rand(n, generator=g) < density
        if not row.any():
            row[int(torch.randint(0, n, (1,), generator=g))] = True
        for b in (1, 2, 3, 5):
            gaps, filler, _ = P.relative_index_stream(row, b)
            ref_g, ref_f = _brute_encode(row.tolist(), b)
            assert gaps.tolist() == ref_g and filler.tolist() == ref_f
            assert P.n_fillers(row, b) == sum(ref_f)
            pos = torch.cumsum(gaps + 1, 0) - 1  # decode: real entries land on the non-zeros
            assert pos[~filler].tolist() == row.nonzero().flatten().tolist()
            assert not row[pos[filler]].any()


def test_sparse_layer_size_worked_by_hand():
    # 2x6 layer + 2 biases; non-zeros at flat 0, 5, 6, 11; 2-bit indices (gap up to 4)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask.view(-1)[[0, 5, 6, 11]] = True
    codes = torch.zeros(2, 6, dtype=torch.long)
    codes.view(-1)[[5, 6, 11]] = torch.tensor([1, 2, 1])  # K = 3 centroids + filler code 3
    r = P.sparse_layer_size(mask, codes, 3, 2, bias_numel=2)
    # entries: 0 (z=0) | filler at 4 (z=3), 5 (z=0) | 6 (z=0) | filler at 10 (z=3), 11 (z=0)
    assert (r.nnz, r.fillers, r.code_bits) == (4, 2, 2)  # 4 symbols (0, 1, 2, filler 3)
    assert r.dense_bits == 32 * 14 == 448
    assert r.pruned_bits == 6 * (32 + 2) + 64 == 268
    assert r.shared_bits == 6 * (2 + 2) + 3 * 32 + 64 == 184
    # weight symbols [0, F, 1, 2, F, 1] (F = 3): counts 1/2/1/2 -> Huffman merges 1+1=2,
    # 2+2=4, 4+2=6 -> 2 + 4 + 6 = 12 bits; index stream [0, 3, 0, 0, 3, 0]: 1 bit each = 6
    assert (r.huffman_weight_bits, r.huffman_index_bits) == (12, 6)
    assert r.huffman_bits == 12 + 6 + 96 + 64 == 178
    assert P.weight_symbols(mask, codes, 3, 2).tolist() == [0, 3, 1, 2, 3, 1]
    only_pruned = P.sparse_layer_size(mask, None, 0, 2, bias_numel=2)
    assert only_pruned.shared_bits == only_pruned.huffman_bits == 268
    # a surviving weight holding the filler code is rejected (it would decode as a filler)
    with pytest.raises(ValueError, match="fc1.*filler"):
        P.sparse_layer_size(mask, codes, 2, 2, name="fc1")


def test_code_bits_reserve_the_filler_code():
    # K centroids + 1 filler code: K = 2^b - 1 needs b bits, K = 2^b needs b + 1
    assert [P.code_bits_for(k) for k in (1, 2, 3, 4, 7, 8, 31, 63, 255)] == \
        [1, 2, 2, 3, 3, 4, 5, 6, 8]
    with pytest.raises(ValueError, match="n_centroids"):
        P.code_bits_for(0)


def _lloyd_linear(x: np.ndarray, k: int, n_iter: int):
    c = np.linspace(x.min(), x.max(), k)
    for _ in range(n_iter):
        a = np.abs(x[:, None] - c[None]).argmin(1)
        c = np.array([x[a == j].mean() if (a == j).any() else c[j] for j in range(k)])
    return c, np.abs(x[:, None] - c[None]).argmin(1)


def test_kmeans_linear_init_matches_bruteforce_lloyd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, generator=g)
    c_ref, a_ref = _lloyd_linear(x.double().numpy(), 8, 10)
    book, codes = KM.scalar_kmeans(x, 3, n_iter=10, init="linear")
    np.testing.assert_allclose(book.numpy(), c_ref, rtol=1e-5, atol=1e-5)
    assert (codes.numpy() == a_ref).all()
    book5, _ = KM.scalar_kmeans(x, 3, n_iter=10, init="linear", n_centroids=5)
    np.testing.assert_allclose(book5.numpy(), _lloyd_linear(x.double().numpy(), 5, 10)[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="linear.*d = 1"):
        KM.kmeans(torch.randn(20, 2), 4, init="linear")
    with pytest.raises(ValueError, match="init"):
        KM.kmeans(torch.randn(20, 1), 4, init="kmeans++")


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not KM.faiss_available(), reason="faiss-cpu not installed"))])
def test_kmeans_split_empty_false_is_plain_lloyd_over_the_pruning_gap(backend):
    """Surviving weights of a pruned layer leave a gap around 0; linear init puts centroids
    in it. split_empty=False (Deep Compression's default) = brute-force Lloyd that keeps an
    empty cluster's centroid unused; split_empty=True re-seeds them (every code used)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(800, generator=g)
    x = x[x.abs() > 0.6]  # magnitude-pruned: nothing in (-0.6, 0.6)
    c_ref, a_ref = _lloyd_linear(x.double().numpy(), 15, 10)
    used_ref = len(np.unique(a_ref))
    assert used_ref < 15  # the reference keeps the centroids stranded in the gap
    book, codes = KM.scalar_kmeans(x, 4, n_iter=10, init="linear", n_centroids=15,
                                   backend=backend, split_empty=False)
    np.testing.assert_allclose(book.numpy(), c_ref, rtol=1e-5, atol=1e-5)
    assert (codes.numpy() == a_ref).all()
    _, codes_split = KM.scalar_kmeans(x, 4, n_iter=10, init="linear", n_centroids=15,
                                      backend=backend, split_empty=True)
    assert len(torch.unique(codes_split)) == 15
