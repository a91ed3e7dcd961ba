"""Knowledge distillation from a teacher network as a Lightning callback.

Losses (pure functions, logits of shape (N, C) or (N, ..., C), flattened to (-1, C)):

* Apprentice (Mishra & Marr 2018, "Apprentice: Using Knowledge Distillation Techniques To
  Improve Low-Precision Network Accuracy", ICLR, eq. (1)):
      L = alpha H(y, p_T) + beta H(y, p_S) + gamma H(z_T, p_S)
  with p = softmax(z / tau) for the soft term: H(z_T, p_S) = -sum_c softmax(z_T/tau)_c
  log softmax(z_S/tau)_c (batch mean). H(y, p) is the task module's own loss
  (``task_loss``: cross-entropy, label smoothing included when the task uses it). Paper
  defaults: alpha = 1, beta = gamma = 0.5, tau = 1. No tau^2 factor is applied (the
  paper's equation has none). With a frozen teacher (schemes B, C) the alpha term is a
  constant (it carries no gradient) and only shifts the logged loss.
* Polino et al. 2018 ("Model compression via distillation and quantization", ICLR, sec. 2):
      L = w T^2 KL(p_T^T || p_S^T) + (1 - w) H(y, p_S),   w = 0.7, T = 2
  where p^T = softmax(z / T). The KL term is scaled as in the authors' code
  (antspy/quantized_distillation, ``cnn_models/help_fun.py::forward_and_backward``:
  ``0.7 * T**2 * nn.KLDivLoss()(log_softmax(z_S / T), softmax(z_T / T))``): PyTorch's default
  ``reduction='mean'``, the element-wise mean over batch x classes, i.e. the per-sample KL
  divided by N * C (``kl_reduction='mean'``, the default). ``kl_reduction='batchmean'`` (the
  true per-sample KL, divided by N only) is a named option: it makes the distillation term C
  times stronger relative to the cross-entropy (10x on CIFAR-10, 1000x on ImageNet).

Apprentice schemes (``scheme``):

* ``'A'``: teacher and student trained jointly. The teacher becomes the submodule
  ``pl_module.teacher``, so Lightning puts its parameters in the optimizer (configure_optimizers
  runs after ``setup``) and in the checkpoint; it follows ``pl_module.train()/eval()``. The
  teacher learns from alpha H(y, p_T); the gamma term reaches the teacher only with
  ``kd_to_teacher=True`` (default False: the soft targets are detached, as in standard KD --
  the paper's eq. (1) does not say; this is our choice).
* ``'B'``: frozen teacher, student trained from scratch (quantized by a QAT callback).
* ``'C'``: as B, with a full-precision pretrained student (``student_checkpoint``, or the model
  config's own weights, passed as ``student_pretrained``; recipes set it to
  ``${oc.select:model.weights,null}``) finetuned to low precision under the teacher (QAT
  callback). Scheme C without either is a ``ConfigError`` at construction (it would silently
  be scheme B), unless ``allow_untrained_student=True`` (recipes: ``${model.tiny}``, smoke
  runs only).

Frozen teachers (B, C) are held by this callback, not by the LightningModule: their parameters
are in neither the optimizer nor the checkpoint, have ``requires_grad=False``, stay in eval
mode, and run once per training batch under ``torch.no_grad()`` on the student's device (moved
in ``setup`` to ``trainer.strategy.root_device``). The teacher sees the *same* input object as
the student (no copy of the batch) and no autograd graph is built for it, so the overhead is
one teacher forward per step (benchmarks/bench_distillation.py). Under DDP each rank runs the
teacher on its own batch; nothing is exchanged between ranks (the teacher is not wrapped in
DDP and needs no gradient synchronisation).

Teacher slot (exactly one of ``teacher`` / ``teacher_pretrained``):

* ``teacher``: an ``nn.Module``, or a zero-argument factory returning one (a Hydra
  ``_partial_`` model config); ``teacher_checkpoint`` (optional) is then loaded into it: a plain
  state dict (.pt/.pth/.safetensors) or a Lightning checkpoint of a TaskModule (the ``model.``
  prefix is stripped; ``teacher_checkpoint_prefix='teacher.'`` takes a scheme-A teacher).
* ``teacher_pretrained``: a transformers name/path (through :mod:`qtrain.models.hf`), with
  ``teacher_num_labels`` classes.

A frozen teacher (B, C) built from a factory without ``teacher_checkpoint`` would be a random
network: that is an error unless ``allow_untrained_teacher=True``. Recipes set it to
``${model.tiny}``, so only smoke runs (tiny models, a plumbing check) may use a random teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError, DataFileError

log = logging.getLogger(__name__)
SCHEMES = ("A", "B", "C")
LOSSES = ("apprentice", "polino")
KL_REDUCTIONS = ("mean", "batchmean")


# -- losses -------------------------------------------------------------------------------
def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(-1, z.shape[-1]).float()


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """H(z_T, p_S) = -mean_n sum_c softmax(z_T/tau)_c log softmax(z_S/tau)_c."""
    p_t = F.softmax(_flat(teacher_logits) / temperature, dim=-1)
    return -(p_t * F.log_softmax(_flat(student_logits) / temperature, dim=-1)).sum(-1).mean()


def kl_teacher_student(student_logits, teacher_logits, temperature: float = 2.0,
                       reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(z_T/T) || softmax(z_S/T)) summed over samples and classes, then divided by
    N * C (``reduction='mean'``: PyTorch's ``nn.KLDivLoss()`` default, as the Polino authors'
    code) or by N (``'batchmean'``: the per-sample KL)."""
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"distillation.kl_reduction={reduction!r}; allowed: {KL_REDUCTIONS}")
    zs = _flat(student_logits)
    kl = F.kl_div(F.log_softmax(zs / temperature, dim=-1),
                  F.log_softmax(_flat(teacher_logits) / temperature, dim=-1),
                  reduction="sum", log_target=True)
    return kl / (zs.numel() if reduction == "mean" else zs.shape[0])


