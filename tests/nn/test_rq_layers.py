"""Residual-quantized layers (Gong et al. 2014 sec. 3.4): stages vs a brute-force loop,
error decreasing with stages, storage bits worked by hand, conv, checkpoint rebuild."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.rq_layers import RQConv2d, RQLinear, rebuild_rq_layers, rq_storage_bits
from qtrain.quant import kmeans as KM


@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(32, 16)


def test_error_decreases_with_stages(lin):
    rq = RQLinear.from_float(lin, block_size=4, n_stages=3, n_centroids=16, n_iter=10)
    w = lin.weight.detach()
    errs = [float(((rq.weight_from_stages(m) - w) ** 2).sum()) for m in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2] > 0
    # stage 1 alone is plain PQ with the same seed and K: the residual stages only add
    pq = KM.pq_fit(w, 4, 16, 10, 0)
    pq_err = float(((KM.pq_reconstruct(pq.centroids, pq.assignments, w.shape) - w) ** 2).sum())
    assert errs[0] == pytest.approx(pq_err, rel=1e-2)
    # each later stage is fitted on the residual: re-fitting stage 2 on the *weight* (not the
    # residual) would not reduce the error below stage 1's
    assert errs[1] < 0.8 * errs[0]


def test_reconstruction_is_brute_force_sum_of_stage_centroids(lin):
    rq = RQLinear.from_float(lin, block_size=4, n_stages=2, n_centroids=8, n_iter=5)
    books, codes = rq.stage_centroids, rq.stage_codes
    n, k, bs = 16, 32, 4
    ref = torch.zeros(n, k)
    for m in range(2):
        for r in range(n):
            for j in range(k // bs):
                ref[r, j * bs:(j + 1) * bs] += books[m, codes[m, r * (k // bs) + j]]
    assert torch.equal(rq.weight_from_stages(), ref)
    x = torch.randn(5, 32)
    torch.testing.assert_close(rq(x), x @ ref.t() + lin.bias.detach())
    # centroids stored in fp16 (as the packed file), bias shared, nothing else trainable
    assert torch.equal(books, books.half().float())
    assert [n for n, _ in rq.named_parameters()] == ["bias"] and rq.bias is lin.bias


def test_storage_bits_by_hand(lin):
    rq = RQLinear.from_float(lin, block_size=4, n_stages=3, n_centroids=16, n_iter=2)
    # 16 x 32 weight, bs 4 -> 128 blocks; per stage 128 * log2(16) + 16 * 4 * 16 (fp16)
    # = 512 + 1024 = 1536; 3 stages = 4608; + 16 fp32 biases = 512
    assert rq.storage_bits() == 5120
    assert rq_storage_bits(128, 3, 16, 4) == 4608
    assert rq_storage_bits(128, 1, 12, 4) == 128 * 4 + 12 * 4 * 16  # ceil(log2 12) = 4


def test_conv_blocks_along_flattened_input():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    rq = RQConv2d.from_float(conv, block_size=9, n_stages=2, n_centroids=8, n_iter=5)
    w = rq.weight_from_stages()
    assert w.shape == conv.weight.shape
    blocks = w.reshape(-1, 9)  # one block = one whole 3x3 kernel
    recon = rq.stage_centroids[0][rq.stage_codes[0]] + rq.stage_centroids[1][rq.stage_codes[1]]
    assert torch.equal(blocks, recon)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(rq(x), F.conv2d(x, w, conv.bias, padding=1))


def test_rebuild_from_state_dict(lin):
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(16, 4))
    rq = RQLinear.from_float(lin, block_size=4, n_stages=2, n_centroids=8, n_iter=3)
    model[0] = rq
    state = model.state_dict()
    fresh = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    assert rebuild_rq_layers(fresh, state) == ["0"]
    fresh.load_state_dict(state)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


def test_bad_codes_raise(lin):
    books = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="stage codes must lie in"):
        RQLinear(lin, books, torch.full((2, 128), 4), 4)
    with pytest.raises(ValueError, match="stage codes must be"):
        RQLinear(lin, books, torch.zeros(2, 64, dtype=torch.long), 4)
