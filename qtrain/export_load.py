"""Loading a packed file back: :func:`load_packed` rebuilds the packed layers (with their
formats' checks from :mod:`qtrain.nn.packed_registry`) in a model of the same architecture
after checking that it is the file's configuration; :func:`load_run` does it for a finished
run directory."""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from qtrain.errors import DataFileError
from qtrain.export_file import read_json, read_packed
from qtrain.export_spec import ACT_QUANTIZERS, run_info
from qtrain.nn.convert import set_submodule
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.packed_registry import FORMATS
from qtrain.nn.pq_layers import rebuild_pq_layers


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _differences(model: nn.Module, name: str, old: nn.Module, s: dict) -> list[str]:
    """How the model's layer ``name`` differs from the file's spec ``s`` (weight shape; for a
    fake-quant layer also its weight quantizer / bits and activation quantizer / bits)."""
    out = []
    w = getattr(old, "weight", None)
    want = tuple(s["weight_shape"]) if s["kind"] == "conv2d" else (
        s["out_features"], s["in_features"])
    if isinstance(w, torch.Tensor) and tuple(w.shape) != want:
        out.append(f"{name}: weight shape {want} in the file, {tuple(w.shape)} in the model")
    src = s.get("source") or {}
    bn = src.get("bn_folded")
    if bn and not hasattr(old, "unfolded") and not (
            isinstance(bn, str) and isinstance(_submodule(model, bn), nn.modules.batchnorm._BatchNorm)):
        out.append(f"{name}: BN-folded (quant.fold_bn=true) in the file, a plain layer with its "
                   "BatchNorm in the model")
    if not hasattr(old, "weight_quantizer") or "weight_quantizer" not in src:
        return out
    wq = old.weight_quantizer
    if type(wq).__name__ != src["weight_quantizer"]:
        out.append(f"{name}: weight quantizer {src['weight_quantizer']} in the file, "
                   f"{type(wq).__name__} in the model")
    elif getattr(wq, "bits", None) != src.get("bits"):
        out.append(f"{name}: weight bits {src.get('bits')} in the file, "
                   f"{getattr(wq, 'bits', None)} in the model")
    a, aq = s.get("act_quantizer"), getattr(old, "act_quantizer", None)
    ta = a["type"] if a else None
    tm = type(aq).__name__ if aq is not None else None
    if ta != tm:
        out.append(f"{name}: activation quantizer {ta} in the file, {tm} in the model")
    elif a and "kwargs" in a and getattr(aq, "bits", None) != a["kwargs"].get("bits"):
        out.append(f"{name}: activation bits {a['kwargs'].get('bits')} in the file, "
                   f"{getattr(aq, 'bits', None)} in the model")
    return out


def _rebuild(model: nn.Module, specs: dict, backend: str, path, run: dict,
             expect: dict | None) -> None:
    """Replace each layer named in ``specs`` by an empty packed layer of the right shapes,
    after one check that the model (and ``expect``) is the configuration of the file."""
    diffs = [f"{k}: {run[k]!r} in the file, {v!r} expected" for k, v in (expect or {}).items()
             if k in run and run[k] != v]
    for name in specs:
        try:
            diffs += _differences(model, name, model.get_submodule(name), specs[name])
        except AttributeError:
            diffs.append(f"{name}: a packed layer in the file, no such layer in the model")
    if diffs:
        more = f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise DataFileError(
            f"packed file {path} was written for another configuration (file: "
            f"{json.dumps(run, sort_keys=True)}): {'; '.join(diffs[:6])}{more} -- load it "
            "into the model of the run that wrote it (qtrain.export.load_run(run_dir)) or "
            "re-export from this configuration")
    for name, s in specs.items():
        old = model.get_submodule(name)
        bn = (s.get("source") or {}).get("bn_folded")
        if isinstance(bn, str) and not hasattr(old, "unfolded"):  # float architecture:
            set_submodule(model, bn, nn.Identity())  # the packed layer holds the BN (eq. 14)
        cls = {"conv2d": PackedConv2d, "embedding": PackedEmbedding}.get(s["kind"], PackedLinear)
        new = cls(s["in_features"], s["out_features"], s["fmt"], s["bits"], s["group_size"],
                  s["symmetric"], backend)
        if s["kind"] == "conv2d":
            new.conv_args = {k: s[k] for k in ("weight_shape", "stride", "padding", "dilation",
                                               "groups")}
        elif s["kind"] == "embedding":
            new.emb_args = {k: s[k] for k in ("padding_idx", "max_norm", "norm_type")}
        for k in FORMATS[s["fmt"]].spec:  # e.g. n_outliers, n_stages: checked on load
            setattr(new, k, int(s[k]))
        new.source = s.get("source")
        aq = getattr(old, "act_quantizer", None)
        a = s.get("act_quantizer")
        if aq is None and a is not None:
            if "kwargs" not in a or a["type"] not in ACT_QUANTIZERS:
                raise DataFileError(
                    f"packed file {path}: layer {name!r} needs its activation quantizer "
                    f"{a['type']}, which a packed file cannot rebuild by itself (rebuilt: "
                    f"{', '.join(ACT_QUANTIZERS)}); pass the trained fake-quant model to "
                    "load_packed(path, model)")
            aq = ACT_QUANTIZERS[a["type"]][0](**a["kwargs"])
            aq.enabled = a["enabled"]
        if aq is not None:
            new.act_quantizer = aq
        set_submodule(model, name, new)


