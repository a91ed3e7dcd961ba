"""Interop export: a qtrain-quantized Hugging Face transformers model as a ``save_pretrained``
folder in the compressed-tensors format, which ``transformers`` loads without qtrain (the
checkpoint format of llm-compressor, which vLLM also reads).

The folder (what ``PreTrainedModel.save_pretrained`` writes for a quantized checkpoint):

* ``config.json`` -- the model's own config (``architectures``, ``dtype: float32``) with a
  ``quantization_config`` of ``quant_method: "compressed-tensors"``,
  ``quantization_status: "compressed"`` and one ``config_groups`` entry per distinct weight
  scheme and storage format (``num_bits``, ``type: int``, ``symmetric``, ``strategy``
  ``channel`` / ``group`` with ``group_size``; no ``input_activations``: weight-only); the
  top-level ``format`` is the one format used, or ``"mixed-precision"``. Each group's
  ``targets`` are ``re:`` regexes naming its layers, anchored at the end and with the
  base-model prefix (``bert.``) optional, so ``AutoModel`` (``BertModel``) and the task model
  (``BertForSequenceClassification``) both match them; a layer of a mixed-precision run
  (Q-BERT / HAWQ bit allocation) lands in the group of its bit width.
* ``model.safetensors`` -- every float tensor of the model under its usual name; for each
  quantized ``Linear`` / ``Embedding`` (rows = output channels / table rows, the ``(N, K)``
  weight layout) instead of ``weight``:

  - ``pack-quantized`` (``fmt``'s default, symmetric ``Linear`` weights): ``weight_packed``
    int32 ``(N, ceil(K b / 32))``, the codes ``u = q + 2^(b-1)`` (offset binary) packed
    densely along each row, element ``k`` at bits ``[k b, k b + b)`` of the row's bit
    stream, least significant bit first (for b in 1, 2, 4, 8 this is qtrain's own int32
    layout, :mod:`qtrain_kernels.layout`; 3, 5, 6, 7-bit codes are repacked without
    containers); ``weight_shape`` int64 ``[N, K]``;
  - ``naive-quantized`` (``fmt="naive-quantized"``, and always for embeddings and
    asymmetric weights): ``weight`` int8 ``q`` ``(N, K)``, asymmetric weights add
    ``weight_zero_point`` int8 ``(N, K / G)``. Why always: transformers 5.24 initialises
    every ``nn.Embedding`` through ``module.weight``, which a pack-quantized one no longer
    has (AttributeError at load), and with compressed-tensors 0.20.1 it expects an
    asymmetric pack-quantized zero-point unpacked ``(N, K / G)`` while the decompressor
    unpacks a packed int32 one (load fails with a size mismatch either way; cf.
    vllm-project/llm-compressor#1618) -- both measured here;
  - ``weight_scale`` float32 ``(N, 1)`` per channel or ``(N, K / G)`` per group.

  compressed-tensors dequantizes ``(q - zp) * scale`` in the scale's dtype with signed codes
  ``q in [-2^(b-1), 2^(b-1) - 1]`` for symmetric and asymmetric weights alike; qtrain's
  ``(u - z) * s`` (Jacob et al. 2018 eq. (1), unsigned affine codes ``u`` with zero-point
  ``z``; symmetric codes stored offset-binary) maps to it exactly with ``q = u - 2^(b-1)``,
  ``zp = z - 2^(b-1)`` (symmetric: no zero-point), and float32 scales (float16-stored scales
  widen exactly): the weights transformers rebuilds are bit-identical to the trained
  fake-quant weights, so outputs differ only by float summation order.
* the tokenizer (``AutoTokenizer.from_pretrained(<source folder>).save_pretrained``) when
  the source folder (``HFSequenceClassifier.name_or_path``, or ``tokenizer=``) holds one.

What it exports: packed ``uniform`` weights (:func:`qtrain.export.pack_model`: uniform QAT /
PTQ with ``UniformQuantizer``, Q-BERT group-wise, LSQ, calibrated, Quant-Noise int8/int4, ...
anything whose packed format is uniform int) with 1..8-bit integer codes and integer
zero-points, per output channel / per tensor (stored per channel) or per group of ``G``
consecutive inputs, on ``nn.Linear`` / ``nn.Embedding`` layers of one transformers model.
Anything else -- an enabled activation quantizer (the compressed-tensors static activation
formats round and clip differently from qtrain's), any other packed format (PQ / codebook,
lut, ternary, binary, pow2, float, bucketed, value-aware, residual, sparse), float
zero-points, convolutions, fake-quant layers left unpacked, a quantized embedding tied to the
output layer, parameters outside the transformers model -- is named, every layer at once, in
one :class:`qtrain.errors.ConfigError` listing what is supported (:func:`check_exportable`),
before anything is written.

Loading: ``transformers.AutoModel[ForSequenceClassification].from_pretrained(folder)``
(needs ``compressed-tensors``; the ``hf-export`` extra). On CPU transformers decompresses
the weights to float32 for the forward pass; vLLM runs ``pack-quantized`` int4 / int8
weight-only checkpoints with its own kernels (not verified here: no vLLM on the dev VM).
The files never depend on qtrain.

``train.py ... export_hf=true`` writes ``<run dir>/hf_model/`` and loads it back with
transformers, comparing the logits with the trained model's on a test batch
(``hf_max_abs_diff`` in summary.json); :func:`export_hf` and :func:`max_abs_diff` do the
same from Python, and ``python -m qtrain.export_hf <run dir> --out <folder>`` for a finished
``export=true`` run (its packed model, :func:`qtrain.export.load_run`; checked on a few
sentences through the exported tokenizer).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil

import torch
from torch import nn

from qtrain.atomic_file import write_atomic
from qtrain.errors import ConfigError, MissingFileError, run_cli
from qtrain.export_check import unexportable_layers
from qtrain.export_load import load_run
from qtrain.export_pack import pack_model
from qtrain.export_spec import run_info
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.quantizer_base import Quantizer

FORMATS = ("pack-quantized", "naive-quantized")
DIR_NAME = "hf_model"
SUPPORTED = ("weight-only packed 'uniform' weights with 1..8-bit integer codes and integer "
             "zero-points, per output channel (or per tensor) or per group along the input, "
             "on Linear / Embedding layers of one transformers PreTrainedModel (uniform "
             "QAT/PTQ, LSQ, Q-BERT group-wise, calibrated, Quant-Noise int8/int4); no "
             "activation quantizers")
_QUANT_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


# ------------------------------------------------------------------------ the model
def find_hf_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the transformers ``PreTrainedModel`` in ``model`` (the model itself,
    or e.g. :class:`qtrain.models.hf.HFSequenceClassifier`'s ``hf``); one ConfigError when
    there is none, or several."""
    from transformers import PreTrainedModel

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    outer = [(n, m) for n, m in found
             if not any(n.startswith(f"{o}.") or (o == "" and n) for o, _ in found if o != n)]
    if len(outer) != 1:
        what = "no" if not outer else f"{len(outer)} ({', '.join(n for n, _ in outer)})"
        raise ConfigError(f"Hugging Face export: the model ({type(model).__name__}) holds {what} "
                          "transformers PreTrainedModel; export_hf exports one (model=minilm / "
                          "bert_base / roberta_base, qtrain.models.hf)")
    return outer[0]


