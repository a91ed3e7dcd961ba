"""Export a trained model to packed low-bit layers; save / load them with safetensors.

* :func:`pack_model` returns a copy of the model in which
  - fake-quant layers (``QuantLinear`` / ``QuantConv2d``) whose weight quantizer has
    ``export_qparams`` (``UniformQuantizer``) become :class:`PackedLinear` /
    :class:`PackedConv2d` with exactly the trained integer codes and scales (the trained
    activation quantizer is kept and applied to the input),
  - fake-quant layers whose weight quantizer is a ``PowerOfTwoQuantizer`` (what
    :class:`qtrain.callbacks.inq.INQCallback` leaves) become ``fmt="pow2"`` packed layers:
    ``b`` bits per weight (sign + exponent index incl. zero, INQ eq. (2)-(3)) as bit planes
    plus the int8 exponent n1 of the layer -- the ``b * numel + 8`` bits the run summary
    reports, up to < 32 bits of padding per plane. They run by dequantizing to a float
    weight (pure torch; no Triton kernel for this format),
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is a
    ``QuantNoiseQuantizer`` (Fan et al. 2020) become their fully quantized (p = 1) model:
    int8 / int4 as the symmetric ``uniform`` format with the forward's exact codes and float32
    scales (per tensor or per output channel; a per-tensor scale is stored once per row), 'pq'
    as the ``codebook`` format from the quantizer's centroids and assignments (fitted first
    if it never ran; centroids in float16 as the run summary counts them). Embeddings become
    :class:`PackedEmbedding` (same formats, rows = output channels),
  - uniform-quantized embeddings (``QuantEmbedding`` with a ``UniformQuantizer``: per tensor,
    per row (``axis=0``) or per group along the embedding dim; e.g. the QAT callback with
    types [Embedding]) become :class:`PackedEmbedding` through the same path as
    ``QuantLinear`` (rows = table rows; a per-tensor scale is stored once per row). Other
    quantized embeddings (e.g. power-of-two) are left as they are,
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is a Q-BERT
    ``GroupwiseQuantizer`` (Shen et al. 2019; each group is a block of whole rows) become the
    ``uniform`` per-channel format, every row holding its group's scale / zero-point
    (``scale_dtype``) and the forward's exact codes,
  - fake-quant Linear / Conv2d / Embedding layers whose weight quantizer is one of the
    learned / float / bucketed / calibrated / value-aware quantizers are packed by
    :func:`qtrain.nn.packed_formats.pack_weight` with the quantizer's eval-mode weight:
    DoReFa (k-bit: ``lut`` codes into the table 2 (u / (2^k - 1)) - 1; 1 bit: ``binary``),
    DSQ (hard test-time value: ``lut`` codes into the table l + Delta u; both tables computed
    with the forward's float32 operations: bit-exact),
    TTQ / scalar soft-to-hard VQ (``lut``: codes into the {-W_n, 0, W_p} table or the
    centres; bit-exact), Polino differentiable (``bucketed`` with the learned points as a
    ``lut`` and alpha, beta per bucket; ``lut`` with bucket_size=None; bit-exact), vector
    soft-to-hard VQ (``codebook``), Polino bucketed min-max (``uniform`` per group when the bucket size
    divides the row length, else ``bucketed``: buckets of the flattened weight, torch only),
    dynamic fixed point (``uniform`` symmetric with scale 2^E up to 8 bits, else ``float``
    int16 / int32 codes), FloatQuantizer / FP8 training (``float``: the weight in its torch
    dtype fp16 / bf16 / float8_e4m3fn / float8_e5m2; bit-exact), S2FP8 (``float``: the E5M2
    values plus alpha, beta), calibrated uniform (``uniform``) and value-aware
    (``value_aware``: dense uniform codes + sparse float32 outliers). Stochastic rounding is
    packed with round-to-nearest. See :mod:`qtrain.nn.packed_formats` for the exactness of
    each format; the packer raises if its weight drifts from the quantizer's own output,
  - PQ layers (duck-typed: ``centroids`` (n_centroids x bs), ``assignments``, ``block_size``,
    ``weight_from_codebook()``) become codebook layers,
  - residual-quantized layers (:mod:`qtrain.nn.rq_layers`, Gong et al. 2014) become ``rq``
    layers (per-stage uint8 codes + fp16 codebooks, :mod:`qtrain.nn.packed_rq`), scalar
    k-means weight sharing (``KMeansWeightQuantizer``) the ``lut`` format (b-bit codes + an
    fp16 table of the shared values; bit-exact),
  - Deep Compression layers (``SharedWeightQuantizer``, Han et al. 2016) become
    ``sparse_shared`` layers (relative-index + code bit streams, fp32 codebook; torch only;
    :mod:`qtrain.nn.packed_sparse`),
  - plain ``nn.Linear`` layers are packed with min-max uniform quantization when ``bits`` is
    given, else left in float.
  Per-tensor parameters are stored once per row (the formats keep one scale per row), and
  3-bit / 5..7-bit codes travel in 4- / 8-bit containers: the file then exceeds the run
  summary's storage bits by those copies and the container padding.
  Every other module, parameter and buffer (BatchNorm running statistics included) is kept.
  Layers packed from one tied float Parameter into equal buffers share them (written once).
  PQ layers tied to another layer (an LM's embedding and output projection sharing one
  ``centroids`` Parameter, :func:`qtrain.nn.pq_layers.pq_tied`) stay PQ layers, so the tie
  and its single codebook survive export.
* :func:`save_packed` writes one ``.safetensors`` file (atomically): every tensor of the state
  dict plus metadata (format version, bit layout, file version, per-layer specs with what each
  layer was packed from and its activation quantizer, the run's recipe / method / bit widths,
  a SHA-256 :func:`checksum` of tensors and metadata). :func:`load_packed` verifies the
  checksum, rebuilds the packed layers (and the activation quantizers of
  :data:`ACT_QUANTIZERS`) in a float model of the same architecture and loads the tensors
  after validating version, layout, configuration, names, shapes and dtypes; every failure is
  one :class:`qtrain.errors.DataFileError` naming the file. Nothing is unpickled.
  Exactness: with ``scale_dtype=float32`` (default) the packed model reproduces the trained
  fake-quant model bit for bit for the formats listed exact in :mod:`qtrain.nn.packed_formats`
  and the uniform / LSQ / group-wise / power-of-two paths here; fp16 codebooks (PQ / iPQ,
  Quant-Noise pq) are exact only for fp16-representable centroids. Tensors shared
  by several state-dict keys (tied weights) are written once; the metadata maps every alias
  to its source key and loading re-ties them. PQ layers left in the file are rebuilt in the
  float model (:func:`qtrain.nn.pq_layers.rebuild_pq_layers`, ties included).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable

import torch
from qtrain_kernels.layout import FORMAT_VERSION, LAYOUT
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from qtrain.atomic_file import write_atomic
from qtrain.errors import DataFileError
from qtrain.nn import packed_formats  # noqa: F401  (registers its packers)
from qtrain.nn.abc_quantizer import ABCActQuantizer
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.convert import set_submodule
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import (
    BinaryActQuantizer,
    DynamicFixedPointQuantizer,
)
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from qtrain.nn.learned_quantizers import (
    DoReFaActQuantizer,
    DSQQuantizer,
    LSQQuantizer,
    PACTQuantizer,
)
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.packed_registry import FORMATS, LAYERS, packer_for, settings_error
from qtrain.nn.packers import has_codebook, is_pq, unpackable_message
from qtrain.nn.pq_layers import rebuild_pq_layers
from qtrain.nn.uniform_quantizer import UniformQuantizer


def _pack_one(m: nn.Module, name: str, bits, group_size, symmetric, backend, scale_dtype):
    """The first registered layer kind (qtrain.nn.packed_registry.LAYERS) matching ``m``
    packs it; convs and embeddings are wrapped around the packed flattened weight."""
    kind = next((k for k in LAYERS if k.matches(m, bits)), None)
    packed = None if kind is None else kind.pack(m, name, bits, group_size, symmetric,
                                                 backend, scale_dtype)
    if packed is None:
        return None
    if isinstance(m, nn.Conv2d):
        packed = PackedConv2d.wrap(packed, m)
        packed.act_quantizer = getattr(m, "act_quantizer", None)
    elif isinstance(m, nn.Embedding):
        packed = PackedEmbedding.wrap(packed, m)
    return packed


def check_packable(model: nn.Module) -> None:
    """Raise one ValueError naming every fake-quant layer whose weight quantizer
    :func:`pack_model` cannot pack (checked before training, so no run is lost to it)."""
    bad = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear | QuantConv2d) or is_pq(m):
            continue  # embeddings without a packer stay fake-quant layers (not an error)
        wq = m.weight_quantizer
        why = settings_error(wq) if wq is not None else None
        if wq is None or (packer_for(wq) is not None and why is None):
            continue
        bad.append((name, type(wq).__name__ + (f": {why}" if why else "")))
    if bad:
        raise ValueError(unpackable_message(bad))


def _share_tied(new: PackedLinear, earlier: list[PackedLinear]) -> None:
    """Point ``new``'s weight buffers at those of an earlier layer packed from the same
    float weight Parameter when they are equal (tied weights: written once, re-tied on load)."""
    mine = {k: b for k, b in new.named_buffers(recurse=False) if k != "bias"}
    for old in earlier:
        theirs = {k: b for k, b in old.named_buffers(recurse=False) if k != "bias"}
        if mine.keys() == theirs.keys() and all(
                mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape
                and torch.equal(mine[k], theirs[k]) for k in mine):
            for k, b in theirs.items():
                new.register_buffer(k, b)
            return


@torch.no_grad()
def pack_model(model: nn.Module, bits: int | None = None, group_size: int | None = 128,
               symmetric: bool = False, backend: str = "auto",
               scale_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Copy of ``model`` with its quantized layers replaced by packed layers (module doc).

    ``scale_dtype``: precision of the stored scales / zero-points (uniform formats) and of
    binary / ternary alpha. float32 (default) is the precision the fake-quant forward used,
    so those layers reproduce the trained weight bit for bit; float16 (a named option) halves
    the scale storage at ~2^-11 relative error of every dequantized weight."""
    out = copy.deepcopy(model)
    users: dict[int, int] = {}
    packed_from: dict[int, list[PackedLinear]] = {}  # id(float weight) -> its packed layers
    for m in out.modules():
        if has_codebook(m):
            users[id(m.centroids)] = users.get(id(m.centroids), 0) + 1
    for name, m in list(out.named_modules()):
        if has_codebook(m) and users[id(m.centroids)] > 1:
            continue  # tied codebook: keep the PQ layers (one codebook in the file)
        folded = hasattr(m, "unfolded")  # qtrain.nn.bn_fold: pack the inference graph (eq. 14)
        new = _pack_one(m.unfolded() if folded else m, name, bits, group_size, symmetric,
                        backend, scale_dtype)
        if new is None:
            continue
        new.source = _source(m)
        if folded:  # the BN's name lets load_run drop it from a float architecture
            new.source["bn_folded"] = getattr(m, "bn_name", True)
        w = m._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            _share_tied(new, packed_from.setdefault(id(w), []))
            packed_from[id(w)].append(new)
        new.train(m.training)
        parent = out.get_submodule(name.rpartition(".")[0]) if "." in name else out
        if name == "":
            raise ValueError("pack_model: the model itself is a single layer; wrap it")
        setattr(parent, name.rpartition(".")[2], new)
    return out


