import pytest
import torch

from qtrain.models.resnet_cifar import cifar_resnet
from qtrain.models.transformer_lm import TransformerLM
from qtrain.models.vision import vision_model


@pytest.mark.parametrize("name,params_m", [("resnet20", 0.27), ("resnet56", 0.85)])
def test_cifar_resnet_parameter_counts_match_paper(name, params_m):
    # He et al. 2016, Table 6: resnet20 0.27M, resnet56 0.85M parameters
    m = cifar_resnet(name)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params_m) < 0.01
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_transformer_lm_is_causal():
    torch.manual_seed(0)
    m = TransformerLM(50, dim=16, layers=2, heads=2, ffn_dim=32, dropout=0.0).eval()
    x = torch.randint(0, 50, (1, 10))
    y = m(x)
    x2 = x.clone()
    x2[0, 7] = (x2[0, 7] + 1) % 50
    y2 = m(x2)
    assert torch.allclose(y[0, :7], y2[0, :7], atol=1e-6)  # no position sees the future
    assert not torch.allclose(y[0, 7:], y2[0, 7:])
    assert m.output_projection.weight is m.embed_tokens.weight


def test_vision_weights_missing_fail_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights"):
        vision_model("resnet18", weights=str(tmp_path / "none.pth"))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_tiny_vision_models_run(name):
    m = vision_model(name, num_classes=4, tiny=True).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_mlp_lenet_300_100_widths():
    from qtrain.models.small import MLP

    net = MLP(in_features=784, hidden=[300, 100], depth=None)
    # LeNet-300-100 (LeCun 1998; Han 2015 Table 1: 267K weights): 784*300+300 + 300*100+100
    # + 100*10+10
    assert sum(p.numel() for p in net.parameters()) == 266_610
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in MLP(in_features=64, hidden=32, depth=3).parameters()) == (
        64 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 10 + 10)
    with pytest.raises(ValueError, match=r"model.depth=2 disagrees with model.hidden=\[300\]"):
        MLP(hidden=[300], depth=2)
