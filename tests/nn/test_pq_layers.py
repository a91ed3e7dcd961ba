"""PQ layers: exact reconstruction, averaged centroid gradients, float-module equivalence."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.pq_layers import PQConv2d, PQEmbedding, PQLinear, rebuild_pq_layers


def _avg_grad_reference(blocks_grad, assignments, k):
    out = torch.zeros(k, blocks_grad.shape[1])
    for j in range(k):  # brute-force loop over centroids
        sel = blocks_grad[assignments == j]
        if len(sel):
            out[j] = sel.mean(0)
    return out


def test_pq_linear_reconstruction_forward_and_mean_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    pq = PQLinear.from_float(lin, block_size=4, n_centroids=8, n_iter=5)
    w = pq.weight_from_codebook()
    ref = pq.centroids.detach()[pq.assignments].reshape(6, 16)
    assert torch.equal(w.detach(), ref)  # exact: a gather
    assert pq.bias is lin.bias
    x = torch.randn(5, 16)
    torch.testing.assert_close(pq(x), F.linear(x, ref, lin.bias))
    # gradient: centroid grad = mean of the gradients of its blocks
    w_leaf = ref.clone().requires_grad_(True)
    F.linear(x, w_leaf, lin.bias).pow(2).sum().backward()
    pq(x).pow(2).sum().backward()
    expected = _avg_grad_reference(w_leaf.grad.reshape(-1, 4), pq.assignments, 8)
    torch.testing.assert_close(pq.centroids.grad, expected)
    assert not pq.assignments.requires_grad and pq.assignments.dtype == torch.long


@pytest.mark.parametrize("k,bs", [(3, 9), (1, 4)])
def test_pq_conv_blocks_and_gradient(k, bs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, k, padding=k // 2, bias=False)
    pq = PQConv2d.from_float(conv, n_centroids=8, n_iter=5)
    assert pq.block_size == bs
    ref = pq.centroids.detach()[pq.assignments].reshape(conv.weight.shape)
    if k == 3:  # one block == one whole 3x3 kernel
        kernel = conv.weight.detach()[1, 2].reshape(-1)
        blk = pq.centroids.detach()[pq.assignments[1 * 8 + 2]]
        assert torch.equal(ref[1, 2].reshape(-1), blk)
        assert kernel.shape == blk.shape
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(pq(x), F.conv2d(x, ref, None, 1, k // 2))
    w_leaf = ref.clone().requires_grad_(True)
    F.conv2d(x, w_leaf, None, 1, k // 2).sum().backward()
    pq(x).sum().backward()
    expected = _avg_grad_reference(w_leaf.grad.reshape(-1, bs), pq.assignments, 8)
    torch.testing.assert_close(pq.centroids.grad, expected)


def test_pq_embedding_lookup_gradient_and_padding():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8, padding_idx=0)
    pq = PQEmbedding.from_float(emb, block_size=4, n_centroids=6, n_iter=5)
    ref = pq.centroids.detach()[pq.assignments].reshape(20, 8)
    idx = torch.tensor([[1, 0, 5], [5, 7, 19]])
    torch.testing.assert_close(pq(idx), F.embedding(idx, ref))
    w_leaf = ref.clone().requires_grad_(True)
    g_out = torch.randn(2, 3, 8)
    (F.embedding(idx, w_leaf, padding_idx=0) * g_out).sum().backward()
    (pq(idx) * g_out).sum().backward()
    expected = _avg_grad_reference(w_leaf.grad.reshape(-1, 4), pq.assignments, 6)
    torch.testing.assert_close(pq.centroids.grad, expected)
    # token-frequency weighting is accepted
    PQEmbedding.from_float(emb, block_size=4, n_centroids=6, sample_inputs=idx)


def test_storage_bits_and_rebuild_from_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    pq = PQLinear.from_float(model[0], block_size=8, n_centroids=4, n_iter=3)
    assert pq.storage_bits() == 16 * 2 + 16 * 4 * 8 + 32 * 8
    model[0] = pq
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    assert rebuild_pq_layers(fresh, sd) == ["0"]
    fresh.load_state_dict(sd)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_bad_block_size_names_layer():
    with pytest.raises(ValueError, match=r"dec\.fc.*block_size=5"):
        PQLinear.from_float(nn.Linear(16, 4), block_size=5, n_centroids=2, name="dec.fc")
