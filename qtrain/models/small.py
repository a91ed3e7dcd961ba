"""Small models for the 8x8 scikit-learn digits and MNIST-sized inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qtrain.errors import ConfigError


class SmallCNN(nn.Module):
    """conv(ch) - relu - conv(2ch, stride 2) - relu - fc(hidden) - relu - fc(classes)."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
        channels: int = 32, hidden: int = 128, tiny: bool = False,
    ) -> None:
        super().__init__()
        if tiny:
            channels, hidden = 4, 16
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * channels), nn.ReLU(),
        )
        side = (image_size + 1) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected ReLU network. ``hidden``: one width repeated ``depth`` times, or a list
    of widths (then ``depth`` must be None or equal its length), e.g. ``[300, 100]`` for
    LeNet-300-100 (LeCun et al. 1998)."""

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, hidden: int | Sequence[int] = 256,
        depth: int | None = 2, tiny: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(hidden, int):
            widths = [hidden] * (2 if depth is None else depth)
        else:
            widths = [int(h) for h in hidden]
            if depth is not None and depth != len(widths):
                raise ConfigError(f"model.depth={depth} disagrees with model.hidden={widths} "
                                  f"({len(widths)} layers); set depth: null or {len(widths)}")
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"model.hidden={hidden}: need at least one positive width")
        if tiny:
            widths = [16] * len(widths)
        layers, d = [nn.Flatten()], in_features
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