def _calibrated_kwargs(aq: CalibratedQuantizer) -> dict:
    """Constructor arguments of a calibrated (PTQ) quantizer: its observer by calibration name
    (:func:`qtrain.nn.observers.make_observer`) with that observer's own arguments."""
    ob = aq.observer
    kind = type(ob).__name__
    if kind == "MinMaxObserver":
        extra = ({"calibration": "minmax"} if ob.momentum is None
                 else {"calibration": "ema", "momentum": ob.momentum})
    elif kind == "HistogramObserver":
        extra = {"calibration": ob.method, "bins": ob.bins, "percentile": ob.percentile,
                 "kl_start": ob.kl_start}
    elif kind == "ACIQObserver":
        extra = {"calibration": f"aciq-{ob.distribution}"}
    else:
        raise TypeError(f"CalibratedQuantizer with observer {kind}: no rebuild recipe")
    return {"bits": aq.bits, "symmetric": aq.symmetric, "name": ob.name, **extra}


# Activation quantizers a packed file can rebuild by itself (an allow-list: nothing else is
# constructed from file metadata): class -> the constructor arguments read back from the
# trained quantizer's attributes (or a function returning them). Their learned tensors -- PACT's alpha, LSQ's step, DSQ's
# l / u / alpha, the EMA ranges of UniformQuantizer, ``initialized`` flags -- are submodule
# tensors of the packed layer, so they travel in the file and are loaded back exactly.
ACT_QUANTIZERS: dict[str, tuple[type, tuple[str, ...] | Callable]] = {c.__name__: (c, a) for c, a in (
    (UniformQuantizer, ("bits", "symmetric", "granularity", "group_size", "axis", "observer",
                        "ema_decay")),
    (PACTQuantizer, ("bits", "l2_decay")),
    (LSQQuantizer, ("bits", "signed", "role")),
    (DSQQuantizer, ("bits", "hard", "hard_threshold", "ste_forward")),
    (DoReFaActQuantizer, ("bits", "grad_bits", "per_sample", "seed")),
    (BinaryActQuantizer, ("bits",)),
    (ABCActQuantizer, ("bits", "ste_gain")),  # v / beta: tensors in the file
    (DynamicFixedPointQuantizer, ("bits", "rounding", "seed")),
    (FP8TrainingQuantizer, ("bits", "fmt", "grad_fmt", "saturate", "grad_saturate",
                            "rounding", "grad_rounding", "seed", "accumulation", "chunk_size",
                            "acc_dtype")),
    (ValueAwareQuantizer, ("bits", "ratio", "symmetric", "name")),
    (CalibratedQuantizer, _calibrated_kwargs),
)}