def apprentice_loss(student_ce, teacher_ce, student_logits, teacher_logits, alpha: float = 1.0,
                    beta: float = 0.5, gamma: float = 0.5, temperature: float = 1.0):
    """Mishra & Marr 2018 eq. (1): alpha H(y,p_T) + beta H(y,p_S) + gamma H(z_T,p_S)."""
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature)
    return alpha * teacher_ce + beta * student_ce + gamma * soft


def polino_loss(student_ce, student_logits, teacher_logits, temperature: float = 2.0,
                kd_weight: float = 0.7, kl_reduction: str = "mean"):
    """Polino et al. 2018 sec. 2: w T^2 KL(p_T || p_S) + (1 - w) H(y, p_S), w = 0.7, T = 2; the
    KL scaled as the authors' code (element-wise mean, module docstring) unless
    ``kl_reduction='batchmean'``."""
    kl = kl_teacher_student(student_logits, teacher_logits, temperature, kl_reduction)
    return kd_weight * temperature**2 * kl + (1.0 - kd_weight) * student_ce


# -- checkpoints ----------------------------------------------------------------------------
def load_state(path: str, prefix: str = "model.") -> dict:
    """State dict from a plain file or a Lightning checkpoint; ``prefix`` is stripped when
    the keys carry it (a TaskModule's ``model.`` / ``teacher.``)."""
    from qtrain.models.vision import load_state_dict_file

    sd = load_state_dict_file(path)
    if not isinstance(sd, dict):
        raise DataFileError(f"checkpoint {path!r}: no state dict inside (got {type(sd).__name__})")
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_float_weights(model: nn.Module, sd: dict, what: str) -> None:
    """Load float weights into ``model``, which may already hold fake-quant layers: only the
    quantizers' own entries (``*_quantizer.*``) may be missing; anything else must match."""
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise DataFileError(f"{what}: checkpoint does not fit the model: {e}") from None
    missing = [k for k in res.missing_keys if "_quantizer." not in k]
    if missing or res.unexpected_keys:
        raise DataFileError(
            f"{what}: checkpoint does not fit the model: missing {missing[:5]}, "
            f"unexpected {res.unexpected_keys[:5]}")


