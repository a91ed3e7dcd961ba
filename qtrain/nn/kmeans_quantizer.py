"""Scalar k-means weight sharing as a weight quantizer (Gong, Liu, Yang & Bourdev 2014,
"Compressing Deep Convolutional Networks using Vector Quantization", sec. 3.2 "scalar
quantization using k-means": all weights of a layer clustered into K = 2^b shared values).

Post-training only: the codebook and the codes are fitted once (:func:`fit`, via
:func:`qtrain.quant.kmeans.scalar_kmeans`) and frozen; the quantizer's output is
``codebook[codes]`` whatever weight it is given, so nothing is retrained (unlike Deep
Compression's centroid fine-tuning). The shared values are rounded to float16 when fitted
(the codebook as the packed ``lut`` file stores it), so export is bit-exact.

Storage: ``b`` bits per weight + ``16 * K`` bits of fp16 codebook. The packed ``lut`` format
stores ``container_bits(b)`` bits per weight (b = 1, 2, 4, 8 exactly; 3 -> 4, 5..7 -> 8),
the 2^c-entry fp16 table and one fp16 scale (= 1) per row.
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import kmeans as KM


class KMeansWeightQuantizer(Quantizer):
    """Buffers ``codebook`` (K,) float32 (fp16-representable) and ``indices`` (weight shape,
    long). Build with :meth:`fit` (or with empty buffers of the right shapes to load a
    checkpoint)."""

    min_bits, max_bits = 1, 8  # the lut format holds at most 8-bit codes

    def __init__(self, bits: int, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__(bits)
        if codebook.dim() != 1 or not 1 <= codebook.numel() <= 2**bits:
            raise ValueError(f"KMeansWeightQuantizer: codebook must be 1-D with 1..2^bits = "
                             f"{2**bits} entries, got shape {tuple(codebook.shape)}")
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.register_buffer("indices", indices.detach().to(torch.long).clone())

    @classmethod
    def fit(cls, weight: torch.Tensor, bits: int, n_iter: int = 20, seed: int = 0,
            init: str = "linear", name: str = "weight") -> KMeansWeightQuantizer:
        """k-means of all scalar weights of the layer into ``min(2^bits, numel)`` values."""
        k = min(2**bits, weight.numel())
        c, a = KM.scalar_kmeans(weight.detach().float(), bits, n_iter, seed, name=name,
                                init=init, n_centroids=k)
        return cls(bits, c.half().float(), a)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != tuple(self.indices.shape):
            raise ValueError(f"KMeansWeightQuantizer: fitted on a weight of shape "
                             f"{tuple(self.indices.shape)}, got {tuple(x.shape)}")
        return self.codebook[self.indices].to(x.dtype)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored per-weight codes (Huffman estimate of the run summary)."""
        return self.indices

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.bits * weight.numel() + 16 * self.codebook.numel()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, n_values={self.codebook.numel()}, enabled={self.enabled}"
