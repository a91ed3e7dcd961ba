"""Hessian-vector products by double backprop, restricted to chosen parameter groups.

Pearlmutter 1994 / PyHessian (Yao et al. 2020, sec. 3): with g = dL/dw computed with
``create_graph=True``, the product of the Hessian with a vector v is the gradient of the
scalar g^T v:  H v = d(g^T v)/dw. Restricted to a subset R of the parameters, the same
construction (differentiate only w.r.t. R twice) gives H_RR v_R, the R x R block of the
full Hessian times v_R; other parameters act as constants.

The loss is a list of closures ``loss_fn() -> scalar`` (one per calibration batch); the
Hessian is that of the weighted mean of the batch losses (weights default to equal, pass
batch sizes for a per-sample mean). Everything runs in :func:`hessian_mode`, which fixes
the pitfalls listed in DESIGN.md: it works inside ``torch.inference_mode()`` (Lightning's
validation/test loops), enables grad, sets the model to train or eval mode as configured,
zeroes stale ``.grad`` fields first, and restores every buffer (BatchNorm running
statistics, activation-observer EMAs) and the per-module train flags on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

LossFn = Callable[[], torch.Tensor]
MODES = ("eval", "train", "keep")


def check_groups(groups: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Validate ``{group name: [parameters]}``: non-empty, all requiring grad, disjoint."""
    if not groups:
        raise ValueError("Hessian request: no parameter groups given")
    out: dict[str, list[torch.Tensor]] = {}
    seen: dict[int, str] = {}
    for name, params in groups.items():
        params = list(params)
        if not params:
            raise ValueError(f"Hessian request: parameter group {name!r} is empty")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"Hessian request: group {name!r} item {i} is not a tensor")
            if not p.requires_grad:
                raise ValueError(
                    f"Hessian request: parameter {i} (shape {tuple(p.shape)}) of group {name!r} "
                    "does not require grad; the Hessian w.r.t. a frozen parameter is undefined "
                    "here -- set requires_grad=True or leave it out of the groups"
                )
            if id(p) in seen:
                raise ValueError(
                    f"Hessian request: a parameter appears in groups {seen[id(p)]!r} and {name!r}"
                )
            seen[id(p)] = name
        out[name] = params
    return out


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore all buffers (BN running stats, observers) and train flags of ``model`` on exit."""
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def hessian_mode(model: nn.Module, mode: str = "eval") -> Iterator[None]:
    """Context for Hessian work on ``model`` (see module docstring).

    ``mode``: 'eval' (BN uses running statistics, dropout off: the deterministic loss
    PyHessian analyses), 'train' (batch statistics; BN running statistics are still
    restored on exit) or 'keep' (leave the module flags as they are).
    """
    if mode not in MODES:
        raise ValueError(f"hessian mode={mode!r}; allowed: {MODES}")
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model):
        model.zero_grad(set_to_none=True)
        if mode != "keep":
            model.train(mode == "train")
        yield
        model.zero_grad(set_to_none=True)


def _as_grad_safe(x):
    """Inference tensors (made under inference_mode) cannot enter autograd: clone them."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, Mapping):
        return {k: _as_grad_safe(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_as_grad_safe(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_as_grad_safe(v) for v in x)
    return x


def batch_losses(
    model: nn.Module, batches: Sequence, loss: Callable[[nn.Module, object], torch.Tensor]
) -> list[LossFn]:
    """Closures ``lambda: loss(model, batch)`` for each batch (inference tensors cloned)."""
    def closure(batch) -> LossFn:
        return lambda: loss(model, batch)

    return [closure(_as_grad_safe(b)) for b in batches]


class HessianOperator:
    """v -> H_RR v for the parameter groups R of the mean loss over ``loss_fns``.

    Args:
        groups: ``{name: [parameters]}``; the operator acts on the concatenation of all
            groups (vectors are lists of tensors, one per parameter, in group order).
        loss_fns: closures returning the scalar loss of one batch each (or one closure).
        weights: per-closure weights of the mean (default equal).
        cache_graph: keep each batch's first-order gradient graph between products (one
            forward+backward per batch in total, then one double-backward per product, as
            PyHessian does for a single batch); False recomputes it every product (less
            memory, more time). Cached graphs are only valid inside one :func:`hessian_mode`.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[torch.Tensor]],
        loss_fns: LossFn | Sequence[LossFn],
        weights: Sequence[float] | None = None,
        cache_graph: bool = True,
    ) -> None:
        self.groups = check_groups(groups)
        self.names = list(self.groups)
        self.params = [p for ps in self.groups.values() for p in ps]
        self.slices: dict[str, slice] = {}
        i = 0
        for n, ps in self.groups.items():
            self.slices[n] = slice(i, i + len(ps))
            i += len(ps)
        self.loss_fns = [loss_fns] if callable(loss_fns) else list(loss_fns)
        if not self.loss_fns:
            raise ValueError("HessianOperator: loss_fns is empty (need at least one batch)")
        w = [1.0] * len(self.loss_fns) if weights is None else [float(x) for x in weights]
        if len(w) != len(self.loss_fns) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(
                f"HessianOperator: weights must be {len(self.loss_fns)} non-negative numbers "
                f"with a positive sum, got {weights!r}"
            )
        self.weights = [x / sum(w) for x in w]
        self.cache_graph = cache_graph
        self._grads: list[tuple[torch.Tensor, ...] | None] = [None] * len(self.loss_fns)
        self.n_products = 0

    @property
    def numel(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in ps) for n, ps in self.groups.items()}

    def _grad(self, k: int) -> tuple[torch.Tensor, ...]:
        if self._grads[k] is not None:
            return self._grads[k]
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("HessianOperator: use it inside qtrain.hessian.hvp.hessian_mode()")
        loss = self.loss_fns[k]()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"HessianOperator: loss closure {k} must return a scalar tensor")
        g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        g = tuple(torch.zeros_like(p) if gi is None else gi for p, gi in zip(self.params, g))
        if self.cache_graph:
            self._grads[k] = g
        return g

    def gradient(self) -> list[torch.Tensor]:
        """Mean gradient of the loss w.r.t. the group parameters (detached)."""
        out = [torch.zeros_like(p) for p in self.params]
        for k, w in enumerate(self.weights):
            for o, gi in zip(out, self._grad(k)):
                o.add_(gi.detach(), alpha=w)
        return out

    def hvp(self, v: Sequence[torch.Tensor], group: str | None = None) -> list[torch.Tensor]:
        """H v (detached) for ``v`` a list of tensors shaped like :attr:`params`.

        With ``group``, ``v`` holds that group's tensors only and the result is the
        diagonal block H_gg v_g (the Hessian of the loss w.r.t. that group alone), computed
        on the shared first-order graph.
        """
        s = slice(None) if group is None else self._slice(group)
        params = self.params[s]
        if len(v) != len(params):
            raise ValueError(f"hvp: v has {len(v)} tensors, expected {len(params)}")
        out = [torch.zeros_like(p) for p in params]
        for k, w in enumerate(self.weights):
            g = self._grad(k)[s]
            live = [(gi, vi) for gi, vi in zip(g, v) if gi.requires_grad]
            if not live:  # loss is linear in these parameters
                continue
            gg, vv = zip(*live)
            hv = torch.autograd.grad(
                gg, params, grad_outputs=vv, retain_graph=self.cache_graph, allow_unused=True
            )
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach(), alpha=w)
        self.n_products += 1
        return out

    def _slice(self, group: str) -> slice:
        if group not in self.slices:
            raise ValueError(f"unknown parameter group {group!r}; groups: {self.names}")
        return self.slices[group]

    def split(self, vectors: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per-group views of a list of tensors shaped like :attr:`params`."""
        return {n: list(vectors[s]) for n, s in self.slices.items()}

    def group_dots(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-group inner products sum_{p in group} <a_p, b_p> as a float64 vector."""
        dots = torch.stack([(x * y).sum().double() for x, y in zip(a, b)])
        return torch.stack([dots[s].sum() for s in self.slices.values()])


def layer_groups(
    model: nn.Module, names: Sequence[str], attrs: Sequence[str] = ("weight",)
) -> dict[str, list[torch.Tensor]]:
    """``{module name: [module.weight, ...]}`` for the named modules (HAWQ's blocks)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in mods:
            raise ValueError(f"Hessian request: model has no module named {n!r}")
        ps = [getattr(mods[n], a) for a in attrs if getattr(mods[n], a, None) is not None]
        if not ps:
            raise ValueError(f"Hessian request: module {n!r} has none of the attributes {attrs}")
        out[n] = ps
    return out
