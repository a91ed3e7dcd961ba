"""The run summary: metrics before/after quantization and model size from storage bits."""

from __future__ import annotations

import json
import os

from torch import nn

from qtrain.quant.size import model_huffman_bits, model_storage_bits


def model_bits(model: nn.Module) -> int:
    """Exact storage bits of ``model`` (qtrain.quant.size.model_storage_bits)."""
    return model_storage_bits(model).total_bits


def huffman_bits(model: nn.Module) -> int:
    """Storage bits with every layer's codes Huffman-coded (Deep Compression's last stage)."""
    return model_huffman_bits(model).total_bits


def format_summary(s: dict) -> str:
    def fmt(v, nd=4):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    rows = [
        ("recipe", s.get("recipe")),
        *([("initial weights (init_from)", s["init_from"]["file"])] if s.get("init_from") else []),
        (f"FP32 {s['metric']} (val, before quant.)", fmt(s.get("fp32_val_metric"))),
        (f"quantized {s['metric']} (val)", fmt(s.get("quant_val_metric"))),
        (f"FP32 {s['metric']} (test{'; ' + s['fp32_source'] if s.get('fp32_source') else ''})",
         fmt(s.get("fp32_metric"))),
        (f"quantized {s['metric']} (test)", fmt(s.get("quant_metric"))),
        (f"float master weights {s['metric']} (test)", fmt(s.get("float_weights_metric"))),
        (f"integer-only {s['metric']} (test)", fmt(s.get("int_metric"))),
        ("size FP32 (MB)", fmt(s["fp32_mb"], 4)),
        ("size quantized (MB)", fmt(s["quant_mb"], 4)),
        ("compression", f"{s['compression']:.2f}x"),
        ("Huffman-coded (MB)", fmt(s.get("huffman_mb"), 4)),
        ("epochs / time", f"{s.get('epochs')} / {s.get('time_s', 0):.1f}s"),
        ("run dir", s["run_dir"]),
    ]
    if s.get("packed_file"):
        rows.insert(6, ("packed file (MB)", fmt(s["packed_mb"], 4)))
    if s.get("smoke"):
        rows.insert(1, ("mode", "smoke: tiny generated data and model, metrics meaningless"))
    w = max(len(k) for k, _ in rows)
    vw = max(70, *(len(str(v)) for _, v in rows))  # never cut a value (the run dir)
    line = "+" + "-" * (w + 2) + "+" + "-" * (vw + 2) + "+"
    body = [f"| {k.ljust(w)} | {str(v).ljust(vw)} |" for k, v in rows]
    return "\n".join([line, *body, line])


def write_summary(s: dict, run_dir: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(s, f, indent=2)
    return path
