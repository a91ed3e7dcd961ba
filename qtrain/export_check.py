"""What a packed model holds that an external format cannot: shared by the ONNX QDQ export
(:mod:`qtrain.export_onnx`) and the Hugging Face compressed-tensors export
(:mod:`qtrain.export_hf`), each with its own per-layer rule."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qtrain.nn.packed import PackedLinear
from qtrain.nn.quantizer_base import Quantizer


def unexportable_layers(model: nn.Module, layer_problem: Callable[[PackedLinear], str | None],
                        prefix: str = "") -> list[str]:
    """``"<layer> (<why>)"`` for every packed layer ``layer_problem`` refuses, every PQ layer
    (codebooks have no form in either format) and every enabled quantizer outside a packed
    layer's activation slot (a fake-quant layer left unpacked, or an activation / output
    quantizer). ``prefix``: the module path of ``model`` inside the exported model."""
    def full(name: str) -> str:
        return ".".join(p for p in (prefix, name) if p) or "<model>"

    bad, act_slots = [], set()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            why = layer_problem(m)
            if why:
                bad.append(f"{full(name)} ({why})")
            if m.act_quantizer is not None:
                act_slots.update(id(q) for q in m.act_quantizer.modules())
        elif all(hasattr(m, a) for a in ("centroids", "assignments", "block_size")):
            bad.append(f"{full(name)} (PQ layer {type(m).__name__}, not packed)")
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and id(m) not in act_slots and getattr(m, "enabled", True):
            bad.append(f"{full(name)} ({type(m).__name__} outside a packed layer: a fake-quant "
                       "layer left unpacked, or an activation / output quantizer)")
    return bad