_BUFFERS = (*dict.fromkeys(b for f in FORMATS.values() for b in f.buffers), "bias")


def _placeholders(model: nn.Module, names: set[str]) -> None:
    """Give packed layers buffers named after the file's tensors (shapes set on load)."""
    for n, m in model.named_modules():
        if isinstance(m, PackedLinear):
            for t in _BUFFERS:
                full = f"{n}.{t}" if n else t
                if full in names:
                    m.register_buffer(t, torch.empty(0))


def load_packed(path: str | os.PathLike, model: nn.Module, backend: str = "auto",
                expect: dict | None = None) -> nn.Module:
    """Load a file from :func:`save_packed` into ``model`` (same architecture; float layers
    or fake-quant layers where packed layers were). Returns the packed model.

    Raises :class:`qtrain.errors.DataFileError` (a ValueError) naming the file for a missing,
    truncated or corrupt file (SHA-256 checksum mismatch), another format version / layout,
    a model of another configuration (every difference named: layer shapes, weight
    quantizer and bits, activation quantizer and bits of fake-quant layers, and the
    ``expect``-ed run entries -- recipe, method, bits, act_bits -- against the file's),
    missing or unexpected tensors, and shape or dtype mismatches.
    """
    meta, tensors = read_packed(path)
    for k in read_json(meta, "uint8_indices", "[]", path):
        if k not in tensors or tensors[k].dtype != torch.uint8:
            raise DataFileError(f"packed file {path}: {k!r} should be a uint8 index tensor")
        tensors[k] = tensors[k].to(torch.int64)
    for alias, src in read_json(meta, "tied", "{}", path).items():
        if src not in tensors or alias in tensors:
            raise DataFileError(f"packed file {path}: tied tensor {alias!r} -> {src!r} is "
                                "inconsistent (source missing or alias stored twice)")
        tensors[alias] = tensors[src]
    specs = read_json(meta, "layers", "{}", path)
    model = copy.deepcopy(model)
    _rebuild(model, specs, backend, path, read_json(meta, "run", "{}", path), expect)
    rebuild_pq_layers(model, tensors)
    _placeholders(model, set(tensors))
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        hint = (" -- the file holds modules this architecture lacks (e.g. the block "
                "quantizers of quant.quantize_residual=true, which load_run does not rebuild): "
                "load it into the trained fake-quant model, load_packed(path, model)") if extra else ""
        raise DataFileError(f"packed file {path}: missing tensors {missing[:5]}, "
                            f"unexpected tensors {extra[:5]}{hint}")
    packed_prefixes = tuple(f"{n}." for n in specs)
    for k, t in tensors.items():
        ref = own[k]
        if k.startswith(packed_prefixes) and ref.numel() == 0:
            continue  # packed buffer: validated below against its spec
        if ref.shape != t.shape or ref.dtype != t.dtype:
            raise DataFileError(f"packed file {path}: tensor {k!r} is {t.dtype} "
                                f"{tuple(t.shape)}; the model expects {ref.dtype} "
                                f"{tuple(ref.shape)}")
    for n, m in model.named_modules():
        if isinstance(m, PackedLinear):
            for t in list(m._buffers):
                full = f"{n}.{t}" if n else t
                if full in tensors:
                    m._buffers[t] = tensors[full]
            try:
                _validate_layer(m, n, path)
            except DataFileError:
                raise
            except ValueError as e:
                raise DataFileError(f"packed file {path}: layer {n!r}: {e}") from None
    model.load_state_dict(tensors, strict=True)
    return model


def load_run(run_dir: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """The packed model a finished run wrote (``train.py ... export=true``), in eval mode:
    the architecture from the run's ``config_resolved.yaml`` (``hydra.utils.instantiate`` of
    its ``model``), the tensors from its ``model_packed.safetensors`` (:func:`load_packed`),
    which must record the same recipe / method / bit widths as that config. Activation
    quantizers in :data:`ACT_QUANTIZERS` (uniform, PACT, LSQ, DSQ, DoReFa, binary, dynamic
    fixed point, FP8, value-aware, calibrated PTQ) are rebuilt from the file with their
    trained tensors;
    any other one only from the trained fake-quant model (``load_packed(path, model)``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg_path = os.path.join(run_dir, "config_resolved.yaml")
    path = os.path.join(run_dir, "model_packed.safetensors")
    for p in (cfg_path, path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"load_run: {p} not found (a run directory of "
                                    "`python train.py ... export=true` holds both files)")
    cfg = OmegaConf.load(cfg_path)
    model = instantiate(cfg.model)
    return load_packed(path, model, backend, expect=run_info(cfg)).eval()


def _validate_layer(m: PackedLinear, name: str, path) -> None:
    """The layer's format checks (qtrain.nn.packed_registry.FORMATS) and its bias."""
    def want(buf: str, dtypes, shape) -> None:
        t = getattr(m, buf, None)
        if t is None or t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise DataFileError(f"packed file {path}: {name}.{buf} is {got}; expected one of "
                                f"{list(dtypes)} with shape {tuple(shape)}")

    def fail(rest: str):
        raise DataFileError(f"packed file {path}: {name}{rest}")

    want.fail = fail
    FORMATS[m.fmt].validate(m, want)
    if m.bias is not None:
        want("bias", (m.bias.dtype,), (m.out_features,))
