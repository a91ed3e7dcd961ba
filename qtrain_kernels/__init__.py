"""qtrain_kernels: fused low-bit Triton kernels, the packed bit layout and torch references.

The repository folder ``qtrain_kernels/``, the import package ``qtrain_kernels``
(never ``kernels``, which is an unrelated PyPI package). Imports nothing from ``qtrain``.
CPU tensors run the same kernels through Triton's interpreter (see ``runtime``).
Needs triton: the default (CUDA) torch wheel on Linux brings it; with the CPU wheel,
``pip install "qtrain[kernels]"``.
"""

try:
    import triton  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise
    raise ModuleNotFoundError(
        'qtrain_kernels (packed inference, export=true) needs triton (not installed): '
        'pip install "qtrain[kernels]"', name="triton") from e

from .bitserial import bitserial_matmul, bitserial_matmul_reference
from .codebook_matmul import codebook_linear, codebook_linear_reference
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
from .w8a8 import quantize_rows_int8, w8a8_linear, w8a8_linear_reference

__all__ = [
    "CONTAINERS",
    "FORMAT_VERSION",
    "LAYOUT",
    "bitserial_matmul",
    "bitserial_matmul_reference",
    "codebook_linear",
    "codebook_linear_reference",
    "container_bits",
    "dequantize_codebook",
    "dequantize_uniform",
    "lowbit_linear",
    "lowbit_linear_reference",
    "pack_bitplanes",
    "pack_codes",
    "quantize_rows_int8",
    "unpack_bitplanes",
    "unpack_codes",
    "w8a8_linear",
    "w8a8_linear_reference",
]
