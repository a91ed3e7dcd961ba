"""DistillationCallback: hand-computed losses, frozen teacher over a real fit, scheme A,
teacher loading, no teacher autograd graph / no batch copy, bad input."""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks.distillation import DistillationCallback, load_float_weights, load_state
from qtrain.callbacks.qat import QATCallback
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.uniform_quantizer import UniformQuantizer

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


def hand_polino(w, t):
    n = len(Y)
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ZT[i], t), softmax(ZS[i], t)))
             for i in range(n)) / n
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
    assert cb.temperature == 2.0 and cb.kd_weight == 0.7
    total, _ = run_hook(cb)
    assert total.item() == pytest.approx(hand_polino(0.7, 2.0), rel=1e-6)


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
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillationCallback(**kw)


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
