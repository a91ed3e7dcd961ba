"""Every callback reads ``include``/``exclude`` through ``convert.as_patterns``: the documented
command-line form ``quant.include=fc.*`` arrives as a plain string and must be ONE regex
(``list("fc.*")`` gave the patterns 'f', 'c', '.', '*' and the error ``invalid regex '*'``)."""

import pytest
from omegaconf import OmegaConf
from torch import nn

from qtrain.callbacks.deep_compression import DeepCompressionCallback
from qtrain.callbacks.hessian_sensitivity import HessianSensitivity
from qtrain.callbacks.inq import INQCallback
from qtrain.callbacks.ipq import IterativePQCallback
from qtrain.callbacks.qat import QATCallback
from qtrain.callbacks.quant_noise import QuantNoiseCallback
from qtrain.callbacks.vector_quant import VectorQuantizationCallback
from qtrain.nn.convert import LayerSelectionError, as_patterns, select_modules
from qtrain.nn.uniform_quantizer import UniformQuantizer


def _net():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("value, expected", [
    ("fc.*", ["fc.*"]),
    (["a", "b\\..*"], ["a", "b\\..*"]),
    (OmegaConf.create({"x": ["0", "2"]}).x, ["0", "2"]),
    (None, []),
    ((), []),
])
def test_as_patterns(value, expected):
    assert as_patterns(value) == expected


def test_string_is_one_regex_in_selection():
    assert list(select_modules(_net(), "[02]")) == ["0", "2"]
    assert list(select_modules(_net(), ".*", exclude="2")) == ["0"]
    with pytest.raises(LayerSelectionError, match="matches no"):
        select_modules(_net(), "fc.*")


CALLBACKS = {
    "qat": lambda inc, exc: QATCallback(weight=UniformQuantizer, include=inc,
                                         exclude=exc),
    "inq": lambda inc, exc: INQCallback(include=inc, exclude=exc),
    "quant_noise": lambda inc, exc: QuantNoiseCallback(include=inc, exclude=exc),
    "vq": lambda inc, exc: VectorQuantizationCallback(include=inc, exclude=exc),
    "deep_compression": lambda inc, exc: DeepCompressionCallback(include=inc, exclude=exc),
    "hessian": lambda inc, exc: HessianSensitivity(average_bits=4, include=inc, exclude=exc),
}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callbacks_keep_a_string_rule_whole(name):
    cb = CALLBACKS[name]("layer1\\..*", "fc")
    assert cb.include == ["layer1\\..*"] and cb.exclude == ["fc"]
    net = nn.Sequential(_net(), _net())  # layers named 0.0, 0.2, 1.0, 1.2
    cb = CALLBACKS[name]("1\\..*", "1.2")
    assert list(select_modules(net, cb.include, cb.exclude)) == ["1.0"]


def test_ipq_string_stage_and_exclude():
    cb = IterativePQCallback(stages=["0", "2"], exclude="2")
    assert cb.exclude == ["2"]