class DistillationCallback(pl.Callback):
    """Teacher -> student distillation (see module docstring).

    Args:
        teacher: nn.Module or zero-arg factory (exclusive with ``teacher_pretrained``).
        teacher_checkpoint: state dict / Lightning checkpoint loaded into ``teacher``.
        teacher_checkpoint_prefix: key prefix to take from a Lightning checkpoint.
        teacher_pretrained: transformers name or folder (qtrain.models.hf).
        teacher_num_labels: classes of a ``teacher_pretrained`` model.
        scheme: Apprentice scheme 'A' | 'B' | 'C'.
        loss: 'apprentice' | 'polino'.
        alpha, beta, gamma: Apprentice weights; temperature: tau (Apprentice) / T (Polino).
        kd_weight: Polino's w (0.7).
        kl_reduction: Polino's KL scale: 'mean' (authors' code: / (N * C); default) |
            'batchmean' (/ N).
        kd_to_teacher: scheme A only: let the gamma term train the teacher too.
        student_checkpoint: float weights loaded into the student in ``setup`` (scheme C).
        student_pretrained: the model config's own full-precision weights (e.g.
            ``model.weights``), if any: scheme C's student then starts from them.
        allow_untrained_student: let scheme C start without FP student weights (smoke tests).
        allow_untrained_teacher: let scheme B/C freeze a factory-built teacher that has no
            ``teacher_checkpoint`` (random weights; for smoke tests only).
    """

    def __init__(
        self, teacher: nn.Module | Callable[[], nn.Module] | None = None,
        teacher_checkpoint: str | None = None, teacher_checkpoint_prefix: str = "model.",
        teacher_pretrained: str | None = None, teacher_num_labels: int = 2,
        scheme: str = "B", loss: str = "apprentice", alpha: float = 1.0, beta: float = 0.5,
        gamma: float = 0.5, temperature: float | None = None, kd_weight: float = 0.7,
        kd_to_teacher: bool = False, student_checkpoint: str | None = None,
        allow_untrained_teacher: bool = False, kl_reduction: str = "mean",
        student_pretrained: str | None = None, allow_untrained_student: bool = False,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ConfigError(f"distillation.scheme={scheme!r}; allowed: {SCHEMES}")
        if loss not in LOSSES:
            raise ConfigError(f"distillation.loss={loss!r}; allowed: {LOSSES}")
        if (teacher is None) == (teacher_pretrained is None):
            raise ConfigError("distillation: set exactly one of distillation.teacher (a model or "
                             "factory) and distillation.teacher_pretrained (a transformers name/path)")
        if teacher_checkpoint is not None and teacher is None:
            raise ConfigError("distillation.teacher_checkpoint needs distillation.teacher (the "
                             "model to load it into)")
        if (scheme != "A" and teacher is not None and not isinstance(teacher, nn.Module)
                and teacher_checkpoint is None and not allow_untrained_teacher):
            raise ConfigError(
                f"distillation.scheme={scheme} freezes the teacher, but distillation.teacher is "
                "built from a config and distillation.teacher_checkpoint is null: the teacher "
                "would be untrained. Set distillation.teacher_checkpoint=/path/to/teacher.ckpt "
                "(a state dict or a Lightning checkpoint, e.g. a scheme-A or float run of the "
                "teacher) or use scheme=A (teacher trained jointly)")
        if temperature is None:
            temperature = 1.0 if loss == "apprentice" else 2.0
        if not temperature > 0:
            raise ConfigError(f"distillation.temperature={temperature}: must be > 0")
        if not 0.0 <= kd_weight <= 1.0:
            raise ConfigError(f"distillation.kd_weight={kd_weight}: must be in [0, 1]")
        if min(alpha, beta, gamma) < 0:
            raise ConfigError(f"distillation alpha/beta/gamma=({alpha}, {beta}, {gamma}): must be >= 0")
        if scheme == "A" and (loss != "apprentice" or alpha <= 0):
            raise ConfigError("distillation.scheme=A trains the teacher through alpha H(y, p_T): "
                             "it needs loss=apprentice and alpha > 0")
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"distillation.kl_reduction={kl_reduction!r}; allowed: {KL_REDUCTIONS}")
        if (scheme == "C" and student_checkpoint is None and not student_pretrained
                and not allow_untrained_student):
            raise ConfigError(
                "distillation.scheme=C finetunes a trained full-precision student (Mishra & Marr "
                "2018), but distillation.student_checkpoint and distillation.student_pretrained "
                "are both null: the student would start from random weights (that is scheme B). "
                "Set distillation.student_checkpoint=/path/to/float_student.ckpt (a state dict or "
                "a Lightning checkpoint of a float run of the student), or model weights passed "
                "as distillation.student_pretrained, or use scheme=B")
        if kd_to_teacher and scheme != "A":
            raise ConfigError("distillation.kd_to_teacher=true needs scheme=A (a frozen teacher "
                             "gets no gradient)")
        self.teacher_src, self.teacher_checkpoint = teacher, teacher_checkpoint
        self.teacher_checkpoint_prefix = teacher_checkpoint_prefix
        self.teacher_pretrained, self.teacher_num_labels = teacher_pretrained, teacher_num_labels
        self.scheme, self.loss = scheme, loss
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.temperature, self.kd_weight = float(temperature), kd_weight
        self.kd_to_teacher = kd_to_teacher
        self.student_checkpoint, self.student_pretrained = student_checkpoint, student_pretrained
        self.kl_reduction = kl_reduction
        self.teacher: nn.Module | None = None  # frozen teacher (B, C); scheme A: pl_module.teacher

    # -- teacher construction -------------------------------------------------------------
    def build_teacher(self) -> nn.Module:
        if self.teacher_pretrained is not None:
            from qtrain.models.hf import HFSequenceClassifier

            return HFSequenceClassifier(self.teacher_pretrained, num_labels=self.teacher_num_labels)
        t = self.teacher_src
        if not isinstance(t, nn.Module):
            if not callable(t):
                raise ConfigError(f"distillation.teacher: expected an nn.Module or a factory, "
                                 f"got {type(t).__name__}")
            t = t()
            if not isinstance(t, nn.Module):
                raise ConfigError(f"distillation.teacher factory returned {type(t).__name__}, "
                                 "not an nn.Module")
        if self.teacher_checkpoint is not None:
            sd = load_state(self.teacher_checkpoint, self.teacher_checkpoint_prefix)
            try:
                t.load_state_dict(sd)
            except RuntimeError as e:
                raise DataFileError(f"distillation.teacher_checkpoint={self.teacher_checkpoint!r} "
                                 f"does not fit distillation.teacher: {e}") from None
        return t

    def _freeze(self, t: nn.Module) -> nn.Module:
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.student_checkpoint is not None:
            load_float_weights(pl_module.model, load_state(self.student_checkpoint),
                               f"distillation.student_checkpoint={self.student_checkpoint!r}")
        device = trainer.strategy.root_device
        if self.scheme == "A":
            if not isinstance(getattr(pl_module, "teacher", None), nn.Module):
                pl_module.teacher = self.build_teacher().to(device)
        elif self.teacher is None:
            self.teacher = self._freeze(self.build_teacher()).to(device)
        else:
            self.teacher.to(device)
        pl_module.loss_hook = self.loss_hook

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and pl_module.loss_hook == self.loss_hook:
            pl_module.loss_hook = None

    def teacher_outputs(self, module: pl.LightningModule, inputs) -> torch.Tensor:
        """Teacher logits for ``inputs`` (the student's own input object, never copied)."""
        if self.scheme == "A":
            out = module.teacher(inputs)
        else:
            t = self.teacher
            if t.training:  # something called .train() on it: keep BatchNorm/dropout frozen
                t.eval()
            with torch.no_grad():
                out = t(inputs)
        return getattr(out, "logits", out)

    def loss_hook(self, module, batch, outputs, loss):
        """Installed as ``pl_module.loss_hook``: the task loss -> the distillation loss."""
        inputs, targets = module.split_batch(batch)
        z_t = self.teacher_outputs(module, inputs)
        if z_t.shape != outputs.shape:
            raise ConfigError(
                f"distillation: teacher output shape {tuple(z_t.shape)} differs from the "
                f"student's {tuple(outputs.shape)} (same number of classes/positions needed)")
        if self.loss == "polino":
            return polino_loss(loss, outputs, z_t, self.temperature, self.kd_weight,
                               self.kl_reduction)
        teacher_ce = module.task_loss(z_t, targets)
        soft_t = z_t if self.kd_to_teacher else z_t.detach()
        return apprentice_loss(loss, teacher_ce, outputs, soft_t, self.alpha, self.beta,
                               self.gamma, self.temperature)
