"""torchvision ImageNet models (resnet18/50, mobilenet_v2, efficientnet_b0/b3).

Pretrained weights are never downloaded implicitly: ``weights`` is ``None`` (random init),
a path to a ``.pth``/``.safetensors`` state dict, or ``"DEFAULT"`` (torchvision's published
weights, which must already be in the torch hub cache; without them the run stops at once
with a message naming ``model.weights``). ``tiny=True`` builds a smaller member of the same
torchvision class for smoke tests (ResNet with one block per stage, width-reduced MobileNet /
EfficientNet).
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from qtrain.errors import ConfigError, MissingFileError

NAMES = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "efficientnet_b3")


def _tiny(name: str, num_classes: int) -> nn.Module:
    if name == "resnet18":
        return tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    if name == "resnet50":
        return tv_resnet.ResNet(
            tv_resnet.Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=16
        )
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)
    # efficientnet: the b0 architecture at reduced width through the builder's settings
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    settings, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(settings, 0.2, last_channel=last, num_classes=num_classes)


def load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def vision_model(
    name: str = "resnet18", num_classes: int = 1000, weights: str | None = None,
    tiny: bool = False,
) -> nn.Module:
    if name not in NAMES:
        raise ConfigError(f"model.name={name!r} unknown; allowed: {NAMES}")
    if tiny:
        return _tiny(name, num_classes)
    builder = getattr(torchvision.models, name)
    if weights is None:
        return builder(weights=None, num_classes=num_classes)
    if weights == "DEFAULT":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
        if not os.path.exists(cached):
            raise MissingFileError(
                f"model.weights=DEFAULT needs {enum.url} in the torch hub cache ({cached}); "
                "download it there or set model.weights=/path/to/state_dict.pth"
            )
        model = builder(weights=enum)
    else:
        if not os.path.isfile(weights):
            raise MissingFileError(f"model.weights={weights!r}: no such file")
        model = builder(weights=None)
        model.load_state_dict(load_state_dict_file(weights))
    if hasattr(model, "fc") and model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
