"""LayerReportCallback with a real pl.Trainer (fake images, CPU, seconds): 2-bit uniform QAT
(CSV error vs a numpy hand computation, bits per weight vs the storage accounting, at most 4
quantized values in the TensorBoard histogram read back with EventAccumulator, training
unchanged by the report) and INQ (one CSV per stage, the stage's error by hand)."""

import csv
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.callbacks.inq import INQCallback
from qtrain.callbacks.layer_report import LayerReportCallback, level_edges
from qtrain.callbacks.qat import QATCallback
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.callbacks.tiny_lightning import image_loader, trainer


class Net(pl.LightningModule):
    """A task-module-like wrapper (``.model``, ``metric``) around a tiny CNN."""

    metric = "acc"

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(8 * 4 * 4, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def rows_of(path):
    return {r["layer"]: r for r in csv.DictReader(open(path))}


def hand_2bit(w: np.ndarray) -> np.ndarray:
    s = np.abs(w).max() / 1.5  # symmetric 2-bit per tensor: codes -2..1
    return np.clip(np.round(w / s), -2, 1) * s


def qat_fit(tmp_path, enabled=True, png=True):
    pl.seed_everything(0)
    net = Net()
    qat = QATCallback(bits=2, weight=partial(UniformQuantizer, symmetric=True,
                                             granularity="tensor"), first_last="quantize")
    rep = LayerReportCallback(enabled=enabled, hist_max_weights=100, png=png)
    from pytorch_lightning.loggers import TensorBoardLogger

    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version=0)
    trainer(max_epochs=2, callbacks=[qat, rep], logger=tb, default_root_dir=str(tmp_path)).fit(
        net, image_loader(n=32, batch=8))
    return net, rep


