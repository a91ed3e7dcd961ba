"""DistillationCallback: hand-computed losses, frozen teacher over a real fit, scheme A,
teacher loading, no teacher autograd graph / no batch copy, bad input."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.callbacks.distillation import (
    DistillationCallback,
    kl_teacher_student,
    load_float_weights,
    load_state,
)
from qtrain.callbacks.qat import QATCallback
from qtrain.errors import ConfigError
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.uniform_quantizer import UniformQuantizer
from tests.hydra_helpers import compose_cfg

ZS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
ZT = [[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
Y = [1, 2]


# -- hand formulas (plain Python floats) ---------------------------------------------------
def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ce(z, y):
    return -math.log(softmax(z)[y])


def hand_apprentice(a, b, g, tau):
    n = len(Y)
    h_t = sum(ce(ZT[i], Y[i]) for i in range(n)) / n
    h_s = sum(ce(ZS[i], Y[i]) for i in range(n)) / n
    soft = sum(-sum(pt * math.log(ps) for pt, ps in zip(softmax(ZT[i], tau), softmax(ZS[i], tau)))
               for i in range(n)) / n
    return a * h_t + b * h_s + g * soft


def hand_polino(w, t, per_sample=False):
    """Polino's loss as the authors' code computes it: 0.7 T^2 KLDivLoss() (PyTorch's default
    element-wise mean over N x C) + 0.3 CE; ``per_sample``: the KL divided by N only."""
    n, c = len(Y), len(ZS[0])
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ZT[i], t), softmax(ZS[i], t)))
             for i in range(n)) / (n if per_sample else n * c)
    return w * t * t * kl + (1 - w) * sum(ce(ZS[i], Y[i]) for i in range(n)) / n


class Fixed(nn.Module):
    """Returns stored logits (a parameter) whatever the input."""

    def __init__(self, z):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(z))

    def forward(self, x):
        return self.z + 0 * x.sum()


def run_hook(cb, scheme_a=False):
    student = Fixed(ZS)
    module = ImageClassifier(student, num_classes=3)
    x, y = torch.zeros(2, 3), torch.tensor(Y)
    if scheme_a:
        module.teacher = cb.build_teacher()
    else:
        cb.teacher = cb._freeze(cb.build_teacher())
    out = module(x)
    loss = module.task_loss(out, y)
    return cb.loss_hook(module, (x, y), out, loss), module


@pytest.mark.parametrize("a,b,g,tau", [(1.0, 0.5, 0.5, 1.0), (0.3, 1.0, 2.0, 3.0)])
def test_apprentice_loss_hand_computed(a, b, g, tau):
    cb = DistillationCallback(teacher=Fixed(ZT), scheme="B", alpha=a, beta=b, gamma=g, temperature=tau)
    total, _ = run_hook(cb)
    assert total.item() == pytest.approx(hand_apprentice(a, b, g, tau), rel=1e-6)


def test_polino_loss_hand_computed():
    cb = DistillationCallback(teacher=Fixed(ZT), loss="polino")
    assert cb.temperature == 2.0 and cb.kd_weight == 0.7 and cb.kl_reduction == "mean"
    total, _ = run_hook(cb)
    assert total.item() == pytest.approx(hand_polino(0.7, 2.0), rel=1e-6)
    cb = DistillationCallback(teacher=Fixed(ZT), loss="polino", kl_reduction="batchmean")
    total, _ = run_hook(cb)
    assert total.item() == pytest.approx(hand_polino(0.7, 2.0, per_sample=True), rel=1e-6)


@pytest.mark.parametrize("c", [10, 100])
def test_polino_kl_scale_matches_authors_code_numpy(c):
    """The authors' code (antspy/quantized_distillation, cnn_models/help_fun.py):
    0.7 T^2 nn.KLDivLoss()(log_softmax(z_S/T), softmax(z_T/T)) + 0.3 CE, PyTorch's default
    element-wise mean over N x C. Worked in numpy (float64), plus the PyTorch built-in, and
    the gradient w.r.t. the student logits."""
    n, t, w = 16, 2.0, 0.7
    rng = np.random.default_rng(c)
    zs, zt = rng.normal(size=(n, c)) * 3, rng.normal(size=(n, c)) * 3
    y = rng.integers(0, c, size=n)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ls, lt = log_softmax(zs / t), log_softmax(zt / t)
    kl_elem = np.exp(lt) * (lt - ls)  # KLDivLoss(input=log p_S, target=p_T), element-wise
    ce_np = -log_softmax(zs)[np.arange(n), y].mean()
    ref = w * t * t * kl_elem.mean() + (1 - w) * ce_np
    zs_t = torch.tensor(zs, dtype=torch.float32, requires_grad=True)
    zt_t = torch.tensor(zt, dtype=torch.float32)
    cb = DistillationCallback(teacher=nn.Identity(), loss="polino")
    module = ImageClassifier(nn.Identity(), num_classes=c)
    cb.teacher = cb._freeze(cb.build_teacher())
    ce_t = module.task_loss(zs_t, torch.tensor(y))
    got = cb.loss_hook(module, (zt_t, torch.tensor(y)), zs_t, ce_t)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    builtin = w * t * t * nn.KLDivLoss()(F.log_softmax(zs_t / t, 1), F.softmax(zt_t / t, 1)) \
        + (1 - w) * ce_t
    assert got.item() == pytest.approx(builtin.item(), rel=1e-5)
    # gradient of the KL term: w T^2 (p_S - p_T) / (T N C)
    got.backward()
    g_ce = (np.exp(log_softmax(zs)) - np.eye(c)[y]) / n
    g_ref = w * t * (np.exp(ls) - np.exp(lt)) / (n * c) + (1 - w) * g_ce
    np.testing.assert_allclose(zs_t.grad.numpy(), g_ref, rtol=1e-4, atol=1e-8)
    # batchmean (named option) is exactly C times the KL term
    kl_bm = kl_teacher_student(zs_t, zt_t, t, "batchmean")
    assert kl_bm.item() == pytest.approx(c * kl_elem.mean(), rel=1e-5)


@pytest.mark.parametrize("kd_to_teacher", [False, True])
def test_scheme_a_teacher_gradient(kd_to_teacher):
    a, b, g = 1.0, 0.5, 0.5
    cb = DistillationCallback(teacher=Fixed(ZT), scheme="A", alpha=a, beta=b, gamma=g,
                              kd_to_teacher=kd_to_teacher)
    total, module = run_hook(cb, scheme_a=True)
    assert total.item() == pytest.approx(hand_apprentice(a, b, g, 1.0), rel=1e-6)
    total.backward()
    # d alpha*CE(z_T, y)/dz_T = alpha (softmax(z_T) - onehot(y)) / N
    ref = torch.tensor([[a * (p - (c == Y[i])) / 2 for c, p in enumerate(softmax(ZT[i]))]
                        for i in range(2)])
    grad = module.teacher.z.grad
    if kd_to_teacher:
        assert not torch.allclose(grad, ref, atol=1e-4)
    else:
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-6)


def test_teacher_shape_mismatch_raises():
    cb = DistillationCallback(teacher=Fixed([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match=r"teacher output shape \(2, 2\).*student's \(2, 3\)"):
        run_hook(cb)


@pytest.mark.parametrize("kw,match", [
    (dict(teacher=None), "exactly one"),
    (dict(teacher=nn.Linear(2, 2), teacher_pretrained="x"), "exactly one"),
    (dict(teacher=nn.Linear(2, 2), scheme="D"), "scheme"),
    (dict(teacher=nn.Linear(2, 2), loss="hinton"), "loss"),
    (dict(teacher=nn.Linear(2, 2), scheme="A", loss="polino"), "scheme=A"),
    (dict(teacher=nn.Linear(2, 2), kd_to_teacher=True), "kd_to_teacher"),
    (dict(teacher=nn.Linear(2, 2), temperature=0.0), "temperature"),
    (dict(teacher_pretrained="x", teacher_checkpoint="c.pt"), "teacher_checkpoint"),
    (dict(teacher=nn.Linear(2, 2), loss="polino", kl_reduction="sum"), "kl_reduction.*batchmean"),
    (dict(teacher=nn.Linear(2, 2), scheme="C"), "scheme=C.*student_checkpoint"),
])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        DistillationCallback(**kw)


def test_scheme_c_without_student_weights_stops_before_training(tmp_path):
    """Apprentice scheme C (Mishra & Marr 2018) starts from the trained FP student: the real
    recipe composed by Hydra with scheme=C and no FP student weights stops at instantiation
    with a ConfigError (it used to run scheme B silently); with FP student weights configured
    (student_checkpoint, or model.weights as in the ImageNet recipe) the callback builds."""
    from hydra.utils import instantiate

    from tests.hydra_helpers import run

    def config_error(e):  # Hydra wraps errors raised while instantiating: walk the chain
        while e is not None and not isinstance(e, ConfigError):
            e = e.__cause__ or e.__context__
        return e

    base = ["recipe=apprentice_resnet20_cifar10", "debug=smoke", "trainer.max_epochs=1",
            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "extra_callbacks.distillation.scheme=C",
            "extra_callbacks.distillation.allow_untrained_student=false"]
    with pytest.raises(Exception) as info:
        run(base, tmp_path / "bad")
    err = config_error(info.value)
    assert isinstance(err, ConfigError), info.value
    assert "distillation.scheme=C" in str(err) and "student_checkpoint" in str(err)
    assert not list((tmp_path / "bad").rglob("*.ckpt"))  # nothing trained
    # smoke runs keep working through allow_untrained_student=${model.tiny}
    cfg = compose_cfg(base[:-1], tmp_path / "smoke")
    assert cfg.extra_callbacks.distillation.allow_untrained_student is True
    assert cfg.extra_callbacks.distillation.student_pretrained is None
    cfg = compose_cfg(base + ["extra_callbacks.distillation.student_checkpoint=/x/fp.ckpt"],
                      tmp_path / "ok")
    assert instantiate(cfg.extra_callbacks.distillation).student_checkpoint == "/x/fp.ckpt"
    cfg = compose_cfg(["recipe=apprentice_resnet18_imagenet", "debug=smoke",
                       "extra_callbacks.distillation.allow_untrained_student=false"], tmp_path / "in")
    cb = instantiate(cfg.extra_callbacks.distillation)
    assert cb.scheme == "C" and cb.student_pretrained == "DEFAULT"


# -- real fits -------------------------------------------------------------------------------
def cnn(seed, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(width * 16, 3))


def loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 1, 4, 4, generator=g),
                                        torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def trainer(cbs, steps=4, tmp=None):
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, callbacks=cbs,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp)


def sgd():
    return functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=0.1)


def test_frozen_teacher_never_changes_in_fit(tmp_path):
    teacher = cnn(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = ImageClassifier(cnn(2), num_classes=3, optimizer=sgd())
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    seen = {}

    def t_hook(m, args, out):
        seen["t_in"], seen["t_grad"], seen["t_training"] = args[0], out.requires_grad, m.training
        seen["t_grad_mode"] = torch.is_grad_enabled()

    def s_hook(m, args, out):
        seen["s_in"] = args[0]

    teacher.register_forward_hook(t_hook)
    module.model.register_forward_hook(s_hook)
    cb = DistillationCallback(teacher=teacher, scheme="B")
    qat = QATCallback(bits=4, weight=functools.partial(UniformQuantizer), first_last="quantize")
    tr = trainer([qat, cb])
    tr.fit(module, loader())
    assert tr.global_step == 4
    after = teacher.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(module.model.state_dict()[k], v) for k, v in student_before.items())
    # the teacher ran in eval mode without an autograd graph, on the student's own input tensor
    assert seen["t_grad"] is False and seen["t_training"] is False and seen["t_grad_mode"] is False
    assert seen["t_in"] is seen["s_in"]
    # not in the optimizer, not in the checkpoint
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    tr.save_checkpoint(tmp_path / "s.ckpt")
    keys = torch.load(tmp_path / "s.ckpt", weights_only=True)["state_dict"].keys()
    assert not any(k.startswith("teacher") for k in keys)
    assert module.loss_hook is None  # removed at the end of fit


def test_scheme_a_teacher_trains_jointly(tmp_path):
    teacher = cnn(1)
    t_before = [p.clone() for p in teacher.parameters()]
    module = ImageClassifier(cnn(2), num_classes=3, optimizer=sgd())
    tr = trainer([DistillationCallback(teacher=teacher, scheme="A")])
    tr.fit(module, loader())
    assert module.teacher is teacher
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in teacher.parameters()} <= opt_params
    assert any(not torch.equal(a, b) for a, b in zip(teacher.parameters(), t_before))
    tr.save_checkpoint(tmp_path / "a.ckpt")
    # a scheme-A checkpoint provides a teacher for a later scheme-B run
    sd = load_state(str(tmp_path / "a.ckpt"), "teacher.")
    t2 = DistillationCallback(teacher=functools.partial(cnn, 7), teacher_checkpoint=str(tmp_path / "a.ckpt"),
                              teacher_checkpoint_prefix="teacher.").build_teacher()
    for k, v in t2.state_dict().items():
        assert torch.equal(v, sd[k]) and torch.equal(v, teacher.state_dict()[k])


def test_teacher_and_student_checkpoints(tmp_path):
    src = ImageClassifier(cnn(3), num_classes=3, optimizer=sgd())
    tr = trainer([], steps=1)
    tr.fit(src, loader())
    tr.save_checkpoint(tmp_path / "t.ckpt")
    torch.save(src.model.state_dict(), tmp_path / "t.pt")
    for path in ("t.ckpt", "t.pt"):
        t = DistillationCallback(teacher=functools.partial(cnn, 9),
                                 teacher_checkpoint=str(tmp_path / path)).build_teacher()
        for k, v in src.model.state_dict().items():
            assert torch.equal(t.state_dict()[k], v)
    bad = DistillationCallback(teacher=functools.partial(cnn, 9, 8), teacher_checkpoint=str(tmp_path / "t.pt"))
    with pytest.raises(ValueError, match="does not fit distillation.teacher"):
        bad.build_teacher()
    # scheme C: FP student weights loaded in setup, after QAT converted the layers
    module = ImageClassifier(cnn(4), num_classes=3, optimizer=sgd())
    cb = DistillationCallback(teacher=cnn(1), scheme="C", student_checkpoint=str(tmp_path / "t.ckpt"))
    qat = QATCallback(bits=4, weight=functools.partial(UniformQuantizer), first_last="quantize")
    seen = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer([qat, cb, Capture()], steps=1).fit(module, loader(8))
    assert type(module.model[5]).__name__ == "QuantLinear"
    for k, v in src.model.state_dict().items():
        assert torch.equal(seen[k], v), k
    with pytest.raises(ValueError, match="does not fit the model"):
        load_float_weights(cnn(0, 8), load_state(str(tmp_path / "t.ckpt")), "s")


def test_teacher_pretrained_transformers(tmp_path):
    from qtrain.models.hf import make_tiny_pretrained

    path = make_tiny_pretrained("bert", str(tmp_path / "bert"), seed=0)
    cb = DistillationCallback(teacher_pretrained=path, teacher_num_labels=3, loss="polino")
    t = cb._freeze(cb.build_teacher())
    batch = {"input_ids": torch.tensor([[2, 4, 1, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    cb.teacher = t
    out = cb.teacher_outputs(None, batch)
    assert out.shape == (1, 3) and not out.requires_grad