def _is_quantizer_active(m: nn.Module) -> bool:
    return isinstance(m, Quantizer) and bool(getattr(m, "enabled", True))


def _layer_problem(m: PackedLinear) -> str | None:
    src = (m.source or {}).get("weight_quantizer")
    frm = f" (from {src})" if src else ""
    if isinstance(m, PackedConv2d):
        return f"convolution{frm}: compressed-tensors quantizes Linear / Embedding layers"
    if m.fmt != "uniform":
        return f"packed format {m.fmt!r}{frm}"
    if not isinstance(m.bits, int) or not 1 <= m.bits <= 8:
        return f"{m.bits}-bit codes"
    if not m.symmetric:
        z = getattr(m, "zeros", None)
        if z is None or z.dtype != torch.uint8:
            return f"non-integer (float) zero-points{frm}"
        if z.numel() and int(z.max()) >= 2 ** m.bits:
            return f"zero-point {int(z.max())} outside the {m.bits}-bit code range"
    aq = m.act_quantizer
    if aq is not None and any(_is_quantizer_active(q) for q in aq.modules()):
        return f"activation quantizer {type(aq).__name__} (activation quantization)"
    if isinstance(m, PackedEmbedding) and m.emb_args.get("max_norm") is not None:
        return "embedding with max_norm"
    return None