def _act_spec(aq: nn.Module | None) -> dict | None:
    if aq is None:
        return None
    entry = ACT_QUANTIZERS.get(type(aq).__name__)
    if entry is None or type(aq) is not entry[0]:
        return {"type": type(aq).__name__}  # rebuilt only from the model passed to load_packed
    try:
        kwargs = entry[1](aq) if callable(entry[1]) else {a: getattr(aq, a) for a in entry[1]}
        json.dumps(kwargs)  # plain values only
    except TypeError:
        return {"type": type(aq).__name__}  # rebuilt only from the model passed to load_packed
    return {"type": type(aq).__name__, "kwargs": kwargs, "enabled": bool(aq.enabled)}


def _source(m: nn.Module) -> dict | None:
    """What a fake-quant layer was packed from: its weight quantizer's type and bit width,
    stored in the file to name what differs on load (None for PQ / plain layers)."""
    wq = getattr(m, "weight_quantizer", None)
    if wq is None:
        return None
    return {"weight_quantizer": type(wq).__name__, "bits": getattr(wq, "bits", None)}


def packed_specs(model: nn.Module) -> dict:
    return {n: {**m.spec(), "act_quantizer": _act_spec(m.act_quantizer)}
            for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def storage_bits(model: nn.Module) -> int:
    """Bits of every tensor :func:`save_packed` writes (uint8 PQ indices: 8 bits each;
    a tensor shared by several keys, e.g. tied weights, once)."""
    compact = set(_compact_index_keys(model))
    state = model.state_dict()
    aliases = _aliases(state)
    return sum(t.numel() * (8 if k in compact else t.element_size() * 8)
               for k, t in state.items() if k not in aliases)


def _aliases(state: dict) -> dict[str, str]:
    """{key: earlier key holding the very same tensor data} (tied weights)."""
    first, out = {}, {}
    for k, t in state.items():
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype)
        if t.numel() and sig in first:
            out[k] = first[sig]
        else:
            first.setdefault(sig, k)
    return out


