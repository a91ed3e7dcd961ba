"""Quant-Noise 'drop' mode: training never uses the PQ codebook, so the quantized evaluation
refits it once it is pq_refresh or more steps old (as 'pq' does in training); checked against
brute-force nearest codewords and the reconstruction error of the current weight."""

import numpy as np
import torch
from torch import nn

from qtrain.nn.fake_quant import QuantLinear
from qtrain.nn.quant_noise import QuantNoiseQuantizer


def _brute_nearest(w, centroids, bs):
    blocks = w.detach().reshape(-1, bs).double().numpy()
    c = centroids.double().numpy()
    idx = ((blocks[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c[idx].reshape(w.shape)


def test_drop_codebook_refits_at_evaluation_when_due():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    qz = QuantNoiseQuantizer(bits=3, p=0.2, block_size=4, mode="drop", pq_n_iter=8,
                             pq_refresh=5, eval_p=1.0)
    ql = QuantLinear.from_float(lin, qz)

    def train_steps(n):
        ql.train()
        for _ in range(n):
            qz.new_step()
            ql(torch.randn(2, 16))  # drop noise: no codebook needed
        ql.eval()

    train_steps(2)
    assert qz.centroids.numel() == 0  # training alone never fits it
    ql.quantized_weight()  # first quantized evaluation: fitted at step 2
    assert int(qz.fitted_at) == 2
    old = qz.centroids.clone()
    with torch.no_grad():  # the weights move far from the codebook
        lin.weight.mul_(10).add_(3)
    train_steps(2)  # step 4: only 2 steps old, kept
    np.testing.assert_allclose(ql.quantized_weight().detach().numpy(), _brute_nearest(lin.weight, old, 4),
                               atol=1e-5)
    assert torch.equal(qz.centroids, old)
    train_steps(3)  # step 7: 5 steps old = pq_refresh: refitted on the current weight
    q = ql.quantized_weight().detach()
    assert int(qz.fitted_at) == 7 and not torch.equal(qz.centroids, old)
    np.testing.assert_allclose(q.numpy(), _brute_nearest(lin.weight, qz.centroids, 4), atol=1e-5)
    w = lin.weight.detach().double().numpy()
    err_new = np.linalg.norm(w - q.double().numpy())
    err_old = np.linalg.norm(w - _brute_nearest(lin.weight, old, 4))
    assert err_new < 0.5 * err_old  # the stale codebook no longer describes the weight
