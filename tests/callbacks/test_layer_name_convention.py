"""One layer-naming convention for every layer-selection rule: names relative to the
network (the LightningModule's ``model``), as QAT's ``quant.include`` always had, also in
callbacks that select from the LightningModule (Hessian, iPQ, Quant-Noise, VQ, INQ, Deep
Compression). The old ``model\\.``-prefixed form selects the same layers with a FutureWarning
that says what to write."""

from __future__ import annotations

import json
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.hessian_sensitivity import HessianSensitivity
from qtrain.callbacks.ipq import network_order_stages
from qtrain.callbacks.qat import QATCallback
from qtrain.nn.convert import LayerSelectionError, convert, select_modules
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.torch_threads import one_thread  # noqa: F401 - autouse fixture

NET_LAYERS = ["0", "3", "5"]  # the network's Linear layers


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 32),
                         nn.Tanh(), nn.Linear(32, 4))


class Wrapped(pl.LightningModule):
    """A LightningModule holding the network as ``model`` (as qtrain's TaskModule)."""

    def __init__(self, fake_quant=True):
        super().__init__()
        self.model = _net()
        if fake_quant:
            convert(self.model, lambda n, m: FAKE_QUANT_TYPES[type(m)].from_float(
                m, UniformQuantizer(8, granularity="channel")))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_select_from_lightning_module_uses_network_relative_names():
    m = Wrapped(fake_quant=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the relative form does not warn
        got = select_modules(m, [r"[03]"], exclude=["3"])
    assert list(got) == ["model.0"]  # callers still get the LightningModule's names
    assert got["model.0"] is m.model[0]
    # the same rule selects the same layers from the network (how QAT selects)
    assert list(select_modules(m.model, [r"[03]"], exclude=["3"])) == ["0"]
    with pytest.raises(LayerSelectionError, match=r"'model' matches no .*named like: 0, 3, 5"):
        select_modules(m, ["model"])


def test_old_prefixed_form_warns_with_the_rule_to_write_and_selects_the_same():
    m = Wrapped(fake_quant=False)
    with pytest.warns(FutureWarning, match=r"vq\.exclude: pattern 'model\\\\.5'.*write '5'"):
        old = select_modules(m, ".*", exclude=[r"model\.5"], key="vq")
    assert list(old) == list(select_modules(m, ".*", exclude=["5"])) == ["model.0", "model.3"]


def test_qat_and_hessian_read_one_rule_the_same_way():
    rule = {"include": [".*"], "exclude": ["5"]}
    qat_model = _net()
    qat = QATCallback(weight=UniformQuantizer, bits=8, first_last="quantize", **rule)
    assert sorted(qat.convert(qat_model)) == ["0", "3"]
    cb = HessianSensitivity(method="hawq_v2", average_bits=4.0, **rule)
    assert sorted(cb.layers(Wrapped())) == ["0", "3"]


def test_ipq_network_order_stages_are_relative_and_select_without_warning():
    m = Wrapped(fake_quant=False)
    stages = network_order_stages(m, exclude=["5"])
    assert stages == [["0"], ["3"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_modules(m, stages[1])) == ["model.3"]
    # the old prefixed exclude keeps excluding the same layer (with the FutureWarning), as in
    # select_modules: before, the stages kept it and select_modules dropped it -> an empty
    # stage (LayerSelectionError in recipe ipq_resnet50_imagenet's smoke run)
    with pytest.warns(FutureWarning, match="write '5'"):
        assert network_order_stages(m, exclude=["model\\.5"]) == stages


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1)) % 4), batch_size=16)


def test_hessian_callback_real_run_relative_rules_ties_and_report(tmp_path):
    model = Wrapped()
    cb = HessianSensitivity(method="hawq_v2", num_batches=2, average_bits=4.0,
                            bit_choices=(2, 4, 8), exclude=["0"], ties=[["3", "5"]],
                            min_iter=2, max_iter=4, tol=10.0, seed=0)
    t = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                   callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=tmp_path)
    t.fit(model, _loader())
    assert sorted(cb.bits) == ["3", "5"] and cb.bits["3"] == cb.bits["5"]
    for n, b in cb.bits.items():
        assert model.model.get_submodule(n).weight_quantizer.bits == b
    assert model.model[0].weight_quantizer.bits == 8  # excluded: untouched
    rows = json.loads((tmp_path / "hessian_sensitivity.json").read_text())["layers"]
    assert [r["layer"] for r in rows] == ["3", "5"]


def test_hessian_old_prefixed_rules_and_checkpoint_names_still_work():
    model = Wrapped()
    cb = HessianSensitivity(method="hawq_v2", average_bits=4.0, exclude=[r"model\.0"],
                            ties=[[r"model\.3", "5"]])
    with pytest.warns(FutureWarning, match=r"hessian\.exclude.*write '0'"):
        names = list(cb.layers(model))
    assert names == ["3", "5"]
    with pytest.warns(FutureWarning, match=r"hessian\.ties.*write '3'"):
        assert cb._ties(names, "model.") == [["3", "5"]]
    # state saved before the names became relative: {'model.3': 2, ...}
    cb.load_state_dict({"bits": {"model.3": 2, "model.5": 4}, "done": True,
                        "rows": [{"layer": "model.3"}, {"layer": "model.5"}]})
    cb.on_train_start(None, model)
    assert cb.bits == {"3": 2, "5": 4} and [r["layer"] for r in cb.rows] == ["3", "5"]
    assert model.model[3].weight_quantizer.bits == 2 and model.model[5].weight_quantizer.bits == 4
