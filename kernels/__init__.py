"""qtrain_kernels: fused low-bit Triton kernels, the packed bit layout and torch references.

Installed from the repository folder ``kernels/`` as the import package ``qtrain_kernels``
(never ``kernels``, which is an unrelated PyPI package). Imports nothing from ``qtrain``.
CPU tensors run the same kernels through Triton's interpreter.
"""

from .layout import (
    CONTAINERS,
    FORMAT_VERSION,
    LAYOUT,
    container_bits,
    dequantize_codebook,
    dequantize_uniform,
    pack_bitplanes,
    pack_codes,
    unpack_bitplanes,
    unpack_codes,
)
from .lowbit_matmul import lowbit_linear, lowbit_linear_reference

__all__ = [
    "CONTAINERS",
    "FORMAT_VERSION",
    "LAYOUT",
    "container_bits",
    "dequantize_codebook",
    "dequantize_uniform",
    "lowbit_linear",
    "lowbit_linear_reference",
    "pack_bitplanes",
    "pack_codes",
    "unpack_bitplanes",
    "unpack_codes",
]
