"""The run summary: metrics before/after quantization and model size from storage bits."""

from __future__ import annotations

import json
import os

from torch import nn

from qtrain.nn.quantizer_base import Quantizer


def model_bits(model: nn.Module) -> int:
    """Storage bits of ``model``: modules with ``storage_bits()`` report their own parameters
    (quantized codes + scales/codebooks), every other parameter and buffer counts at its
    dtype's width. Shared (tied) tensors count once."""
    seen: set[int] = set()

    def visit(m: nn.Module) -> int:
        own = getattr(m, "storage_bits", None)
        if callable(own) and not isinstance(m, Quantizer):
            tensors = list(m.parameters()) + list(m.buffers())
            fresh = all(id(t) not in seen for t in tensors)
            seen.update(id(t) for t in tensors)
            return own() if fresh else 0
        bits = 0
        items = list(m.named_parameters(recurse=False)) + [
            (n, b) for n, b in m.named_buffers(recurse=False)
            if n not in m._non_persistent_buffers_set
        ]
        for _, t in items:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                bits += t.numel() * t.element_size() * 8
        return bits + sum(visit(c) for c in m.children())

    return visit(model)


def format_summary(s: dict) -> str:
    def fmt(v, nd=4):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    rows = [
        ("recipe", s.get("recipe")),
        (f"FP32 {s['metric']}", fmt(s.get("fp32_metric"))),
        (f"quantized {s['metric']}", fmt(s.get("quant_metric"))),
        ("size FP32 (MB)", fmt(s["fp32_mb"], 4)),
        ("size quantized (MB)", fmt(s["quant_mb"], 4)),
        ("compression", f"{s['compression']:.2f}x"),
        ("epochs / time", f"{s.get('epochs')} / {s.get('time_s', 0):.1f}s"),
        ("run dir", s["run_dir"]),
    ]
    if s.get("packed_file"):
        rows.insert(6, ("packed file (MB)", fmt(s["packed_mb"], 4)))
    w = max(len(k) for k, _ in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * 72 + "+"
    body = [f"| {k.ljust(w)} | {str(v)[-70:].ljust(70)} |" for k, v in rows]
    return "\n".join([line, *body, line])


def write_summary(s: dict, run_dir: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(s, f, indent=2)
    return path