def check_exportable(packed: nn.Module) -> tuple[str, nn.Module]:
    """Raise one :class:`ConfigError` naming every layer of ``packed`` (a packed model,
    :func:`qtrain.export.pack_model`) that has no compressed-tensors form, and what is
    supported; returns :func:`find_hf_model`'s (name, transformers model)."""
    prefix, hf = find_hf_model(packed)
    bad = []
    inside = {id(t) for t in hf.parameters()} | {id(t) for t in hf.buffers()}
    outside = [n for n, t in [*packed.named_parameters(), *packed.named_buffers()]
               if id(t) not in inside]
    if outside:
        bad.append(f"{', '.join(outside[:3])} (tensors outside the transformers model "
                   f"{prefix or '<model>'})")
    bad += unexportable_layers(hf, _layer_problem, prefix)
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    inp = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    if tied and out is not None and (isinstance(out, PackedLinear) or isinstance(inp, PackedLinear)):
        bad.append("input / output embeddings (tied in the config, quantized here: the "
                   "compressed checkpoint cannot keep the tie)")
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ConfigError(f"Hugging Face (compressed-tensors) export: {len(bad)} layer(s) have "
                          f"no compressed-tensors form: {'; '.join(bad[:8])}{more}. "
                          f"Supported: {SUPPORTED}")
    return prefix, hf


