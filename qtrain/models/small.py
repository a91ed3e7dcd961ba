"""Small models for the 8x8 scikit-learn digits and MNIST-sized inputs."""

from __future__ import annotations

import torch
from torch import nn


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
    def __init__(
        self, in_features: int = 64, num_classes: int = 10, hidden: int = 256, depth: int = 2,
        tiny: bool = False,
    ) -> None:
        super().__init__()
        hidden = 16 if tiny else hidden
        layers, d = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
