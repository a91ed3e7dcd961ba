"""LeNet-5 variants for MNIST (28x28, 1 channel): conv5 - maxpool2 - conv5 - maxpool2 - fc - fc.

* Caffe's LeNet (``examples/mnist/lenet_train_test.prototxt``; the LeNet-5 of Han et al. 2016,
  Deep Compression, Table 1 / Table 2: 431K weights): conv 20 (5x5) - pool - conv 50 (5x5) -
  pool - fc 500 - ReLU - fc 10; no nonlinearity after the convolutions (Caffe's net has none),
  biases everywhere. ``LeNet5()`` with the defaults.
* The LeNet-5 of Ternary Weight Networks (Li & Liu 2016; the authors' PyTorch code,
  Thinklab-SJTU/twns ``litenet.py``): conv 32 (5x5) - BN - ReLU - pool - conv 64 (5x5) - BN -
  ReLU - pool - fc 512 - BN - ReLU - fc 10 without bias. ``LeNet5(channels=(32, 64),
  hidden=512, batch_norm=True, conv_relu=True, last_bias=False)`` (conf/model/lenet5_twn.yaml).
  The authors' float model has no BN after fc 512; their TWN / BWN models do -- here one
  network for all three rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qtrain.errors import ConfigError


class LeNet5(nn.Module):
    """Args:
        num_classes / in_channels / image_size: 10, 1, 28 for MNIST.
        channels: output channels of the two 5x5 convolutions.
        hidden: width of the first fully connected layer.
        batch_norm: BatchNorm after each conv and after the hidden fc.
        conv_relu: ReLU after each conv (Caffe's LeNet: none).
        last_bias: bias of the classifier.
        tiny: (4, 8) channels and 16 hidden units (smoke runs).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 channels: Sequence[int] = (20, 50), hidden: int = 500, batch_norm: bool = False,
                 conv_relu: bool = False, last_bias: bool = True, tiny: bool = False) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 2 or min(channels) < 1 or int(hidden) < 1:
            raise ConfigError(f"model.channels={channels} / model.hidden={hidden}: need two "
                              "positive conv widths and a positive hidden width")
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"model.image_size={image_size}: too small for two 5x5 conv + "
                              "2x2 pool stages (needs >= 16)")
        if tiny:
            channels, hidden = [4, 8], 16
        c1, c2 = channels

        def stage(cin: int, cout: int) -> list[nn.Module]:
            mods: list[nn.Module] = [nn.Conv2d(cin, cout, 5)]
            if batch_norm:
                mods.append(nn.BatchNorm2d(cout))
            if conv_relu:
                mods.append(nn.ReLU())
            return mods + [nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(in_channels, c1), *stage(c1, c2))
        fc: list[nn.Module] = [nn.Flatten(), nn.Linear(c2 * side * side, hidden)]
        if batch_norm:
            fc.append(nn.BatchNorm1d(hidden))
        fc += [nn.ReLU(), nn.Linear(hidden, num_classes, bias=last_bias)]
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
