"""Residual block with the quantization points of integer-only inference (Jacob et al. 2018).

Sec. 3 (training with simulated quantization): activations are quantized "at points where
they would be during inference, e.g. after the activation function is applied to a
convolutional or fully connected layer's output, or after a bypass connection adds or
concatenates the outputs of several layers together such as in ResNets". In a ResNet basic
block (He et al. 2016) that means:

* the block input is quantized ONCE, and the same quantized tensor feeds both the residual
  branch's first conv and the shortcut (``input_quantizer``; in qtrain's layer-input
  convention this is the first conv's input quantizer, moved up to the block);
* the branch output (conv2 -> BN, folded) is quantized before the add (``branch_quantizer``),
  as the integer add (:class:`qtrain.nn.integer_inference.IntegerAdd`, sec. 2.4) consumes two
  quantized tensors;
* the add's output passes ReLU and is quantized by its consumer, the next block's
  ``input_quantizer`` (the integer model fuses the ReLU as clamping). The last block, whose
  output goes through global average pooling to the classifier, quantizes its own output
  (``output_quantizer``: the classifier's input quantizer moved here by the QAT callback), so
  the quantization point is right after the last bypass add as the paper says; the integer
  model then sums the pooled codes inside the classifier's int32 accumulator.

:class:`QuantBasicBlock` wraps any block with ``conv1``, ``bn1``, ``conv2``, ``bn2`` and
``shortcut`` attributes computing ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``
(:class:`qtrain.models.resnet_cifar.BasicBlock`), sharing its submodules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_ATTRS = ("conv1", "bn1", "conv2", "bn2", "shortcut")


def is_basic_block(m: nn.Module) -> bool:
    """A module shaped like a ResNet basic block (:data:`BLOCK_ATTRS`), matched by type name
    ``BasicBlock`` so unrelated modules with a ``conv1`` are not swapped."""
    return type(m).__name__ == "BasicBlock" and all(hasattr(m, a) for a in BLOCK_ATTRS)


class QuantBasicBlock(nn.Module):
    """``Q_out(relu(Q_branch(bn2(conv2(relu(bn1(conv1(Q_in(x))))))) + shortcut(Q_in(x))))``
    (``Q_out`` only on the last block, else identity)."""

    def __init__(self, block: nn.Module, input_quantizer: nn.Module, branch_quantizer: nn.Module,
                 output_quantizer: nn.Module | None = None):
        super().__init__()
        for a in BLOCK_ATTRS:
            setattr(self, a, getattr(block, a))
        self.input_quantizer = input_quantizer
        self.branch_quantizer = branch_quantizer
        self.output_quantizer = output_quantizer
        self.train(block.training)

    def quantizers(self):
        qs = [self.input_quantizer, self.branch_quantizer, self.output_quantizer]
        return [q for q in qs if q is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quantizer(x)
        h = F.relu(self.bn1(self.conv1(xq)))
        y = self.branch_quantizer(self.bn2(self.conv2(h)))
        out = F.relu(y + self.shortcut(xq))
        return out if self.output_quantizer is None else self.output_quantizer(out)
