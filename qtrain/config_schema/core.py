"""The schema machinery: typed dataclasses keyed by a config node's ``_target_``, and a
checker that walks a composed config with them -- pure Python + OmegaConf, no torch.

A schema is a dataclass registered with :func:`schema` for one ``_target_`` (the class the
node instantiates). Its fields are the node's keys; each field's type says what a value may
be, built from ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (an enum: the allowed
values), ``list[X]``, ``dict[K, X]``, ``X | None``, unions, :data:`Node` (a nested node
checked by its own ``_target_``) and ``Any``, with ranges as ``Annotated[int, Range(...)]``
(helpers :func:`Int` and :func:`Float`). A node whose ``_target_`` has a schema is checked
strictly: an unknown key is an error (with "did you mean"); a node whose ``_target_`` has no
schema is left to its class (tests/test_config_schema.py makes every shipped target have
one). Rules that involve several keys (bit width vs the quantizer class, mode vs bits) go
in the schema's ``pre(node, path)`` (before the per-key checks: its message can name a
range the key's type alone does not know) or ``post(node, path)`` classmethod.

Every error is a one-line :class:`qtrain.errors.ConfigError` naming the full key, the value
and the allowed values.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qtrain.errors import ConfigError

#: _target_ -> schema dataclass
SCHEMAS: dict[str, type] = {}
#: keys Hydra's instantiate reads itself (allowed in every node)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


class Node:
    """Field type: a nested config node (or null) checked by its own ``_target_``'s schema."""


