"""Q-BERT group-wise weight quantization (Shen et al. 2019, sec. 3.2, Fig. 2).

A weight matrix (out, in) -- e.g. the concatenated Q/K/V projection of a multi-head
attention layer, whose output rows are ``num_heads`` contiguous blocks of head_dim rows --
is split first per attention head (row blocks), then each head into contiguous sub-groups
of rows, ``num_groups`` groups in total (Q-BERT's default 128). Each group has its own
min-max range and scale. Convolution weights are treated as (out, in*k*k) matrices.

When ``num_groups`` is not a multiple of ``num_heads`` each head gets
ceil(num_groups / num_heads) groups, and when a head has fewer rows than that each of its
rows is its own group; rows of a head are spread over its groups as evenly as possible
(group of row r within its head = floor(r * G_h / R_h)). ``n_groups(weight)`` gives the
actual count, used in the storage size.
"""

from __future__ import annotations

import torch

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import uniform as U


class GroupwiseQuantizer(Quantizer):
    """Uniform quantization with one range per (head, row-group) of the weight.

    Args:
        bits: 2..8 (symmetric) or 1..8 (affine).
        num_groups: total groups (default 128, as in Q-BERT).
        num_heads: attention heads the output rows are split into first (1: plain rows).
        symmetric: signed codes with zero-point 0, else unsigned affine per group.
    """

    min_bits, max_bits = U.MIN_BITS, U.MAX_BITS

    def __init__(
        self, bits: int = 4, num_groups: int = 128, num_heads: int = 1, symmetric: bool = True
    ) -> None:
        super().__init__(bits)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"GroupwiseQuantizer: num_groups must be an int >= 1, got {num_groups}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ConfigError(f"GroupwiseQuantizer: num_heads must be an int >= 1, got {num_heads}")
        U.code_range(bits, symmetric)
        self.num_groups, self.num_heads, self.symmetric = num_groups, num_heads, symmetric

    def set_bits(self, bits: int) -> None:
        U.code_range(bits, self.symmetric)
        super().set_bits(bits)

    def group_index(self, rows: int, device=None) -> torch.Tensor:
        """Group id of each output row (long tensor of length ``rows``)."""
        if rows % self.num_heads:
            raise ConfigError(
                f"GroupwiseQuantizer: {rows} output rows are not divisible by "
                f"num_heads={self.num_heads}"
            )
        per_head = rows // self.num_heads
        g_h = min(-(-self.num_groups // self.num_heads), per_head)
        r = torch.arange(rows, device=device)
        return (r // per_head) * g_h + (r % per_head) * g_h // per_head

    def n_groups(self, weight: torch.Tensor) -> int:
        return int(self.group_index(weight.shape[0])[-1]) + 1

    def qparams(self, weight: torch.Tensor) -> tuple[U.QParams, torch.Tensor]:
        """Per-group QParams (one entry per group) and the row -> group index."""
        if weight.dim() < 2:
            raise ConfigError(
                f"GroupwiseQuantizer: expects a weight with >= 2 dims, got shape "
                f"{tuple(weight.shape)}"
            )
        flat = weight.detach().reshape(weight.shape[0], -1)
        idx = self.group_index(flat.shape[0], flat.device)
        n = int(idx[-1]) + 1
        lo = torch.full((n,), float("inf"), device=flat.device, dtype=flat.dtype)
        hi = torch.full((n,), float("-inf"), device=flat.device, dtype=flat.dtype)
        lo = lo.scatter_reduce(0, idx, flat.amin(1), "amin")
        hi = hi.scatter_reduce(0, idx, flat.amax(1), "amax")
        return U.qparams_from_range(lo, hi, self.bits, self.symmetric), idx

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qp, idx = self.qparams(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        rows = U.QParams(qp.scale[idx].reshape(shape), qp.zero_point[idx].reshape(shape),
                         qp.qmin, qp.qmax)
        return U.fake_quantize(x, rows)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return U.storage_bits(weight.numel(), self.bits, self.n_groups(weight), self.symmetric)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, num_groups={self.num_groups}, num_heads={self.num_heads}, "
            f"symmetric={self.symmetric}, enabled={self.enabled}"
        )
