"""ABC-Net quantizer modules: Lin, Zhao & Pan 2017, "Towards Accurate Binary Convolutional
Neural Network" (NeurIPS 2017). Math and conventions: :mod:`qtrain.quant.abc`.

* :class:`ABCWeightQuantizer` -- ``bits`` = M, the number of binary weight bases: ``W ~
  sum_i alpha_i B_i`` with ``B_i = sign(W - mean W + u_i std W)``, ``u_i = -1 + (i-1) 2/(M-1)``
  and alpha by least squares, both recomputed from the float weight in every forward
  (eq. 2-4); gradient ``dc/dW = sum_i alpha_i dc/dB_i`` (eq. 5). Per layer (the paper);
  ``per_channel=True`` is a named non-paper option. Storage: M bits per weight + M fp32 alphas
  per layer (per row with ``per_channel``). Packed export: the M bit planes as one M-bit code
  per weight in the ``lut`` format, the table ``sum_i alpha_i (2 bit_i - 1)`` of the 2^M codes
  (:meth:`ABCWeightQuantizer.packed_codes`; bit-exact, see :mod:`qtrain.nn.packed_formats`).
* :class:`ABCActQuantizer` -- ``bits`` = N, the number of binary activation bases: ``A =
  sum_n beta_n H_{v_n}(R)``, ``H_v(R) = 2 I[clip(R + v, 0, 1) >= 0.5] - 1`` (eq. 6-8) with
  learnable ``v`` and ``beta`` (Parameters, so the optimizer trains them and checkpoints /
  packed files carry them).

Used through :class:`qtrain.callbacks.qat.QATCallback` (``conf/quant/abc.yaml``): quant.bits
is M, quant.act_bits is N; first conv and last fc stay in full precision (first_last=keep,
as the paper keeps them).
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.quantizer_base import Quantizer
from qtrain.quant import abc as A

ALPHA_BITS = 32  # fp32 alpha per base (and layer / row)


class ABCWeightQuantizer(Quantizer):
    """ABC-Net weights with M = ``bits`` binary bases (module doc).

    Args:
        bits: M, 1..8 (the paper: 1, 2, 3, 5; the packed ``lut`` format holds codes up to 8 bits).
        per_channel: False (the paper: one mean/std/alpha set per layer) or True (per output
            channel; not the paper).
    """

    min_bits, max_bits = 1, 8

    def __init__(self, bits: int = 3, per_channel: bool = False) -> None:
        super().__init__(bits)
        if not isinstance(per_channel, bool):
            raise ConfigError(f"ABCWeightQuantizer: per_channel must be true or false, got {per_channel!r}")
        self.per_channel = per_channel

    def shifts(self) -> torch.Tensor:
        return A.weight_shifts(self.bits)

    def bases_alpha(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The M bases (M, *weight.shape) and their least-squares alpha ((M,) or (M, rows))."""
        bases = A.weight_bases(weight, self.shifts(), self.per_channel)
        return bases, A.lstsq_alpha(weight, bases, self.per_channel)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return A.abc_weight(x, self.bits, self.per_channel, self.shifts())

    @torch.no_grad()
    def packed_codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, table)``: the M-bit code of every weight, shape (out, in) (bit i = base i
        is +1), and the value of each code, (1, 2^M) per layer or (out, 2^M) per channel --
        ``table[row, codes]`` equals this quantizer's output bit for bit."""
        bases, alpha = self.bases_alpha(weight.float())
        codes = A.codes(bases).reshape(weight.shape[0], -1)
        table = A.code_table(alpha)
        return codes, table.reshape(-1 if self.per_channel else 1, 2**self.bits)

    def storage_bits(self, weight: torch.Tensor) -> int:
        rows = weight.shape[0] if self.per_channel and weight.dim() > 1 else 1
        return self.bits * weight.numel() + ALPHA_BITS * self.bits * rows

    def extra_repr(self) -> str:
        return f"M={self.bits}, per_channel={self.per_channel}, enabled={self.enabled}"


class ABCActQuantizer(Quantizer):
    """ABC-Net activations with N = ``bits`` binary bases and learnable shifts / scales.

    Args:
        bits: N, 1..8 (the paper: 1, 3, 5).
        v_init: N initial shifts (default ``0.5 - (2n - 1) / (2N)``, n = 1..N: thresholds
            ``R >= 0.5 - v_n`` evenly inside (0, 1); our choice, see :mod:`qtrain.quant.abc`).
        beta_init: N initial scales (default ``1 / N`` each).
        ste_gain: the straight-through gradient of H_v is ``ste_gain * 1[0 <= R + v <= 1]``
            (1: the derivative of the clip h_v; 2: of the proxy 2 h_v - 1).
    Parameters ``v`` and ``beta`` (N,) are trained by the optimizer. Storage: activations are
    not stored; the layer's ``storage_bits`` counts v and beta as its quantizer parameters.
    """

    min_bits, max_bits = 1, 8

    def __init__(self, bits: int = 3, v_init: list[float] | None = None,
                 beta_init: list[float] | float | None = None, ste_gain: float = 1.0) -> None:
        super().__init__(bits)
        n = self.bits
        v = (torch.tensor([0.5 - (2 * i - 1) / (2 * n) for i in range(1, n + 1)])
             if v_init is None else torch.as_tensor(list(v_init), dtype=torch.float32))
        if beta_init is None:
            beta = torch.full((n,), 1.0 / n)
        elif isinstance(beta_init, int | float):
            beta = torch.full((n,), float(beta_init))
        else:
            beta = torch.as_tensor(list(beta_init), dtype=torch.float32)
        for key, t in (("v_init", v), ("beta_init", beta)):
            if t.shape != (n,):
                raise ConfigError(f"ABCActQuantizer: {key} must have N = bits = {n} values, "
                                  f"got {t.tolist()}")
        if not float(ste_gain) > 0:
            raise ConfigError(f"ABCActQuantizer: ste_gain must be > 0, got {ste_gain!r}")
        self.v = nn.Parameter(v.float())
        self.beta = nn.Parameter(beta.float())
        self.ste_gain = float(ste_gain)

    def set_bits(self, bits: int) -> None:
        if bits != self.bits:
            raise ConfigError(f"ABCActQuantizer: N = bits is fixed by its v / beta parameters "
                              f"({self.bits}); cannot change it to {bits}")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return A.abc_activation(x, self.v, self.beta, self.ste_gain)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return 2 * 32 * self.bits

    def extra_repr(self) -> str:
        return f"N={self.bits}, ste_gain={self.ste_gain}, enabled={self.enabled}"
