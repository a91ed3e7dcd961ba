"""``sparse_shared`` packed format (qtrain.nn.packed_sparse): bit streams against a brute-force
bit loop, a hand-encoded stream, a real pruned + shared layer (size vs the run summary),
load validation, and export -> load_packed after a real Trainer run of the callback."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.callbacks import deep_compression as DC
from qtrain.export import checksum, load_packed, pack_model, save_packed
from qtrain.nn import packed_sparse as S
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.packed import PackedConv2d, PackedLinear
from qtrain.quant import kmeans as KM
from qtrain.quant import pruning as P
from qtrain_kernels import layout as L
from tests.callbacks.test_deep_compression import TinyMLP, _loader, _trainer
from tests.callbacks.tiny_lightning import TinyCNN, image_loader


def _brute_pack(values, width):
    """Reference: set every bit one at a time (stream bit j = bit j % 32 of word j // 32)."""
    n_words = -(-len(values) * width // 32)
    words = [0] * n_words
    for i, v in enumerate(values):
        for b in range(width):
            if (v >> b) & 1:
                j = i * width + b
                words[j // 32] |= 1 << (j % 32)
    return [w - 2**32 if w >= 2**31 else w for w in words]  # as int32


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_bit_stream_matches_bruteforce_and_round_trips(data):
    width = data.draw(st.integers(1, 16))
    values = data.draw(st.lists(st.integers(0, 2**width - 1), max_size=70))
    v = torch.tensor(values, dtype=torch.int64)
    words = S.pack_bits(v, width)
    assert words.dtype == torch.int32 and words.tolist() == _brute_pack(values, width)
    assert S.unpack_bits(words, width, len(values)).tolist() == values
    if width in L.CONTAINERS:  # the same words as the kernels' layout for 1/2/4/8 bits
        assert torch.equal(L.pack_codes(v.reshape(1, -1), width).reshape(-1), words)


def test_bit_stream_uses_layout_pack_codes_and_rejects_bad_input():
    v = torch.arange(16) % 4
    assert torch.equal(S.pack_bits(v, 2), L.pack_codes(v.reshape(1, -1), 2).reshape(-1))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        S.pack_bits(torch.tensor([32]), 5)
    with pytest.raises(ValueError, match="width"):
        S.pack_bits(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="2 words"):
        S.unpack_bits(torch.zeros(1, dtype=torch.int32), 5, 7)  # 35 bits need 2 words


def test_hand_encoded_stream_fillers_decoded_by_code():
    # 32 weights, non-zeros at flat 7, 15 and 24; 3-bit indices (largest gap 8).
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask.view(-1)[[7, 15, 24]] = True
    codes = torch.zeros(4, 8, dtype=torch.long)
    codes.view(-1)[[7, 15, 24]] = torch.tensor([2, 0, 1])
    c = torch.tensor([-1.5, 0.25, 3.0])  # K = 3 -> 2-bit codes, filler code 3
    b = S.encode(mask, codes, c, 3)
    # entries: 7 (z=7, real) | 15 (z=7, real) | filler at 23 (z=7) | 24 (z=0)
    # three entries with z = 7: only the code (3 = filler) tells the filler apart
    z, sym = [7, 7, 7, 0], [2, 0, 3, 1]
    assert b["ss_index"].tolist() == [sum(v << (3 * i) for i, v in enumerate(z))]  # 12 bits
    assert b["ss_codes"].tolist() == [sum(v << (2 * i) for i, v in enumerate(sym))]  # 8 bits
    assert b["ss_meta"].tolist() == [4, 8, 3, 4, 2, 3]
    m = PackedLinear._new(8, 4, "sparse_shared", 2, None, True, "torch", None, **b)
    ref = torch.zeros(32)
    ref[[7, 15, 24]] = torch.tensor([3.0, -1.5, 0.25])
    assert torch.equal(m.dequantize(), ref.reshape(4, 8))


def _shared_layer(out_f, in_f, sparsity, bits, index_bits, seed=0):
    """A real pruned + k-means-shared layer as the callback builds it (K = 2^bits - 1)."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    mask = P.magnitude_mask(lin.weight, sparsity)
    surv = lin.weight.detach()[mask]
    cent, a = KM.scalar_kmeans(surv, bits, 10, seed, init="linear", n_centroids=2**bits - 1)
    codes = torch.zeros(lin.weight.shape, dtype=torch.long)
    codes[mask] = a
    q = DC.SharedWeightQuantizer(P.code_bits_for(cent.numel()), cent.float(), codes, mask,
                                 index_bits)
    return QuantLinear.from_float(lin, q, None), mask, codes, cent


def test_real_layer_file_bits_match_summary_and_decode_exactly(tmp_path):
    # LeNet-300-100's fc1 as in the recipe: 92% pruned, 6-bit sharing, 5-bit indices
    fq, mask, codes, cent = _shared_layer(300, 784, 0.92, 6, 5)
    model = nn.Sequential(fq)
    packed = pack_model(model)
    layer = packed[0]
    assert isinstance(layer, PackedLinear) and layer.fmt == "sparse_shared"
    assert torch.equal(layer.dequantize(), fq.quantized_weight().detach())
    r = P.sparse_layer_size(mask, codes, cent.numel(), 5, bias_numel=300)
    assert r.fillers > 0 and r.code_bits == 6
    file_bits = sum(t.numel() * t.element_size() * 8 for t in layer.buffers())
    assert abs(file_bits - r.shared_bits) <= 0.01 * r.shared_bits
    # exactly: word padding of the two streams + the 6 int32 metadata
    e = r.nnz + r.fillers
    pad = 32 * (S.stream_words(e, 5) + S.stream_words(e, 6)) - 11 * e
    assert file_bits == r.shared_bits + pad + 6 * 32
    info = save_packed(packed, tmp_path / "fc1.safetensors")
    assert info["storage_bits"] == file_bits
    x = torch.randn(4, 784)
    loaded = load_packed(tmp_path / "fc1.safetensors", model)
    assert torch.equal(loaded(x), fq(x))


def _rewrite(src, dst, fn):
    with safe_open(str(src), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fn(t)
    meta = {**meta, "sha256": checksum(t, meta)}  # re-signed: test what lies beyond it
    save_file(t, str(dst), metadata=meta)


def test_load_validates_lengths_dtypes_and_stream(tmp_path):
    fq, *_ = _shared_layer(20, 30, 0.8, 3, 2)
    model = nn.Sequential(fq)
    good = tmp_path / "good.safetensors"
    save_packed(pack_model(model), good)
    cases = {  # what -> (corruption, the error it must raise)
        "index": (lambda t: t.update({"0.ss_index": t["0.ss_index"][:-1].clone()}),
                  r"0\.ss_index is"),
        "codebook": (lambda t: t.update({"0.ss_codebook": t["0.ss_codebook"].half()}),
                     r"0\.ss_codebook is"),
        "meta": (lambda t: t.update({"0.ss_meta": t["0.ss_meta"][:5].clone()}),
                 r"0\.ss_meta is"),
        "nnz": (lambda t: t["0.ss_meta"].__setitem__(2, int(t["0.ss_meta"][2]) - 1),
                "non-filler entries; ss_meta says nnz"),
        "shape": (lambda t: t["0.ss_meta"].__setitem__(1, 31), "ss_meta shape"),
    }
    for what, (fn, err) in cases.items():
        bad = tmp_path / f"{what}.safetensors"
        _rewrite(good, bad, fn)
        with pytest.raises(ValueError, match=err):
            load_packed(bad, model)
    load_packed(good, model)  # the untouched file loads


def test_export_after_real_trainer_run_matches_fake_quant(tmp_path):
    # 2-bit indices on a 12x24 / 24x4 MLP at 75% sparsity: long gaps -> filler zeros
    cb = DC.DeepCompressionCallback(sparsity={"Linear": 0.75}, bits={"Linear": 3},
                                    index_bits={"Linear": 2}, prune_epochs=[0],
                                    quantize_epoch=1, report_file="dc.json")
    model = TinyMLP()
    _trainer(tmp_path, 3, [cb]).fit(model, _loader())
    rep = json.loads((tmp_path / "dc.json").read_text())["layers"]
    assert rep["fc1"]["fillers"] > 0 and rep["fc1"]["n_centroids"] == 7
    model.eval()
    packed = pack_model(model)
    assert all(getattr(packed, n).fmt == "sparse_shared" for n in ("fc1", "fc2"))
    save_packed(packed, tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors", model).eval()
    x = torch.randn(16, 12)
    assert torch.equal(loaded(x), model(x))
    for n in ("fc1", "fc2"):  # the stored fillers carry the reserved code K = 7
        _, c = S._positions(getattr(loaded, n))
        assert int((c == 7).sum()) == rep[n]["fillers"]


def test_export_conv_after_real_trainer_run(tmp_path):
    cb = DC.DeepCompressionCallback(sparsity={"Linear": 0.5, "Conv2d": 0.6},
                                    bits={"Linear": 4, "Conv2d": 5}, prune_epochs=[0],
                                    quantize_epoch=1, report_file=None)
    model = TinyCNN()
    _trainer(tmp_path, 2, [cb]).fit(model, image_loader())
    assert isinstance(model.conv1, QuantConv2d)
    model.eval()
    save_packed(pack_model(model), tmp_path / "c.safetensors")
    loaded = load_packed(tmp_path / "c.safetensors", model).eval()
    assert isinstance(loaded.conv1, PackedConv2d) and loaded.conv1.fmt == "sparse_shared"
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(loaded(x), model(x))
