"""PolinoResortCallback: sorted points with permuted optimizer state; a real fit of
differentiable quantization + Polino distillation trains only the points."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks.distillation import DistillationCallback
from qtrain.callbacks.polino import PolinoResortCallback
from qtrain.callbacks.qat import QATCallback
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.learned_quantizers import PolinoDifferentiableQuantizer


def test_resort_permutes_points_and_optimizer_state():
    q = PolinoDifferentiableQuantizer(2)
    holder = nn.ModuleList([q])
    w = torch.randn(50, generator=torch.Generator().manual_seed(0))
    q(w)  # initialise at quantiles
    with torch.no_grad():
        q.points.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    before = q(w).clone()
    opt = torch.optim.Adam([q.points], lr=0.1)
    opt.state[q.points] = {"step": torch.tensor(3.0), "exp_avg": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                           "exp_avg_sq": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    assert PolinoResortCallback.resort(holder, [opt]) == 1
    assert q.points.tolist() == [-1.0, 0.0, 0.5, 2.0]
    assert opt.state[q.points]["exp_avg"].tolist() == [2.0, 4.0, 1.0, 3.0]
    assert opt.state[q.points]["exp_avg_sq"].tolist() == [20.0, 40.0, 10.0, 30.0]
    assert opt.state[q.points]["step"].item() == 3.0
    assert torch.equal(q(w), before)  # nearest-point quantization is order-free
    assert PolinoResortCallback.resort(holder, [opt]) == 0


def test_setup_without_polino_quantizer_raises():
    module = ImageClassifier(nn.Linear(3, 3), num_classes=3)
    with pytest.raises(ValueError, match="no PolinoDifferentiableQuantizer"):
        PolinoResortCallback().setup(None, module, "fit")


def test_differentiable_quantization_fit_trains_points_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    w_before = [model[1].weight.clone(), model[3].weight.clone()]
    module = ImageClassifier(model, num_classes=3,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=0.1))
    qat = QATCallback(bits=2, weight=functools.partial(PolinoDifferentiableQuantizer), first_last="quantize")
    sorted_after_step, snapshots = [], []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            ps = [m.points for m in pl_module.modules() if isinstance(m, PolinoDifferentiableQuantizer)]
            sorted_after_step.append(all(bool((p[1:] >= p[:-1]).all()) for p in ps))
            snapshots.append([p.detach().clone() for p in ps])

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    tr = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[qat, DistillationCallback(teacher=teacher, loss="polino"),
                               PolinoResortCallback(), Check()])
    tr.fit(module, torch.utils.data.DataLoader(ds, batch_size=8))
    assert sorted_after_step == [True] * 4
    # float weights get no gradient (only the points are learned), so SGD leaves them alone
    assert torch.equal(model[1].weight, w_before[0]) and torch.equal(model[3].weight, w_before[1])
    first, last = snapshots[0], snapshots[-1]
    assert len(first) == 2 and all(not torch.equal(a, b) for a, b in zip(first, last))
