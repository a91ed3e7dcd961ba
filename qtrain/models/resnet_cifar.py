"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", sec. 4.2): 6n+2 layers.

Three stages of n BasicBlocks with 16/32/64 channels (times ``width``/16), 3x3 convs,
global average pooling and one fc layer. Shortcuts use option A of the paper (identity,
with stride-2 subsampling and zero-padded channels when the shape changes), so resnet20 has
0.27M parameters as in the paper's Table 6.

``block`` chooses the residual block (:data:`BLOCKS`):

* ``basic`` (default): the paper's conv-BN-ReLU :class:`BasicBlock`.
* ``xnor``: :class:`XNORBlock`, the block order of XNOR-Net (Rastegari et al. 2016, Fig. 3
  and sec. 3.3: "a typical block in CNN ... BatchNorm -> BinActiv -> BinConv -> Pool"; the
  input is normalised before it is binarised, so sign() sees values of both signs). In a
  ResNet this is the pre-activation order (He et al. 2016b, "Identity Mappings in Deep
  Residual Networks"): each conv's input is act(BN(.)), the shortcut carries the raw sum,
  the stem conv takes the image directly and a final BN + ReLU precede the pooling.
  With ``basic``, every binarised conv input would be a ReLU output >= 0 and sign() would
  map it all to +1 (no information in the binary inputs). The widely used re-implementation
  jiecaoyu/XNOR-Net-PyTorch (CIFAR_10/models/nin.py: BN -> BinActive -> conv -> ReLU per
  binary layer) likewise puts a BatchNorm right before every binarisation. The paper gives
  no ResNet block diagram; the pre-activation layout is our reading of Fig. 3 for a ResNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.format_quantizers import BinaryActQuantizer

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
BLOCKS = ("basic", "xnor")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            PadShortcut(stride, cout - cin) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def binarises_input(conv: nn.Module) -> bool:
    """True when ``conv`` (a fake-quant or packed layer) binarises its own input with an
    enabled sign quantizer (:class:`qtrain.nn.format_quantizers.BinaryActQuantizer`, which
    :class:`~qtrain.nn.format_quantizers.XNORActQuantizer` extends)."""
    aq = getattr(conv, "act_quantizer", None)
    return isinstance(aq, BinaryActQuantizer) and aq.enabled


class XNORBlock(nn.Module):
    """Pre-activation block in XNOR-Net's order (module doc): ``out = conv1(a(bn1(x)));
    out = conv2(a(bn2(out))); out + shortcut(x)``.

    ``a`` is hardtanh while the conv is float (BNN's clipped-STE surrogate: sign(a(y)) =
    sign(y), so the FP32 phase trains a nonlinear network whose signs are the later binary
    inputs) and the identity once the conv binarises its input (:func:`binarises_input`):
    then the conv's XNORActQuantizer takes BN's output as XNOR-Net's BinActiv does (sign(I)
    with the clipped STE, whose gradient 1{|I| <= 1} is hardtanh's, and K of eq. 11 from |I|
    unclipped, as in the authors' BinActive). Module names conv1/bn1/conv2/bn2 as
    :class:`BasicBlock`, but bn1/bn2 normalise the conv *inputs* (bn1 has ``cin``
    channels). Not a ``BasicBlock``: ``quant.quantize_residual`` does not apply to it.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            PadShortcut(stride, cout - cin) if stride != 1 or cin != cout else nn.Identity()
        )

    @staticmethod
    def _act(y: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return y if binarises_input(conv) else F.hardtanh(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self._act(self.bn1(x), self.conv1))
        out = self.conv2(self._act(self.bn2(out), self.conv2))
        return out + self.shortcut(x)


class CifarResNet(nn.Module):
    """``block='basic'``: conv1 -> bn1 -> ReLU -> BasicBlocks -> pool -> fc (He et al. 2016).
    ``block='xnor'``: conv1 (full precision, no BN/ReLU after it) -> XNORBlocks -> bn_final
    -> ReLU -> pool -> fc, the pre-activation layout (module doc); ``bn1`` does not exist."""

    def __init__(self, n: int, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 block: str = "basic"):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"model.block={block!r} unknown; allowed: {list(BLOCKS)}")
        self.block = block
        widths = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        if block == "basic":
            self.bn1 = nn.BatchNorm2d(widths[0])
        make = BasicBlock if block == "basic" else XNORBlock
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(make(cin, w, stride))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        if block == "xnor":
            self.bn_final = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.block == "basic":
            x = F.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.block == "xnor":
            x = F.relu(self.bn_final(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(
    name: str = "resnet20", num_classes: int = 10, width: int = 16, tiny: bool = False,
    in_channels: int = 3, channels_last: bool = False, block: str = "basic",
) -> CifarResNet:
    """Build ``resnet20/32/44/56/110``; ``tiny`` keeps the depth and uses width 4 (smoke).

    ``block``: 'basic' (He et al.'s conv-BN-ReLU block, default) | 'xnor' (XNOR-Net's
    BN -> act -> conv pre-activation order, :class:`XNORBlock`; module doc).

    ``channels_last``: store the conv weights NHWC (``torch.channels_last``); on the 2-core
    x86 CPU this runs a ResNet-20 training step at batch 128 2.6-3x faster than NCHW (1.53 s ->
    0.52-0.58 s, measured side by side in one process, torch 2.14.1). Same math, different
    floating-point summation order, so not bitwise equal to an NCHW run."""
    if name not in DEPTHS:
        raise ConfigError(f"model.name={name!r} unknown; allowed: {sorted(DEPTHS)}")
    model = CifarResNet(DEPTHS[name], num_classes, 4 if tiny else width, in_channels, block)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def resnet20(num_classes: int = 10, tiny: bool = False) -> CifarResNet:
    return cifar_resnet("resnet20", num_classes, tiny=tiny)
