"""2-process CPU DDP (gloo, ddp_spawn): HessianSensitivity analyses once, on rank 0's shard,
and both ranks end with the same table, bits and quantizer settings; one report file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler, Subset

from qtrain.callbacks.hessian_sensitivity import HessianSensitivity, default_loss
from qtrain.hessian.sensitivity import SensitivityConfig, analyze
from tests.callbacks.test_hessian_sensitivity_callback import LAYERS, Tiny, loader

OPTS = dict(method="hawq_v2", average_bits=3.5, bit_choices=(2, 4, 8), tol=0.3, max_iter=40,
            seed=0, mode="eval")


class CountingLoss:
    """The callback's loss_fn: counts its calls in this process (pickled into each rank)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, batch):
        self.calls += 1
        return default_loss(module, batch)


class Dump(pl.Callback):
    def __init__(self, out_dir, hs):
        self.out_dir, self.hs = out_dir, hs

    def on_train_end(self, trainer, pl_module):
        layers = {}
        for n in LAYERS:
            m = pl_module.get_submodule(n)
            q = m.weight_quantizer
            layers[n] = {"bits": q.bits, "enabled": q.enabled, "repr": repr(q),
                         "state": {k: v.cpu() for k, v in q.state_dict().items()},
                         "wq": m.quantized_weight().detach().cpu()}
        torch.save({"bits": self.hs.bits, "rows": self.hs.rows, "done": self.hs.done,
                    "loss_calls": self.hs.loss_fn.calls, "layers": layers},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def shard_analysis(rank: int) -> tuple[list[dict], dict]:
    """Single-process reference: the analysis on the first 2 batches of 16 of one rank's
    shard; Lightning gives a DDP train loader DistributedSampler(shuffle=True, seed=0)."""
    model = Tiny()
    for q in (m.weight_quantizer for n, m in model.named_modules() if n in LAYERS):
        q.enabled = False
    ds = loader().dataset
    idx = list(DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0))
    batches = list(DataLoader(Subset(ds, idx), batch_size=16))[:2]
    return analyze(model, LAYERS, batches, default_loss, SensitivityConfig(**OPTS))


@pytest.mark.slow  # ~30 s CPU on 2 cores (spawns 2 processes)
@pytest.mark.filterwarnings("ignore:Hutchinson traces did not reach")
def test_two_process_ddp_same_bits_one_analysis_one_report(tmp_path):
    pl.seed_everything(0)
    model = Tiny()
    hs = HessianSensitivity(num_batches=2, loss_fn=CountingLoss(), **OPTS)
    tr = pl.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
                    logger=CSVLogger(tmp_path), callbacks=[hs, Dump(str(tmp_path), hs)],
                    enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    tr.fit(model, loader())
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # analysed once: rank 0 evaluated the loss, rank 1 never did
    assert r0["loss_calls"] > 0 and r1["loss_calls"] == 0
    assert r0["done"] and r1["done"]
    assert r0["rows"] == r1["rows"] and r0["bits"] == r1["bits"]
    assert set(r0["bits"]) == set(LAYERS) and len(set(r0["bits"].values())) > 1
    for n in LAYERS:
        a, b = r0["layers"][n], r1["layers"][n]
        assert a["bits"] == b["bits"] == r0["bits"][n]
        assert a["enabled"] and b["enabled"] and a["repr"] == b["repr"]
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (n, k)
        assert torch.equal(a["wq"], b["wq"]), n
    # the broadcast table is the analysis of rank 0's shard, not rank 1's (which differs)
    rows0, bits0 = shard_analysis(0)
    rows1, bits1 = shard_analysis(1)
    assert bits0 == r0["bits"] and bits1 != bits0  # per-rank analyses would disagree
    got = [r["sensitivity"] for r in r0["rows"]]
    torch.testing.assert_close(got, [r["sensitivity"] for r in rows0], rtol=1e-5, atol=0)
    # one report, written by rank 0, holding the broadcast bits
    reports = list(tmp_path.rglob("hessian_sensitivity.json"))
    assert len(reports) == 1
    assert len(list(tmp_path.rglob("hessian_sensitivity.csv"))) == 1
    data = json.loads(reports[0].read_text())
    assert {r["layer"]: r["bits"] for r in data["layers"]} == r0["bits"]


def test_sync_batchnorm_in_train_mode_under_ddp_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SyncBatchNorm(4))
    two = SimpleNamespace(world_size=2)
    HessianSensitivity(average_bits=4.0, mode="eval")._check_sync_bn(two, model)
    HessianSensitivity(average_bits=4.0, mode="train")._check_sync_bn(
        SimpleNamespace(world_size=1), model)
    for mode in ("train", "keep"):
        with pytest.raises(ValueError, match=f"mode='{mode}' with SyncBatchNorm"):
            HessianSensitivity(average_bits=4.0, mode=mode)._check_sync_bn(two, model)
