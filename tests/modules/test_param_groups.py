"""Weight decay: the network's weights are decayed, learned quantizer parameters are not
(PACT alpha keeps its own L2 term); the groups survive callbacks that rebuild the optimizer."""

import functools

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrain.callbacks.optimizer_hooks import rebuild_optimizers
from qtrain.callbacks.qat import QATCallback
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.format_quantizers import TTQQuantizer
from qtrain.nn.learned_quantizers import DSQQuantizer, LSQQuantizer, PACTQuantizer

LR, WD, L2 = 0.5, 0.1, 0.01


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _module(weight, act, bits=4):
    model = _net()
    QATCallback(bits=bits, act_bits=4, weight=weight, act=act, first_last="quantize").convert(model)
    return ImageClassifier(model, num_classes=3,
                           optimizer=functools.partial(torch.optim.SGD, lr=LR, weight_decay=WD))


def _quant_params(module):
    # by name only to *check* (the code under test finds them structurally)
    return {n: p for n, p in module.named_parameters() if "quantizer" in n}


def _step_with_zero_grads(module):
    opt = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


def _check_decay(module):
    quant = _quant_params(module)
    assert quant, "the model holds learned quantizer parameters"
    before = _step_with_zero_grads(module)
    for n, p in module.named_parameters():
        if n in quant:  # zero gradient, no decay: unchanged
            assert torch.equal(p.detach(), before[n]), n
        else:  # SGD weight decay by hand: p <- p - lr * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - LR * WD), rtol=0, atol=1e-7)


def test_lsq_and_pact_params_not_decayed_weights_decayed():
    _check_decay(_module(functools.partial(LSQQuantizer, signed=True, role="weight"),
                         functools.partial(PACTQuantizer, alpha_init=6.0, l2_decay=L2)))


def test_dsq_and_ttq_params_not_decayed():
    _check_decay(_module(functools.partial(TTQQuantizer, init_scale=1.0),
                         functools.partial(DSQQuantizer, lower=0.0, upper=4.0), bits=2))


def test_pact_own_l2_term_still_applies():
    module = _module(None, functools.partial(PACTQuantizer, alpha_init=6.0, l2_decay=L2))
    opt = module.configure_optimizers()
    opt.zero_grad()
    module.regularization().backward()  # sum over layers of lambda * alpha^2
    opt.step()
    for n, p in _quant_params(module).items():
        # d(lambda alpha^2)/d alpha = 2 lambda alpha; no weight decay on top
        assert p.item() == torch.tensor(6.0 - LR * 2 * L2 * 6.0).item(), n


def test_groups_kept_when_a_callback_rebuilds_the_optimizer():
    class Rebuild(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                old = trainer.optimizers[0]
                rebuild_optimizers(trainer)
                assert trainer.optimizers[0] is not old
            groups = trainer.optimizers[0].param_groups
            quant = {id(p) for p in _quant_params(pl_module).values()}
            self.seen.append([(g["weight_decay"], {id(p) for p in g["params"]} <= quant)
                              for g in groups])

    module = _module(functools.partial(LSQQuantizer, signed=True, role="weight"),
                     functools.partial(PACTQuantizer, alpha_init=6.0, l2_decay=L2))
    ds = TensorDataset(torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,)))
    cb = Rebuild()
    pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(
        module, DataLoader(ds, batch_size=4))
    assert len(cb.seen) == 3
    for groups in cb.seen:  # before and after the rebuild: decayed weights, undecayed quantizers
        assert groups == [(WD, False), (0.0, True)]