# ------------------------------------------------------------------------ tensors
def pack_dense(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``(R, C)`` -> int32 ``(R, ceil(C bits / 32))``: each row a
    dense little-endian bit stream, element ``c`` at bits ``[c bits, (c + 1) bits)``, no
    padding between elements (compressed-tensors' ``pack_to_int32`` layout)."""
    if u.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(u.shape)}")
    u = u.to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 ** bits):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] for bits={bits}")
    r, c = u.shape
    words = -(-c * bits // 32)
    out = torch.empty(r, words, dtype=torch.int32)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
    if bits in (1, 2, 4, 8):  # whole codes per word: qtrain's own int32 layout
        from qtrain_kernels import layout as L

        return L.pack_codes(u, bits)
    step = max(1, 2 ** 22 // max(1, c * bits))  # rows per chunk (~4M bits)
    for i in range(0, r, step):
        chunk = u[i:i + step]
        bitstream = ((chunk[:, :, None] >> shifts) & 1).reshape(chunk.shape[0], c * bits)
        bitstream = nn.functional.pad(bitstream, (0, words * 32 - c * bits))
        w = (bitstream.reshape(chunk.shape[0], words, 32) * weights).sum(-1)
        out[i:i + step] = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)
    return out


def layer_tensors(m: PackedLinear, fmt: str = "pack-quantized") -> tuple[dict, dict]:
    """(tensors by local name, compressed-tensors weight args) of one packed ``uniform``
    layer (module doc: codes, scale, zero-point mapping)."""
    from qtrain_kernels import layout as L

    if fmt not in FORMATS:
        raise ConfigError(f"Hugging Face export: format={fmt!r}; allowed: {FORMATS}")
    b, n, k = int(m.bits), m.out_features, m.in_features
    u = L.unpack_codes(m.packed.cpu(), L.container_bits(b), k)  # (N, K) unsigned codes
    off = 2 ** (b - 1)
    ng = m.scales.shape[1]
    args = {"num_bits": b, "type": "int", "symmetric": bool(m.symmetric),
            "strategy": "channel" if ng == 1 else "group",
            "group_size": None if ng == 1 else k // ng, "dynamic": False}
    t = {"weight_scale": m.scales.cpu().to(torch.float32).contiguous()}
    z = None if m.symmetric else m.zeros.cpu().to(torch.int64)
    if fmt == "pack-quantized":
        if z is not None or isinstance(m, PackedEmbedding):
            raise ConfigError("Hugging Face export: pack-quantized is written for symmetric "
                              "Linear weights only (module doc); use naive-quantized")
        t["weight_packed"] = pack_dense(u, b)
        t["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    else:
        t["weight"] = (u - off).to(torch.int8)
        if z is not None:
            t["weight_zero_point"] = (z - off).to(torch.int8).contiguous()
    if m.bias is not None:
        t["bias"] = m.bias.detach().cpu().float().contiguous()
    return t, args


def target_regex(name: str, base_prefix: str | None) -> str:
    """``re:`` target of layer ``name`` (a module name in the task model): anchored at the end,
    any leading scope allowed, the base-model prefix (``bert.``) optional."""
    if base_prefix and name.startswith(f"{base_prefix}."):
        name = name[len(base_prefix) + 1:]
    return rf"re:^(?:.*\.)?{re.escape(name)}$"


def _float_state(hf: nn.Module, packed_names: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``hf``'s state dict outside the packed layers and quantizer modules;
    a tensor shared by several keys (tied weights) once, under its first key."""
    skip = tuple(f"{n}." for n in packed_names)
    skip += tuple(f"{n}." for n, m in hf.named_modules() if isinstance(m, Quantizer) and n)
    out, seen = {}, set()
    for k, v in hf.state_dict().items():
        if k.startswith(skip):
            continue
        sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and sig in seen:
            continue
        seen.add(sig)
        out[k] = v.detach().cpu().contiguous()
    return out


def _save_tokenizer(src: str | None, out_dir: str) -> str | None:
    if not src or not os.path.isdir(src):
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
             "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(src, f)) for f in names):
        return None
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)
    return src


# ------------------------------------------------------------------------ export
@torch.no_grad()
def export_hf(model: nn.Module, out_dir: str | os.PathLike, fmt: str = "pack-quantized",
              tokenizer: str | None = "auto", run: dict | None = None) -> dict:
    """Write ``model`` (a trained qtrain model holding one transformers model: fake-quant
    layers, or already packed) as a compressed-tensors ``save_pretrained`` folder
    ``out_dir`` (module doc). ``tokenizer``: a folder to copy the tokenizer from; "auto"
    (default) the model's ``name_or_path`` folder (:class:`qtrain.models.hf.HFSequenceClassifier`);
    None for none. ``run`` (recipe, method, bits: :func:`qtrain.export.run_info`) goes into
    the safetensors metadata. Returns a report (folder, bytes, layers per scheme).
    Raises one :class:`ConfigError` before writing anything if a layer has no
    compressed-tensors form."""
    from safetensors.torch import save

    if fmt not in FORMATS:
        raise ConfigError(f"Hugging Face export: format={fmt!r}; allowed: {FORMATS}")
    was_training = model.training
    packed = pack_model(model.eval(), backend="torch")
    model.train(was_training)
    prefix, hf = check_exportable(packed)
    base = getattr(hf, "base_model_prefix", None)
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise ConfigError("Hugging Face export: the model has no quantized layer (run a "
                          "quantization recipe, e.g. quant=uniform quant.act=null); "
                          f"supported: {SUPPORTED}")
    state = _float_state(hf, set(layers))
    groups: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        # embeddings and asymmetric weights: naive-quantized always (module doc)
        packable = m.symmetric and not isinstance(m, PackedEmbedding)
        layer_fmt = fmt if packable else "naive-quantized"
        tensors, args = layer_tensors(m, layer_fmt)
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        key = (*(args[k] for k in _QUANT_KEYS), layer_fmt)
        groups.setdefault(key, []).append(name)
    config_groups = {
        f"group_{i}": {"targets": [target_regex(n, base) for n in names],
                       "weights": dict(zip(_QUANT_KEYS, key[:-1])),
                       "input_activations": None, "output_activations": None,
                       "format": key[-1]}
        for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))}
    formats = {key[-1] for key in groups}
    qcfg = {"quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}
    os.makedirs(out_dir, exist_ok=True)
    cfg = copy.deepcopy(hf.config)
    cfg.architectures = [type(hf).__name__]
    cfg.dtype = torch.float32
    cfg.quantization_config = qcfg
    cfg.save_pretrained(out_dir)
    meta = {"format": "pt", "qtrain.run": json.dumps(run or {}, sort_keys=True),
            "qtrain.layers": json.dumps({n: {**dict(zip(_QUANT_KEYS, key[:-1])),
                                             "format": key[-1]}
                                         for key, names in groups.items() for n in names},
                                        sort_keys=True)}
    path = os.path.join(out_dir, "model.safetensors")
    write_atomic(save(state, metadata=meta), path)
    src = (getattr(model, "name_or_path", None) if tokenizer == "auto" else tokenizer)
    tok = _save_tokenizer(src, out_dir)
    return {"hf_dir": os.path.abspath(out_dir), "hf_mb": os.path.getsize(path) / 1e6,
            "hf_format": qcfg["format"], "hf_layers": len(layers), "hf_groups": len(config_groups),
            "hf_tokenizer": tok, "hf_prefix": prefix}


# ------------------------------------------------------------------------ checking
def load(out_dir: str | os.PathLike) -> nn.Module:
    """The exported folder loaded by transformers alone (the class named in its config's
    ``architectures``), float32, eval mode."""
    import transformers

    with open(os.path.join(out_dir, "config.json")) as f:
        arch = (json.load(f).get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, transformers.AutoModel)
    return cls.from_pretrained(str(out_dir), dtype=torch.float32).eval()


HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def max_abs_diff(out_dir: str | os.PathLike, model: nn.Module, batch: dict) -> float:
    """Largest |difference| between the logits (first output) of the exported folder, loaded
    by transformers (:func:`load`), and ``model`` (the trained qtrain model: its
    ``forward(batch)``, or the transformers model's ``forward(**inputs)``) on ``batch``."""
    from transformers import PreTrainedModel

    inputs = {k: batch[k].cpu() for k in HF_INPUTS if k in batch}
    was_training = model.training
    model.eval()
    try:
        ref = model(**inputs) if isinstance(model, PreTrainedModel) else model(batch)
    finally:
        model.train(was_training)
    got = load(out_dir)(**inputs)
    ref = ref[0] if not isinstance(ref, torch.Tensor) else ref
    return float((got[0] - ref.float().cpu()).abs().max())


def export_run(run_dir: str, dm, module, run: dict | None = None,
               fmt: str = "pack-quantized") -> dict:
    """``train.py ... export_hf=true``: the trained model written to ``<run dir>/hf_model/``
    and loaded back with transformers; its logits on the first test batch are compared with
    the trained model's (``hf_max_abs_diff`` in the summary)."""
    out = os.path.join(run_dir, DIR_NAME)
    if os.path.isdir(out):
        shutil.rmtree(out)
    model = module.model
    device = next(model.parameters()).device
    model.cpu()
    try:
        info = export_hf(model, out, fmt=fmt, run=run)
        dm.setup("test")
        batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
        x = module.split_batch(batch)[0]
        if not isinstance(x, dict):
            raise ConfigError("export_hf=true: the run's batches are not transformers input "
                              "dicts (input_ids, attention_mask, ...)")
        info["hf_max_abs_diff"] = max_abs_diff(out, model, x)
    finally:
        model.to(device)
    return info


def preflight(model: nn.Module) -> None:
    """Raise :func:`check_exportable`'s error for ``model`` (a fake-quant model after the
    method's conversion) before training: a copy with every quantizer enabled (a float
    phase may still have them off) is packed and checked."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, Quantizer):
            m.enabled = True
    check_exportable(pack_model(twin.eval(), backend="torch"))


# ------------------------------------------------------------------------ CLI
SENTENCES = ("a gripping, beautifully shot film", "the plot never comes together",
             "not bad at all", "it was very, very long")


def _check_batch(out_dir: str, vocab_size: int) -> dict:
    """Token ids of :data:`SENTENCES` through the exported tokenizer, or (no tokenizer)
    fixed pseudo-random ids below ``vocab_size``."""
    if os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        enc = AutoTokenizer.from_pretrained(out_dir)(list(SENTENCES), padding=True,
                                                     return_tensors="pt")
        return {k: enc[k] for k in HF_INPUTS if k in enc}
    ids = torch.randint(0, vocab_size, (len(SENTENCES), 16),
                        generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    p = argparse.ArgumentParser(prog="python -m qtrain.export_hf",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory of `train.py ... export=true` "
                   "(config_resolved.yaml + model_packed.safetensors)")
    p.add_argument("--out", required=True, help="the save_pretrained folder to write")
    p.add_argument("--format", default="pack-quantized", choices=FORMATS,
                   help="storage of symmetric Linear weights (module doc)")
    a = p.parse_args(argv)
    for f in ("config_resolved.yaml", "model_packed.safetensors"):
        if not os.path.isfile(os.path.join(a.run_dir, f)):
            raise MissingFileError(f"{a.run_dir}: no {f}; pass the directory of a finished "
                                   "`python train.py ... export=true` run")
    model = load_run(a.run_dir, backend="torch")
    info = export_hf(model, a.out, fmt=a.format, run=run_info(
        OmegaConf.load(os.path.join(a.run_dir, "config_resolved.yaml"))))
    _, hf = find_hf_model(model)
    info["hf_max_abs_diff"] = max_abs_diff(a.out, model,
                                           _check_batch(a.out, hf.config.vocab_size))
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    run_cli(main)
