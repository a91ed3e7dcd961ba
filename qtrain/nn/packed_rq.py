"""The packed ``rq`` format: residual-quantized weights (Gong et al. 2014, sec. 3.4).

Buffers of a :class:`qtrain.nn.packed.PackedLinear` with ``fmt="rq"`` (``group_size`` holds
the block size bs, ``bits`` = 8):

* ``codes`` (M, N, K / bs) uint8: stage m's code of block j of row n,
* ``centroids`` (M, n_centroids <= 256, bs) float16: stage m's codebook.

``W[n, j*bs:(j+1)*bs] = sum_m centroids[m, codes[m, n, j]]``. Forward: with the Triton
backend ``y = sum_m codebook_linear(x, codes[m], centroids[m]) (+ bias once)`` -- M launches
of the existing codebook kernel (:mod:`qtrain_kernels.codebook_matmul`), partial outputs
summed in float32; with the torch backend ``F.linear(x, dequantize(), bias)``. The two agree
up to float32 summation order. Decoder, forward and load checks: the ``rq`` entry of
:mod:`qtrain.nn.packed_codecs`; this module builds the layers. File size:
``8 * M * N * K / bs + 16 * M * n_centroids * bs`` bits (+ bias), i.e. :func:`qtrain.nn.rq_layers.rq_storage_bits` exactly for K = 256.
"""

from __future__ import annotations

import torch

from qtrain.nn.packed import PackedLinear


def rq_layer(codes: torch.Tensor, centroids: torch.Tensor, bias=None, backend: str = "auto"):
    """``rq`` layer from ``codes`` (M, N, K / bs) in [0, n_centroids) and ``centroids``
    (M, n_centroids <= 256, bs)."""
    if centroids.dim() != 3 or centroids.shape[1] > 256:
        raise ValueError(f"rq format: centroids must be (M, n_centroids <= 256, bs), got "
                         f"{tuple(centroids.shape)}")
    if codes.dim() != 3 or codes.shape[0] != centroids.shape[0]:
        raise ValueError(f"rq format: codes must be (M={centroids.shape[0]}, N, K / bs), got "
                         f"{tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= centroids.shape[1]):
        raise ValueError(f"rq format: codes must lie in [0, {centroids.shape[1] - 1}]")
    _, n, kc = codes.shape
    bs = centroids.shape[2]
    bufs = {"codes": codes.to(torch.uint8).contiguous(),
            "centroids": centroids.detach().half().contiguous()}
    return PackedLinear._new(kc * bs, n, "rq", 8, bs, True, backend, bias, **bufs)


def from_rq_module(m, bias=None, backend: str = "auto"):
    """``rq`` layer holding an :mod:`qtrain.nn.rq_layers` layer's stages (row-major blocks)."""
    n = m.weight_shape[0]
    codes = m.stage_codes.reshape(m.n_stages, n, -1)
    return rq_layer(codes, m.stage_centroids, bias, backend)
