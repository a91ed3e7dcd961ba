"""The evaluation form of a Deep Compression layer (Han et al. 2016): pruned + weight-shared.

Built by :class:`qtrain.callbacks.deep_compression.DeepCompressionCallback` at the end of
its quantized stage; packed by :mod:`qtrain.nn.packed_sparse`. Kept in ``qtrain.nn`` so the
packed formats do not import the callback (and Lightning).
"""

from __future__ import annotations

import torch

from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import pruning as P


class SharedWeightQuantizer(Quantizer):
    """Evaluation form of a pruned + weight-shared layer: ``forward(w) = C[codes]`` on the
    mask, 0 elsewhere. Codes (0 .. K - 1; K = the filler code), mask and centroids are plain
    attributes (not buffers), so the layer's state-dict keys do not change. ``bits`` =
    ``ceil(log2(K + 1))``. ``storage_bits`` = relative indices + codes + fp32 codebook;
    ``codes()`` = the stored weight-code stream (fillers = code K included);
    ``huffman_storage_bits`` = both streams Huffman-coded (the run summary's Huffman column); exported as ``sparse_shared`` (:mod:`qtrain.nn.packed_sparse`)."""

    min_bits, max_bits = 1, 16

    def __init__(self, bits: int, centroids: torch.Tensor, codes: torch.Tensor,
                 mask: torch.Tensor, index_bits: int) -> None:
        super().__init__(bits)
        self.centroids, self.codebook_codes, self.mask = centroids, codes, mask
        self.index_bits = index_bits

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        w = P.shared_weight(self.centroids.to(x.device), self.codebook_codes.to(x.device),
                            self.mask.to(x.device))
        return w.to(x.dtype)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return P.sparse_layer_size(self.mask, self.codebook_codes, self.centroids.numel(),
                                   self.index_bits).shared_bits

    def huffman_storage_bits(self, weight: torch.Tensor) -> int:
        """Both streams Huffman-coded (the weight codes and the relative indices, Deep
        Compression sec. 4) + the fp32 codebook: what the run summary's Huffman column counts
        (code tables not included, as in the paper)."""
        return P.sparse_layer_size(self.mask, self.codebook_codes, self.centroids.numel(),
                                   self.index_bits).huffman_bits

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return P.weight_symbols(self.mask, self.codebook_codes, self.centroids.numel(),
                                self.index_bits)
