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


def _fmt(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def summary_rows(s: dict) -> list[tuple[str, str, str]]:
    """The end-of-run summary's rows as (group, label, value): groups ``run``, ``metric``,
    ``size`` (:func:`format_summary` prints them as text, :mod:`qtrain.terminal` as a table)."""
    m = s["metric"]
    fp32_note = "; " + s["fp32_source"] if s.get("fp32_source") else ""
    rows = [
        ("run", "recipe", s.get("recipe")),
        *([("run", "initial weights (init_from)", s["init_from"]["file"])]
          if s.get("init_from") else []),
        ("metric", f"FP32 {m} (val, before quant.)", _fmt(s.get("fp32_val_metric"))),
        ("metric", f"quantized {m} (val)", _fmt(s.get("quant_val_metric"))),
        ("metric", f"FP32 {m} (test{fp32_note})", _fmt(s.get("fp32_metric"))),
        ("metric", f"quantized {m} (test)", _fmt(s.get("quant_metric"))),
        ("metric", f"float master weights {m} (test)", _fmt(s.get("float_weights_metric"))),
        ("metric", f"integer-only {m} (test)", _fmt(s.get("int_metric"))),
        ("size", "size FP32 (MB)", _fmt(s["fp32_mb"], 4)),
        ("size", "size quantized (MB)", _fmt(s["quant_mb"], 4)),
        *([("size", "packed file (MB)", _fmt(s["packed_mb"], 4))] if s.get("packed_file") else []),
        ("size", "compression", f"{s['compression']:.2f}x"),
        ("size", "Huffman-coded (MB)", _fmt(s.get("huffman_mb"), 4)),
        ("run", "epochs / time", f"{s.get('epochs')} / {s.get('time_s', 0):.1f}s"),
        ("run", "run dir", s["run_dir"]),
    ]
    if s.get("smoke"):
        rows.insert(1, ("run", "mode", "smoke: tiny generated data and model, metrics meaningless"))
    return [(g, k, str(v)) for g, k, v in rows]


def format_summary(s: dict) -> str:
    """The summary as a plain-text (ASCII) table: what log files and CI logs get."""
    rows = [(k, v) for _, k, v in summary_rows(s)]
    w = max(len(k) for k, _ in rows)
    vw = max(70, *(len(v) for _, v in rows))  # never cut a value (the run dir)
    line = "+" + "-" * (w + 2) + "+" + "-" * (vw + 2) + "+"
    body = [f"| {k.ljust(w)} | {v.ljust(vw)} |" for k, v in rows]
    return "\n".join([line, *body, line])


def write_summary(s: dict, run_dir: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(s, f, indent=2)
    return path