@dataclass(frozen=True)
class Range:
    """Inclusive (ge/le) or exclusive (gt/lt) bounds of a number."""

    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None

    def ok(self, v) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.le is None or v <= self.le)
                and (self.gt is None or v > self.gt) and (self.lt is None or v < self.lt))

    def text(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if self.ge is not None and self.le is not None and float(self.ge).is_integer() \
                and float(self.le).is_integer():
            return f"in {int(self.ge)}..{int(self.le)}"
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        if hi:
            return f"<= {self.le}" if self.le is not None else f"< {self.lt}"
        return ""


def Int(ge=None, le=None, gt=None, lt=None):  # noqa: N802 (a type, like typing's)
    """An integer (never a bool) within the bounds."""
    return Annotated[int, Range(ge, le, gt, lt)]


def Float(ge=None, le=None, gt=None, lt=None):  # noqa: N802
    """A number (int or float, never a bool) within the bounds."""
    return Annotated[float, Range(ge, le, gt, lt)]


def schema(target: str, *, bits: tuple[int, int] | None = None, open_keys: bool = False,
           yaml: str | None = None):
    """Register the decorated class (made a dataclass) as the schema of ``target``.

    bits: the class's supported bit widths (a quantizer's ``min_bits..max_bits``), read by
    the callbacks' bit-width checks. open_keys: the class takes ``**kwargs`` whose keys are
    not listed (checked by the class). yaml: where the config lives, for messages."""

    def wrap(cls):
        cls = cls if "__dataclass_fields__" in cls.__dict__ else dataclass(cls)
        cls.__target__, cls.__bits__, cls.__open__, cls.__yaml__ = target, bits, open_keys, yaml
        SCHEMAS[target] = cls
        return cls

    return wrap


def opt(default=None):
    """A field default (the schema checks types; defaults live in the yaml files)."""
    return field(default=default)


def suggest(word, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ''."""
    word, choices = str(word), [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and len(word) >= 3:  # a shortened name: 'fairseq' -> 'fairseq_transformer'
        close = [c for c in choices if c.startswith(word)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- type descriptions and checks -------------------------------------------------------

_NONE = type(None)


def _args(tp):
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp) -> str:
    """What a value of type ``tp`` may be, in words."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "anything"
    if tp is _NONE:
        return "null"
    if _is_union(tp):
        return " or ".join(describe(a) for a in _args(tp))
    if origin is Annotated:
        base, *meta = _args(tp)
        rng = next((m for m in meta if isinstance(m, Range)), None)
        return describe(base) + (f" {rng.text()}" if rng and rng.text() else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in _args(tp))
    if origin is list:
        return f"a list of ({describe(_args(tp)[0])})"
    if origin is dict:
        k, v = _args(tp)
        keys = "names" if k is str else describe(k)
        return f"a mapping of {keys} to ({describe(v)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Node: "a config node with _target_ (or null)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(value, tp) -> bool:
    """Whether ``value`` (plain Python, resolved) is of type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is _NONE:
        return value is None
    if _is_union(tp):
        return any(_fits(value, a) for a in _args(tp))
    if origin is Annotated:
        base, *meta = _args(tp)
        return _fits(value, base) and all(m.ok(value) for m in meta if isinstance(m, Range))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in _args(tp))
    if origin is list:
        return isinstance(value, list) and all(_fits(v, _args(tp)[0]) for v in value)
    if origin is dict:
        k, v = _args(tp)
        return isinstance(value, dict) and all(_fits(a, k) and _fits(b, v)
                                               for a, b in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Node:
        return value is None or (isinstance(value, dict) and "_target_" in value)
    return isinstance(value, tp)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace("'", "")


def _literals(tp) -> list:
    """Every Literal value inside ``tp`` (for "did you mean")."""
    if typing.get_origin(tp) is Literal:
        return list(_args(tp))
    if _is_union(tp) or typing.get_origin(tp) is Annotated:
        return [v for a in _args(tp) for v in _literals(a)]
    return []


def _first_bad(key: str, value, tp):
    """(key, value, type) of the innermost element that does not fit (lists, dicts)."""
    origin = typing.get_origin(tp)
    if _is_union(tp) and not any(_fits(value, a) for a in _args(tp)):
        # a container arm of the right shape: point into it
        for a in _args(tp):
            o = typing.get_origin(a)
            if (o is list and isinstance(value, list)) or (o is dict and isinstance(value, dict)):
                return _first_bad(key, value, a)
        return key, value, tp
    if origin is list and isinstance(value, list):
        for i, v in enumerate(value):
            if not _fits(v, _args(tp)[0]):
                return _first_bad(f"{key}[{i}]", v, _args(tp)[0])
    if origin is dict and isinstance(value, dict):
        kt, vt = _args(tp)
        for a, b in value.items():
            if not _fits(a, kt):
                return f"{key} (key {a!r})", a, kt
            if not _fits(b, vt):
                return _first_bad(f"{key}.{a}", b, vt)
    return key, value, tp


def check_value(key: str, value, tp, where: str = "") -> None:
    """Raise a one-line ConfigError unless ``value`` fits ``tp``."""
    if _fits(value, tp):
        return
    k, v, t = _first_bad(key, value, tp)
    hint = suggest(v, _literals(t)) if isinstance(v, str) else ""
    src = f" ({where})" if where else ""
    raise ConfigError(f"{k}={_show(v)}: allowed: {describe(t)}{hint}{src}")


# ---- walking a composed config ----------------------------------------------------------

class _Skip:
    """A value that cannot be checked before the run (missing, or an interpolation that
    only resolves at run time, e.g. ``${hydra:...}`` outside Hydra)."""


SKIP = _Skip()


def value_of(node: DictConfig, key: str):
    """``node[key]`` resolved to plain Python, or :data:`SKIP`."""
    if OmegaConf.is_missing(node, key):
        return SKIP
    try:
        v = node[key]
        if isinstance(v, DictConfig | ListConfig):
            return OmegaConf.to_container(v, resolve=True)
        return v
    except OmegaConfBaseException:
        return SKIP


def _hints(cls) -> dict:
    cache = cls.__dict__.get("__hints__")
    if cache is None:
        cache = typing.get_type_hints(cls, include_extras=True)
        cache = {f.name: cache[f.name] for f in fields(cls)}
        cls.__hints__ = cache
    return cache


def keys_of(cls) -> list[str]:
    return list(_hints(cls))


def schema_for(node) -> type | None:
    if not isinstance(node, DictConfig):
        return None
    target = node.get("_target_") if "_target_" in node else None
    return SCHEMAS.get(target) if isinstance(target, str) else None


def check_node(node, path: str) -> None:
    """Check one node by its ``_target_``'s schema (nothing when it has none)."""
    cls = schema_for(node)
    if cls is None:
        return
    hints = _hints(cls)
    name = cls.__target__.rsplit(".", 1)[-1]
    pre = getattr(cls, "pre", None)
    if pre is not None:  # checks that know more than one key (bit width vs quantizer)
        pre(node, path)
    for key in node:
        key = str(key)
        if key in HYDRA_KEYS:
            continue
        if key not in hints:
            if cls.__open__:
                continue
            raise ConfigError(
                f"{path}.{key}: unknown key for {name}{suggest(key, hints)}; allowed keys: "
                f"{', '.join(hints)} (a new option also needs its schema: "
                "qtrain/config_schema/)")
        tp = hints[key]
        if tp is Node or (_is_union(tp) and Node in _args(tp)):
            try:
                child = node[key]  # a node, or a plain value checked below
            except OmegaConfBaseException:
                continue  # resolves only in the run
            if isinstance(child, DictConfig):
                check_node(child, f"{path}.{key}")
                continue
        value = value_of(node, key)
        if value is SKIP:
            continue
        check_value(f"{path}.{key}", value, tp, name)
    post = getattr(cls, "post", None)
    if post is not None:
        post(node, path)
