"""2-process CPU DDP (gloo): val_loss is the mean over both ranks' validation batches on every
rank (sync_dist), as torchmetrics already makes val_acc -- not each rank's own shard."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.modules.classification import ImageClassifier


class _Dump(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_validation_epoch_end(self, trainer, pl_module):
        torch.save({k: float(v) for k, v in trainer.callback_metrics.items()},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    x[8:] *= 10  # the second half (rank 1's shard under DistributedSampler) has a larger loss
    return TensorDataset(x, torch.randint(0, 3, (16,), generator=g))


@pytest.mark.slow  # spawns 2 processes: ~15 s CPU on 2 idle cores
def test_val_loss_is_the_global_mean_on_both_ranks(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(nn.Linear(4, 3), num_classes=3)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(module.model.state_dict())
    ds = _data()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                         limit_train_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_Dump(str(tmp_path))])
    # shuffle=False: DistributedSampler gives rank r the samples r, r+2, ...; batch 4: 2 batches each
    trainer.validate(module, DataLoader(ds, batch_size=4, shuffle=False))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    with torch.no_grad():
        x, y = ds.tensors
        want = nn.functional.cross_entropy(ref(x), y).item()  # equal batch sizes: mean of all
        own0 = nn.functional.cross_entropy(ref(x[0::2]), y[0::2]).item()
    assert abs(own0 - want) > 1e-3  # the shards differ, so an unsynced loss would show it
    assert r0["val_loss"] == pytest.approx(want, rel=1e-5)
    assert r1["val_loss"] == pytest.approx(want, rel=1e-5)
    assert r0["val_acc"] == r1["val_acc"]
