"""qtrain.nn.packed_registry: a quantizer packed through one registration (pack, check, save,
load), lookup precedence, and the registry's own consistency checks."""

import pytest
import torch
from torch import nn

from qtrain.export import check_packable, load_packed, pack_model, save_packed
from qtrain.nn import packed_registry as R
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.packed import PackedLinear
from qtrain.nn.quantizer_base import Quantizer


class SignQuantizer(Quantizer):
    """A quantizer no module of qtrain knows: sign(w) * mean|w| per row."""

    def quantize(self, x):
        return torch.where(x >= 0, 1.0, -1.0) * x.abs().mean(dim=1, keepdim=True)


class SubSign(SignQuantizer):
    pass


def _pack_sign(m, wq, name, bias, backend, scale_dtype):
    w = m.weight.detach().float()
    return PackedLinear.from_binary(torch.where(w >= 0, 1.0, -1.0), w.abs().mean(1, keepdim=True),
                                    bias, backend, torch.float32)


def _net(q):
    torch.manual_seed(0)
    return nn.Sequential(QuantLinear.from_float(nn.Linear(16, 6), q), nn.ReLU(),
                         nn.Linear(6, 3)).eval()


def test_one_registration_packs_checks_saves_and_loads(monkeypatch, tmp_path):
    m = _net(SignQuantizer(1))
    with pytest.raises(ValueError, match=r"0 \(SignQuantizer\)"):
        check_packable(m)  # not registered: one error before training
    monkeypatch.setitem(R.PACKERS, SignQuantizer,
                        R.Packer(SignQuantizer, _pack_sign, ("binary",), "sign test"))
    check_packable(m)
    x = torch.randn(4, 16)
    p = pack_model(m, backend="torch")
    assert p[0].fmt == "binary"
    w = m[0].weight.detach()
    want = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)  # by hand
    assert torch.equal(p[0].dequantize(), want)
    assert torch.equal(p(x), m(x))
    save_packed(p, tmp_path / "s.safetensors")
    q = load_packed(tmp_path / "s.safetensors", _net(SignQuantizer(1)), backend="torch")
    assert torch.equal(q(x), m(x))
    # the label joins the list of packable quantizers every unpackable-layer error shows
    with pytest.raises(ValueError, match=r"packable: .*sign test"):
        check_packable(_net(Quantizer(8)))


def test_lookup_exact_then_base_with_subclasses_then_protocol(monkeypatch):
    exact = R.Packer(SignQuantizer, _pack_sign, ("binary",), "exact")
    monkeypatch.setattr(R, "PACKERS", {SignQuantizer: exact})
    monkeypatch.setattr(R, "PROTOCOLS", {})
    assert R.packer_for(SignQuantizer(1)) is exact
    assert R.packer_for(SubSign(1)) is None  # exact-only entry: not for subclasses
    base = R.Packer(Quantizer, _pack_sign, ("binary",), "base", subclasses=True)
    R.PACKERS[Quantizer] = base
    assert R.packer_for(SubSign(1)) is base  # nearest base class that allows subclasses
    assert R.packer_for(Quantizer(8)) is base
    R.PACKERS.pop(Quantizer)
    proto = R.Packer(object, _pack_sign, ("binary",), "proto")
    R.PROTOCOLS["quantize"] = proto
    assert R.packer_for(SubSign(1)) is proto


def test_embeddings_only_where_the_packer_says(monkeypatch):
    monkeypatch.setitem(R.PACKERS, SignQuantizer, R.Packer(
        SignQuantizer, _pack_sign, ("binary",), "sign", embeddings=False))
    emb = nn.Sequential(QuantEmbedding.from_float(nn.Embedding(8, 16), SignQuantizer(1)))
    assert type(pack_model(emb)[0]) is QuantEmbedding  # left as it is
    monkeypatch.setitem(R.PACKERS, SignQuantizer, R.Packer(
        SignQuantizer, _pack_sign, ("binary",), "sign"))
    assert pack_model(emb)[0].fmt == "binary"


def test_registry_rejects_inconsistent_entries(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown formats \['nope'\]"):
        R.register_packer(R.Packer(SignQuantizer, _pack_sign, ("nope",), "x"))
    with pytest.raises(ValueError, match="'lut' registered twice"):
        R.register_format(R.Format("lut", lambda m, want: None, ()))
    # a packer writing a format it is not registered for is caught at pack time
    monkeypatch.setitem(R.PACKERS, SignQuantizer,
                        R.Packer(SignQuantizer, _pack_sign, ("ternary",), "sign"))
    with pytest.raises(RuntimeError, match=r"wrote format 'binary'.*\('ternary',\)"):
        pack_model(_net(SignQuantizer(1)))
    with pytest.raises(ValueError, match=r"fmt='nope'; allowed: \('uniform', 'ternary'"):
        PackedLinear(4, 2, "nope", 4)


def test_every_packer_writes_registered_formats():
    import qtrain.export  # noqa: F401  (every packer registered)

    assert R.PACKERS and R.LAYERS and set(R.FORMATS) >= {"uniform", "rq", "sparse_shared"}
    for p in [*R.PACKERS.values(), *R.PROTOCOLS.values()]:
        assert p.label and set(p.formats) <= set(R.FORMATS), p
    for f in R.FORMATS.values():
        assert callable(f.validate) and f.buffers, f.name
