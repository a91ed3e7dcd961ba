"""8-bit gradient formats of Dettmers (2016, ICLR), "8-Bit Approximations for Parallelism in
Deep Learning" (arXiv:1511.04561): the dynamic tree data type and linear 8-bit, each applied
to values normalised by their absolute maximum.

Dynamic tree (the paper's Section 3 and its figure of the data type; read from the paper's
description, ~, not re-verified against its CUDA code). An 8-bit code ``b7 b6 ... b0``:

* ``b7`` is the sign;
* a run of ``k`` zero bits (``b6`` downwards) is the decimal exponent: magnitude ``10^-k``;
* the first one bit after the run is the *indicator* bit: it ends the exponent;
* the ``f = 6 - k`` bits after it are a binary bisection tree over the fraction range
  [0.1, 1]: each bit halves the current interval (0 = lower half, 1 = upper half) and the
  value is the centre of the last interval, ``0.1 + 0.9 (m + 1/2) / 2^f`` with ``m`` the ``f``
  bits read as an unsigned integer;
* no one bit at all (``k = 7``: codes 0x00 and 0x80) is zero.

So ``|x| = 10^-k (0.1 + 0.9 (m + 1/2) / 2^(6-k))``: 64 fractions at 10^0, 32 at 10^-1, ...,
1 at 10^-6 per sign, 127 non-zero magnitudes from 5.5e-7 to 0.99297 plus zero. Small numbers
keep a wide range, large ones many fraction bits (the data type trades precision for range
bit by bit). ``bits`` < 8 shortens the same construction (``k`` in 0..bits-2). This is the
construction bitsandbytes generalised as ``create_dynamic_map`` (signed, 7 exponent bits); it
puts 1.0 into the redundant negative-zero slot, which the paper's bit definition does not
have: here code 0x80 decodes to 0 like 0x00 (the largest magnitude is 0.99297, so the
absmax element comes back 0.7% small).

Linear 8-bit (the paper's baseline "8-bit linear quantization"; the level set is our choice,
the paper does not print it): 255 symmetric levels ``(c - 127) / 127``, c = 0..254, zero
exact.

Quantisation: values are divided by the absolute maximum of their segment (the paper
normalises each matrix by its maximum absolute value and sends the maximum along: one
gradient tensor per scale, ``normalize="tensor"`` in :mod:`qtrain.comm.eight_bit`), then
mapped to the nearest value of the format (the paper looks the nearest value up by binary
search in the sorted table; here ``torch.bucketize`` on the midpoints between sorted values,
ties to the lower value). Decoding is a table lookup times the segment's maximum. A segment
of zeros has maximum 0 and decodes to zeros; a non-finite maximum decodes to NaN, so
overflow detection (GradScaler) still sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qtrain.errors import ConfigError

FORMATS = ("dynamic_tree", "linear")


def dynamic_tree_value(code: int, bits: int = 8) -> float:
    """Value of one dynamic-tree code, read bit by bit (sign, zero run, indicator, fraction)."""
    if not 0 <= code < 2 ** bits:
        raise ConfigError(f"dynamic tree code {code} is outside 0..{2 ** bits - 1}")
    sign = -1.0 if code >> (bits - 1) & 1 else 1.0
    k = 0
    while k < bits - 1 and not (code >> (bits - 2 - k)) & 1:
        k += 1
    if k == bits - 1:
        return 0.0
    f = bits - 2 - k  # fraction bits after the indicator bit
    m = code & ((1 << f) - 1)
    return sign * 10.0 ** (-k) * (0.1 + 0.9 * (m + 0.5) / 2 ** f)


def dynamic_tree_table(bits: int = 8) -> torch.Tensor:
    """``table[code]`` for every code 0 .. 2^bits - 1 (fp32)."""
    if not 3 <= bits <= 8:
        raise ConfigError(f"dynamic tree bits={bits}: allowed 3..8")
    return torch.tensor([dynamic_tree_value(c, bits) for c in range(2 ** bits)],
                        dtype=torch.float32)


def linear_table() -> torch.Tensor:
    """``table[code] = (code - 127) / 127`` for code 0..254: symmetric, zero exact."""
    return (torch.arange(255, dtype=torch.float64) - 127).div(127).float()


@dataclass
class CodeTable:
    """A code -> value table with the sorted view used for nearest-value encoding."""

    name: str
    values: torch.Tensor  # values[code], fp32
    order: torch.Tensor = field(init=False)  # codes sorted by value
    thresholds: torch.Tensor = field(init=False)  # midpoints between neighbouring values

    def __post_init__(self) -> None:
        sorted_vals, order = torch.sort(self.values, stable=True)
        self.order = order.to(torch.uint8)
        self.thresholds = (sorted_vals[1:] + sorted_vals[:-1]) / 2

    def to(self, device) -> CodeTable:
        if self.values.device == torch.device(device):
            return self
        return CodeTable(self.name, self.values.to(device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code (uint8) of every element of ``x`` (already normalised to [-1, 1])."""
        idx = torch.bucketize(x, self.thresholds)
        return self.order[idx]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.values[codes.long()]


def make_table(fmt: str, bits: int = 8) -> CodeTable:
    if fmt == "dynamic_tree":
        return CodeTable(fmt, dynamic_tree_table(bits))
    if fmt == "linear":
        if bits != 8:
            raise ConfigError(f"format=linear has 8 bits only (got bits={bits})")
        return CodeTable(fmt, linear_table())
    raise ConfigError(f"format={fmt!r}: allowed {', '.join(FORMATS)}")


def _expand(scales: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(scales, lengths)


def quantize(x: torch.Tensor, table: CodeTable,
             lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per element of the flat ``x``) and one fp32 absmax per segment;
    ``lengths`` (int64) splits ``x`` into consecutive segments and sums to ``x.numel()``."""
    x = x.reshape(-1).float()
    if int(lengths.sum()) != x.numel():
        raise ValueError(f"segment lengths sum to {int(lengths.sum())}, tensor has {x.numel()}")
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    scales = torch.zeros(len(lengths), dtype=torch.float32, device=x.device)
    scales.scatter_reduce_(0, seg, x.abs(), reduce="amax", include_self=True)
    nonfinite = ~torch.isfinite(x)
    if nonfinite.any():  # NaN is lost by amax on some builds: mark the segment explicitly
        scales[seg[nonfinite]] = float("nan")
    s = scales[seg]
    xn = torch.where(s > 0, x / s, torch.zeros_like(x))
    return table.encode(xn), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, table: CodeTable,
               lengths: torch.Tensor) -> torch.Tensor:
    """fp32 values ``table[code] * absmax`` of the segment (NaN where the absmax is not finite)."""
    return table.decode(codes) * _expand(scales, lengths)


def chunk_lengths(n: int, chunk: int) -> torch.Tensor:
    """Segments of ``chunk`` elements (the last one shorter) covering ``n`` elements."""
    if chunk < 1:
        raise ConfigError(f"chunk_size={chunk}: must be >= 1")
    full, rest = divmod(n, chunk)
    return torch.tensor([chunk] * full + ([rest] if rest else []), dtype=torch.long)
