"""The one registry of packed formats: how each ``fmt`` is read back, and which packer turns a
quantized layer into it.

* :data:`FORMATS` -- ``fmt`` name (the name written into a packed file's per-layer spec) ->
  :class:`Format`: its decoder, optional own forward, load-time checks, the buffers a file
  may hold for it and the extra spec entries it needs to be rebuilt. Every format is
  registered by :mod:`qtrain.nn.packed_codecs`, which :mod:`qtrain.nn.packed` imports, so a
  :class:`~qtrain.nn.packed.PackedLinear` of any format can be decoded and loaded.
* :data:`PACKERS` -- weight-quantizer class -> :class:`Packer`: the function that packs a
  fake-quant layer with that quantizer, the formats it writes, whether it packs embeddings
  and whether subclasses use it too. Looked up by :func:`packer_for` (the exact class first,
  then the nearest registered base class that allows subclasses, then :data:`PROTOCOLS`:
  duck-typed methods such as ``export_qparams``).
* :data:`LAYERS` -- the layer kinds :func:`qtrain.export.pack_model` packs, in the order it
  tries them (PQ layers, residual-quantized layers, fake-quant layers through
  :data:`PACKERS`, plain ``nn.Linear`` with ``bits``).

Packers are registered by :mod:`qtrain.nn.packers` (uniform / LSQ / group-wise / power-of-two
/ Quant-Noise / PQ / RQ / plain layers) and :mod:`qtrain.nn.packed_formats` (the learned,
float, bucketed, calibrated, value-aware, binary / ternary, k-means, ELQ, ABC-Net and Deep
Compression quantizers). Adding a format: its codec in :mod:`qtrain.nn.packed_codecs`
(:func:`register_format`) and one :func:`register_packer` for the quantizer that writes it.
This module imports nothing of qtrain (it sits below every packed module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Format:
    """How a packed format is read back.

    ``validate(layer, want)``: checks of a loaded layer's buffers (``want(buffer, dtypes,
    shape)`` raises naming the tensor; anything else raises a ValueError).
    ``dequantize(layer)``: float32 ``(N, K)`` weight; None: the uniform code path of
    :class:`~qtrain.nn.packed.PackedLinear` (``uniform`` / ``ternary`` / ``binary`` / ``lut``).
    ``linear(layer, x, bias, use_kernel)``: an own forward (None: the layer's).
    ``torch_only``: no Triton kernel (dequantize + ``F.linear``).
    ``buffers``: tensor names a packed file may hold for the format (besides ``bias``).
    ``spec``: extra integer constructor entries written into the file's spec and set on the
    empty layer when loading, name -> function of the packed layer."""

    name: str
    validate: Callable
    buffers: tuple[str, ...]
    dequantize: Callable | None = None
    linear: Callable | None = None
    torch_only: bool = False
    spec: dict[str, Callable] = field(default_factory=dict)


@dataclass(frozen=True)
class Packer:
    """How a fake-quant layer with a weight quantizer of class ``cls`` is packed.

    ``pack(layer, wq, name, bias, backend, scale_dtype)`` returns a ``PackedLinear`` of one of
    ``formats`` (the layer's flattened weight; :func:`qtrain.export.pack_model` wraps convs /
    embeddings). ``weight``: the value packer :func:`qtrain.nn.packed_formats.pack_weight`
    runs and checks against the quantizer's eval-mode output (None for the others).
    ``label``: what the error listing the packable quantizers calls it. ``check(wq)``: why
    the quantizer's settings have no packed form (checked before training), else None."""

    cls: type
    pack: Callable
    formats: tuple[str, ...]
    label: str
    subclasses: bool = False
    embeddings: bool = True
    weight: Callable | None = None
    check: Callable | None = None


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer :func:`qtrain.export.pack_model` packs: ``matches(layer, bits)`` and
    ``pack(layer, name, bits, group_size, symmetric, backend, scale_dtype)`` (None: left
    as it is)."""

    name: str
    matches: Callable
    pack: Callable
    label: str | None = None


FORMATS: dict[str, Format] = {}
PACKERS: dict[type, Packer] = {}
PROTOCOLS: dict[str, Packer] = {}  # method name -> packer of any quantizer that has it
LAYERS: list[LayerKind] = []


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"packed format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def register_packer(packer: Packer, protocol: str | None = None) -> Packer:
    """Register ``packer`` for its class (or, with ``protocol``, for every quantizer that has
    that method and no packer of its own)."""
    unknown = [f for f in packer.formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"packer for {packer.cls.__name__}: unknown formats {unknown}")
    table, key = (PROTOCOLS, protocol) if protocol else (PACKERS, packer.cls)
    if key in table:
        raise ValueError(f"packer for {key!r} registered twice")
    table[key] = packer
    return packer


def register_layer(kind: LayerKind) -> LayerKind:
    LAYERS.append(kind)
    return kind


def packer_for(wq) -> Packer | None:
    """The packer of weight quantizer ``wq`` (module doc), or None."""
    exact = PACKERS.get(type(wq))
    if exact is not None:
        return exact
    for base in type(wq).__mro__[1:]:
        p = PACKERS.get(base)
        if p is not None and p.subclasses:
            return p
    return next((p for attr, p in PROTOCOLS.items() if hasattr(wq, attr)), None)


def settings_error(wq) -> str | None:
    """Why weight quantizer ``wq``'s settings have no packed form, else None."""
    p = packer_for(wq)
    return p.check(wq) if p is not None and p.check is not None else None


def packable_labels() -> tuple[str, ...]:
    """Every registered label (layer kinds and quantizers), in registration order, once."""
    labels = [k.label for k in LAYERS if k.label] + [p.label for p in PACKERS.values()]
    labels += [p.label for p in PROTOCOLS.values()]
    return tuple(dict.fromkeys(labels))
