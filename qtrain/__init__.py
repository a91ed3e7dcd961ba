"""qtrain: reproducible training recipes for neural-network quantization."""

__version__ = "0.1.0"
