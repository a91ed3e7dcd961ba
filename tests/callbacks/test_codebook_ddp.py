"""2-process CPU DDP (gloo): iPQ codebooks and INQ masks end identical on both ranks."""

import pytest
import pytorch_lightning as pl
import torch

from qtrain.callbacks.inq import INQCallback
from qtrain.callbacks.ipq import IterativePQCallback
from tests.callbacks.tiny_lightning import TinyTransformerish, token_loader, trainer


class _Dump(pl.Callback):
    def __init__(self, out_dir, inq):
        self.out_dir, self.inq = out_dir, inq

    def on_train_end(self, trainer, pl_module):
        state = {f"{n}.{k}": v.detach().cpu() for n, m in pl_module.named_modules()
                 for k, v in (("centroids", getattr(m, "centroids", None)),
                              ("assignments", getattr(m, "assignments", None))) if v is not None}
        state.update({f"mask.{n}": m.cpu() for n, m in self.inq.masks.items()})
        state.update({f"param.{n}": p.detach().cpu() for n, p in pl_module.named_parameters()})
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.slow  # ~35 s CPU on 2 idle cores (spawns 2 processes); 75 s on a loaded box
def test_two_process_ddp_identical_codebooks_and_masks(tmp_path):
    pl.seed_everything(0)
    model = TinyTransformerish()
    ipq = IterativePQCallback(stages=[[r"fc1", r"fc2"], [r"embed_tokens"]], n_centroids=16,
                              n_iter=5, unit="step", boundaries=[1, 3])
    inq = INQCallback(schedule=[0.5, 1.0], strategy="random", include=["q_proj", "out_proj"],
                      boundaries=[0, 2], unit="step", seed=7)
    tr = trainer(max_steps=5, accelerator="cpu", devices=2, strategy="ddp_spawn",
                 callbacks=[ipq, inq, _Dump(str(tmp_path), inq)])
    tr.fit(model, token_loader(n=32, batch=4))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    assert {"fc1.centroids", "fc2.assignments", "embed_tokens.centroids", "mask.q_proj"} <= set(r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert bool(r0["mask.q_proj"].all())