def _compact_index_keys(model: nn.Module) -> list[str]:
    """State-dict keys of PQ layers left unpacked (e.g. PQEmbedding, PQConv2d) whose int64
    assignments fit in uint8 (K <= 256): they are written as uint8 and widened on load."""
    return sorted(f"{n}.assignments" if n else "assignments" for n, m in model.named_modules()
                  if has_codebook(m) and m.centroids.shape[-2] <= 256
                  and m.assignments.dtype == torch.int64)


FILE_VERSION = "2"  # qtrain packed-file metadata: 2 = sha256 checksum + run info + sources
RUN_KEYS = ("recipe", "method", "bits", "act_bits")


def run_info(cfg) -> dict:
    """The configuration a packed file records (and :func:`load_run` compares): the recipe,
    the quantization method (``quant._target_``) and its weight / activation bit widths."""
    from omegaconf import OmegaConf

    def get(key):
        v = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v

    return {"recipe": get("recipe_name") or get("hydra_recipe"), "method": get("quant._target_"),
            "bits": get("quant.bits"), "act_bits": get("quant.act_bits")}


def checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over every metadata entry but ``sha256`` itself and every tensor's name, dtype,
    shape and raw bytes (sorted by name): what :func:`save_packed` stores as ``sha256`` and
    :func:`load_packed` recomputes."""
    h = hashlib.sha256()
    for k in sorted(meta):
        if k != "sha256":
            h.update(json.dumps([k, meta[k]]).encode())
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def save_packed(model: nn.Module, path: str | os.PathLike, run: dict | None = None) -> dict:
    """Write ``model``'s state dict + metadata to ``path`` (atomically: a temporary file in
    the same folder, then a rename); returns a size report.

    The metadata holds the kernel layout version, the per-layer specs (format, bits, what
    each layer was packed from, its activation quantizer), ``run`` (recipe / method / bit
    widths, :func:`run_info`) and a SHA-256 :func:`checksum` of the tensors and metadata."""
    raw = model.state_dict()
    aliases = _aliases(raw)
    state = {k: v.detach().contiguous().cpu() for k, v in raw.items() if k not in aliases}
    compact = [k for k in _compact_index_keys(model) if k not in aliases]
    for k in compact:
        state[k] = state[k].to(torch.uint8)
    meta = {"format_version": str(FORMAT_VERSION), "layout": LAYOUT,
            "file_version": FILE_VERSION, "run": _dumps(run or {}), "tied": _dumps(aliases),
            "layers": _dumps(packed_specs(model)), "uint8_indices": _dumps(compact)}
    meta["sha256"] = checksum(state, meta)
    write_atomic(save(state, metadata=meta), path)
    size = os.path.getsize(path)
    bits = storage_bits(model)
    return {"path": str(path), "file_bytes": size, "storage_bits": bits,
            "storage_bytes": bits // 8, "n_packed_layers": len(packed_specs(model))}


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


_REDO = "re-export it (python train.py ... export=true, or qtrain.export.save_packed)"


def _read(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a packed file, its version and checksum verified; every way a
    file can be unreadable (missing, truncated, not safetensors, edited) is one DataFileError
    naming the file."""
    if not os.path.isfile(path):
        raise DataFileError(f"packed file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DataFileError(f"packed file {path} cannot be read as safetensors ({e}): it is "
                            f"truncated or not a packed file; {_REDO}") from None
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise DataFileError(f"packed file {path}: format_version="
                            f"{meta.get('format_version')!r}; expected {FORMAT_VERSION!r}")
    if meta.get("layout") != LAYOUT:
        raise DataFileError(f"packed file {path}: layout={meta.get('layout')!r}; "
                            f"expected {LAYOUT!r}")
    if meta.get("file_version") != FILE_VERSION or "sha256" not in meta:
        raise DataFileError(f"packed file {path}: file_version={meta.get('file_version')!r} "
                            f"without a checksum (this qtrain writes and reads version "
                            f"{FILE_VERSION!r}); {_REDO}")
    if checksum(tensors, meta) != meta["sha256"]:
        raise DataFileError(f"packed file {path}: SHA-256 checksum mismatch -- its tensors or "
                            f"metadata changed after it was written (corrupt copy); {_REDO}")
    return meta, tensors


def _json(meta: dict, key: str, default: str, path):
    try:
        return json.loads(meta.get(key, default))
    except json.JSONDecodeError as e:
        raise DataFileError(f"packed file {path}: metadata {key!r} is not JSON ({e})") from None


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
    meta, tensors = _read(path)
    for k in _json(meta, "uint8_indices", "[]", path):
        if k not in tensors or tensors[k].dtype != torch.uint8:
            raise DataFileError(f"packed file {path}: {k!r} should be a uint8 index tensor")
        tensors[k] = tensors[k].to(torch.int64)
    for alias, src in _json(meta, "tied", "{}", path).items():
        if src not in tensors or alias in tensors:
            raise DataFileError(f"packed file {path}: tied tensor {alias!r} -> {src!r} is "
                                "inconsistent (source missing or alias stored twice)")
        tensors[alias] = tensors[src]
    specs = _json(meta, "layers", "{}", path)
    model = copy.deepcopy(model)
    _rebuild(model, specs, backend, path, _json(meta, "run", "{}", path), expect)
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
