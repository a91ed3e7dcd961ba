"""LeNet-5 variants: Caffe's 20-50-500-10 (Deep Compression) and the TWN 32-64-512-10."""

import pytest
import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.models.lenet import LeNet5


def test_caffe_lenet5_shapes_and_parameter_count():
    m = LeNet5()
    # hand count: conv1 20*1*25+20, conv2 50*20*25+50, fc1 (50*4*4)*500+500, fc2 500*10+10
    assert sum(p.numel() for p in m.parameters()) == 520 + 25050 + 400500 + 5010 == 431080
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [20, 50]
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.BatchNorm1d)) for x in m.modules())
    # Caffe's net: no ReLU after the convolutions, one after fc500
    assert sum(isinstance(x, nn.ReLU) for x in m.modules()) == 1
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_twn_lenet5_matches_the_authors_layout():
    m = LeNet5(channels=(32, 64), hidden=512, batch_norm=True, conv_relu=True, last_bias=False)
    fc = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fc] == [(1024, 512), (512, 10)]
    assert fc[1].bias is None
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 2
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.modules()) == 1
    x = torch.randn(4, 1, 28, 28)
    # the forward is the composition conv-BN-ReLU-pool twice, fc-BN-ReLU, fc
    f = m.features
    h = torch.max_pool2d(torch.relu(f[1](f[0](x))), 2)
    h = torch.max_pool2d(torch.relu(f[5](f[4](h))), 2)
    c = m.classifier
    want = c[4](torch.relu(c[2](c[1](h.flatten(1)))))
    assert torch.allclose(m(x), want, atol=1e-6)


def test_tiny_and_bad_config():
    assert LeNet5(tiny=True)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError):
        LeNet5(channels=(20,))
    with pytest.raises(ConfigError):
        LeNet5(image_size=12)
