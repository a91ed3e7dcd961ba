"""Select layers by module-name rules and swap them for quantized versions.

Rules are Python regexes matched with ``re.fullmatch`` against names from
``model.named_modules()`` (e.g. ``layer1\\.0\\.conv1``, ``.*fc.*``). Every include and
exclude pattern must match at least one layer of the requested types: a pattern that matches
nothing is an error (fairseq's iPQ silently ignored such patterns).

One naming convention for every callback (QAT, iPQ, Quant-Noise, VQ, INQ, Deep Compression,
Hessian): names are relative to the network, the LightningModule's ``model``
(``layer1.0.conv1``, not ``model.layer1.0.conv1``), whether a callback selects from the
network or from the LightningModule (:func:`network_prefix`). The old prefixed form
(``model\\.conv1``) still selects the same layers with a FutureWarning saying what to write.

First/last-layer policy (common practice since DoReFa / PACT: the first conv and the last
classifier are the most sensitive): ``'quantize'`` treats them like any other layer,
``'keep'`` leaves them in float, ``'8bit'`` quantizes them to 8 bits whatever ``bits`` says.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from qtrain.errors import ConfigError

FIRST_LAST_POLICIES = ("quantize", "keep", "8bit")


class LayerSelectionError(ConfigError):
    """An include/exclude/overrides rule that is invalid or selects no layer."""


def layer_class_for(module: nn.Module, table: dict, kind: str):
    """The replacement class ``table[base]`` for the first base type ``module`` is an
    instance of (e.g. PQ / RQ layers for Linear / Conv2d); ValueError naming the allowed."""
    for base, cls in table.items():
        if isinstance(module, base):
            return cls
    raise ValueError(f"no {kind} layer for module type {type(module).__name__}; "
                     f"allowed: {[t.__name__ for t in table]}")


def as_patterns(patterns: Iterable[str] | str | None) -> list[str]:
    """The one reading of an include/exclude value for every callback: a plain string
    (``quant.include=fc.*`` from the command line) is ONE regex, a list (or ListConfig) is one
    regex per entry, None is no pattern. ``list("fc.*")`` would give one pattern per character."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return [str(p) for p in patterns]


def _compile(patterns: Iterable[str] | str, key: str) -> list[re.Pattern]:
    """One pattern per list entry; a plain string (``quant.include=fc``) is one pattern, not
    a sequence of one-character patterns."""
    out = []
    for p in as_patterns(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise LayerSelectionError(f"{key}: invalid regex {p!r}: {e}") from None
    return out


def network_prefix(root: nn.Module) -> str:
    """``'model.'`` when ``root`` is a LightningModule holding the network as its ``model``
    child (qtrain's TaskModule): the prefix that layer-selection rules leave out; else ''."""
    pl = sys.modules.get("pytorch_lightning")
    if pl is not None and isinstance(root, pl.LightningModule) and \
            isinstance(root._modules.get("model"), nn.Module):
        return "model."
    return ""


def layer_name(name: str, prefix: str) -> str:
    """``name`` (from ``root.named_modules()``) as rules write it: without ``prefix``."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def rule_matcher(pattern: re.Pattern, names: Iterable[str], prefix: str, what: str):
    """A predicate ``full name -> bool`` for one rule, or None if it matches no name.

    The rule is matched against the names without ``prefix``; a rule that matches none of
    them but matches a prefixed name is the old form: a FutureWarning naming ``what`` (the
    config key) and the rule to write instead, and it keeps matching the prefixed names."""
    names = list(names)
    if any(pattern.fullmatch(layer_name(n, prefix)) for n in names):
        return lambda n: pattern.fullmatch(layer_name(n, prefix)) is not None
    if prefix and any(pattern.fullmatch(n) for n in names):
        new = re.sub(r"^(\^)?model(\\\.|\.)", r"\1", pattern.pattern)
        warnings.warn(
            f"{what}: pattern {pattern.pattern!r} names layers with the LightningModule prefix "
            f"'{prefix}'; layer names are relative to the network (as in quant.include): "
            f"write {new!r}. The prefixed form is deprecated.", FutureWarning, stacklevel=3)
        return lambda n: pattern.fullmatch(n) is not None
    return None


def select_modules(
    model: nn.Module,
    include: Iterable[str] = (".*",),
    exclude: Iterable[str] = (),
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    key: str = "quant",
) -> dict[str, nn.Module]:
    """Modules of ``types`` whose name fully matches an include and no exclude pattern.

    Patterns name layers relative to the network (:func:`network_prefix`); the returned
    names are ``model.named_modules()`` names. Raises LayerSelectionError (naming ``key`` and
    the pattern) when a pattern matches no layer of the given types, or when nothing is
    selected at all.
    """
    candidates = {n: m for n, m in model.named_modules() if n and isinstance(m, types)}
    type_names = "/".join(t.__name__ for t in types)
    prefix = network_prefix(model)
    inc, exc = _compile(include, f"{key}.include"), _compile(exclude, f"{key}.exclude")
    rules = {}
    for kind, pats in (("include", inc), ("exclude", exc)):
        rules[kind] = []
        for p in pats:
            match = rule_matcher(p, candidates, prefix, f"{key}.{kind}")
            if match is None:
                sample = ", ".join(layer_name(n, prefix) for n in list(candidates)[:6])
                raise LayerSelectionError(
                    f"{key}.{kind}: pattern {p.pattern!r} matches no {type_names} layer "
                    f"(layers are named like: {sample}, ...)"
                )
            rules[kind].append(match)
    chosen = {
        n: m for n, m in candidates.items()
        if any(f(n) for f in rules["include"]) and not any(f(n) for f in rules["exclude"])
    }
    if not chosen:
        raise LayerSelectionError(f"{key}: the include/exclude rules select no {type_names} layer")
    return chosen


def first_and_last(model: nn.Module, types=(nn.Linear, nn.Conv2d)) -> tuple[str, str]:
    """Names of the first and last layers of ``types`` in registration order."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    if not names:
        raise LayerSelectionError("model has no Linear/Conv2d layer to quantize")
    return names[0], names[-1]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def match_override(name: str, overrides: Mapping[str, dict], key: str = "quant.overrides") -> dict:
    """Merged per-layer overrides whose regex fully matches ``name`` (later wins)."""
    merged: dict = {}
    for pat, values in overrides.items():
        if re.fullmatch(pat, name):
            merged.update(dict(values))
    return merged


def check_overrides_used(model_names: Iterable[str], overrides: Mapping[str, dict], key: str):
    names = list(model_names)
    for pat in overrides:
        if not any(re.fullmatch(pat, n) for n in names):
            raise LayerSelectionError(f"{key}: pattern {pat!r} matches no selected layer")


def convert(
    model: nn.Module,
    build: Callable[[str, nn.Module], nn.Module | None],
    include: Iterable[str] = (".*",),
    exclude: Iterable[str] = (),
    types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    key: str = "quant",
) -> dict[str, nn.Module]:
    """Replace every selected module ``m`` named ``n`` by ``build(n, m)`` (None: keep).

    Returns {name: new module}. The model is modified in place.
    """
    replaced = {}
    for name, m in select_modules(model, include, exclude, types, key).items():
        new = build(name, m)
        if new is not None and new is not m:
            set_submodule(model, name, new)
            replaced[name] = new
    return replaced