def test_qat_report_csv_histograms_and_tensorboard(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    net, rep = qat_fit(tmp_path)
    for f in ("layer_report_start.csv", "layer_report.csv", "layer_report.png",
              "layer_report_start.png", "weight_histograms.png", "weight_histograms_start.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    end = rows_of(tmp_path / "layer_report.csv")
    assert set(end) == {"model.0", "model.2", "model.5"}
    for name, r in end.items():
        m = net.get_submodule(name)
        w = m.weight.detach().numpy().astype(np.float64)
        q = hand_2bit(w)
        assert float(r["rel_error"]) == pytest.approx(np.linalg.norm(q - w) / np.linalg.norm(w),
                                                      rel=1e-5), name
        n = w.size
        bias = m.bias.numel()
        # storage accounting by hand: 2-bit codes + one fp32 scale + fp32 bias
        assert float(r["bits_per_weight"]) == pytest.approx((2 * n + 32 + 32 * bias) / n), name
        assert int(r["levels"]) <= 4 and r["method"] == "UniformQuantizer"
    # the start report saw the initial weights: different from the end
    start = rows_of(tmp_path / "layer_report_start.csv")
    assert start["model.5"]["rel_error"] != end["model.5"]["rel_error"]
    # TensorBoard: the table, scalars and histograms; <= 4 non-empty buckets of the
    # quantized histogram of a 2-bit layer (a no-op quantizer gives ~100)
    acc = ea.EventAccumulator(str(tmp_path / "tb" / "version_0"),
                              size_guidance={ea.HISTOGRAMS: 0, ea.TENSORS: 0, ea.IMAGES: 0})
    acc.Reload()
    hists = acc.Tags()["histograms"]
    for name in end:
        assert f"weights/{name}/float" in hists
        last = acc.Histograms(f"weights/{name}/quantized")[-1]
        filled = [c for c in last.histogram_value.bucket if c > 0]
        assert 2 <= len(filled) <= 4, (name, filled)
        fl = acc.Histograms(f"weights/{name}/float")[-1]
        assert fl.histogram_value.num == min(100, net.get_submodule(name).weight.numel())
    assert "layer_report/bits_per_weight/model.5" in acc.Tags()["scalars"]
    assert any(t.startswith("layer_report/end") for t in acc.Tags()["tensors"])  # text
    # both figures of both events as TensorBoard images: the PNG files' bytes, their size
    from PIL import Image

    for fig in ("layer_report", "weight_histograms"):
        for event, suffix in (("start", "_start"), ("end", "")):
            img = acc.Images(f"{fig}/{event}")[-1]
            png = tmp_path / f"{fig}{suffix}.png"
            assert img.encoded_image_string == png.read_bytes(), (fig, event)
            assert (img.width, img.height) == Image.open(png).size


def test_report_does_not_change_training(tmp_path):
    """Same seed with the report on and off: bitwise the same final weights (the report
    draws no global random number and changes no quantizer state)."""
    on, rep = qat_fit(tmp_path / "on", enabled=True, png=False)
    off, _ = qat_fit(tmp_path / "off", enabled=False)
    assert set(rep.reports) == {"start", "end"}
    assert not list((tmp_path / "off").glob("layer_report*"))
    for (k, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items()):
        assert torch.equal(a, b), k


class _AfterStage(pl.Callback):
    """Weights right after INQ's stage 1 (INQ runs first in on_train_batch_start)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.w1 = {n: m.weight.detach().clone() for n, m in pl_module.named_modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_inq_writes_one_report_per_stage(tmp_path):
    pl.seed_everything(0)
    net = Net()
    w0 = {n: m.weight.detach().clone() for n, m in net.named_modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))}
    inq = INQCallback(bits=3, schedule=[0.5, 1.0], boundaries=[0, 2], unit="step")
    probe, rep = _AfterStage(), LayerReportCallback(hist_max_layers=2, png=False)
    trainer(max_steps=4, callbacks=[inq, probe, rep], default_root_dir=str(tmp_path)).fit(
        net, image_loader(n=32, batch=8))
    names = sorted(p.name for p in tmp_path.glob("layer_report*.csv"))
    # no start report: INQ quantizes nothing before its first stage
    assert names == ["layer_report.csv", "layer_report_inq_stage1.csv",
                     "layer_report_inq_stage2.csv"]
    s1 = rows_of(tmp_path / "layer_report_inq_stage1.csv")
    assert set(s1) == set(w0)
    for n, r in s1.items():
        # stage 1 ran before any optimizer step: W = initial weights, Q(W) = after stage 1
        expect = float((probe.w1[n] - w0[n]).norm() / w0[n].norm())
        assert float(r["rel_error"]) == pytest.approx(expect, rel=1e-5), n
        assert r["method"] == "INQ (in place)" and r["bits"] == "3"
        assert r["reference"] == "before inq_stage1"
    end = rows_of(tmp_path / "layer_report.csv")
    for r in end.values():  # converted at the end: power-of-two layers, 3-bit levels
        assert r["method"] == "PowerOfTwoQuantizer" and int(r["levels"]) <= 2**3
        assert r["reference"] == "before inq_stage2"


def test_level_edges_put_each_level_in_its_own_bin():
    lv = np.array([-0.5, 0.0, 0.25, 1.0])
    counts, _ = np.histogram(np.repeat(lv, [1, 2, 3, 4]), bins=level_edges(lv))
    assert counts.tolist() == [1, 2, 3, 4]


def test_bad_config_is_one_clear_error():
    from qtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="hist_max_weights"):
        LayerReportCallback(hist_max_weights=0)


def test_default_callbacks_config_has_the_report(tmp_path):
    """conf/callbacks/default.yaml composes it (on by default) and its keys switch it off."""
    from hydra.utils import instantiate

    from tests.hydra_helpers import compose_cfg

    cfg = compose_cfg(["callbacks.layer_report.enabled=false",
                       "callbacks.layer_report.hist_max_layers=3"], tmp_path)
    cb = instantiate(cfg.callbacks.layer_report)
    assert isinstance(cb, LayerReportCallback) and not cb.enabled and cb.hist_max_layers == 3
    assert compose_cfg([], tmp_path).callbacks.layer_report.enabled is True


def test_hawq_bits_and_sensitivity_reach_the_report(tmp_path):
    """HAWQ-V2 announces its allocation: the report after it has the chosen bits and the
    callback's own per-layer sensitivity / curvature (its table), and so does the end one."""
    from qtrain.callbacks.hessian_sensitivity import HessianSensitivity
    from tests.callbacks.test_hessian_sensitivity_callback import Tiny, loader

    model = Tiny()
    hs = HessianSensitivity(method="hawq_v2", num_batches=2, average_bits=3.5,
                            bit_choices=(2, 4, 8), tol=0.5, min_iter=2, max_iter=6, seed=0, mode="train")
    rep = LayerReportCallback(png=False, histograms=False)
    trainer(max_epochs=1, callbacks=[hs, rep], default_root_dir=str(tmp_path)).fit(
        model, loader())
    for f in ("layer_report_hessiansensitivity_bits.csv", "layer_report.csv"):
        rows = rows_of(tmp_path / f)
        assert set(rows) == set(hs.bits)
        for r in hs.rows:
            got = rows[r["layer"]]
            assert int(got["bits"]) == hs.bits[r["layer"]]
            assert float(got["sensitivity"]) == pytest.approx(r["sensitivity"], rel=1e-9)
            assert float(got["curvature"]) == pytest.approx(r["curvature"], rel=1e-9)


@pytest.mark.slow  # a wandb service process: ~10 s CPU
def test_wandb_offline_run_has_table_images_and_histograms(tmp_path, monkeypatch):
    """A real offline wandb run: the table file wandb wrote equals the CSV, both images are
    in the run's media, the histogram keys are in its .wandb log."""
    import json

    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    pl.seed_everything(0)
    qat = QATCallback(bits=2, weight=partial(UniformQuantizer, symmetric=True,
                                             granularity="tensor"), first_last="quantize")
    lg = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    trainer(max_epochs=1, callbacks=[qat, LayerReportCallback(hist_max_weights=100)], logger=lg,
            default_root_dir=str(tmp_path / "run")).fit(Net(), image_loader(n=32, batch=8))
    wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run / "files" / "media" / "table" / "layer_report").glob("end_*.table.json")
    t = json.loads(table.read_text())
    csv_rows = rows_of(tmp_path / "run" / "layer_report.csv")
    assert t["columns"][:3] == ["layer", "method", "format"] and len(t["data"]) == 3
    for row in t["data"]:
        r = dict(zip(t["columns"], row))
        assert r["rel_error"] == pytest.approx(float(csv_rows[r["layer"]]["rel_error"]))
    media = {p.parent.name for p in (run / "files" / "media" / "images").rglob("*.png")}
    assert media == {"layer_report", "weight_histograms"}
    log = next(run.glob("*.wandb")).read_bytes()
    assert b"weights/model.5/quantized" in log and b"weights/model.5/float" in log
