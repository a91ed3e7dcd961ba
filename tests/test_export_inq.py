"""Export of INQ (power-of-two) layers: b-bit codes + n1 per layer, identical outputs, sizes."""

import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.callbacks.inq import INQCallback
from qtrain.export import checksum, load_packed, pack_model, save_packed
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import PowerOfTwoQuantizer
from qtrain.nn.packed import PackedConv2d, PackedLinear, pow2_codes, pow2_values
from qtrain.quant.size import model_storage_bits
from tests.callbacks.tiny_lightning import TinyCNN, image_loader, trainer


@pytest.fixture(scope="module")
def inq_cnn():
    """TinyCNN after a full (short) INQ run: conv/fc are power-of-two fake-quant layers,
    BatchNorm statistics have moved away from their defaults."""
    pl.seed_everything(0)
    model = TinyCNN()
    cb = INQCallback(bits=5, schedule=[0.5, 1.0], boundaries=[0, 2], unit="step")
    trainer(max_steps=4, callbacks=[cb]).fit(model, image_loader(n=32, batch=8))
    model.trainer = None  # detach from the finished Trainer (pack_model deep-copies)
    return model.eval()


def test_pow2_codes_roundtrip_and_bit_budget():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=g)
    for bits in (2, 3, 5, 8):
        codes, n1 = pow2_codes(w, bits)
        assert int(codes.max()) < 2**bits and int(codes.min()) >= 0  # exactly b bits
        ref = PowerOfTwoQuantizer(bits)(w)  # the fake-quant forward
        assert torch.equal(pow2_values(codes, n1, bits), ref)
        # hand-worked code of the largest level +2^n1: sign 0, exponent index 1
        i = int(ref.flatten().argmax())
        assert int(codes.flatten()[i]) == 1 and ref.flatten()[i] == 2.0**n1
        zero = ref.flatten() == 0
        assert (codes.flatten()[zero] == 0).all()
        neg = ref.flatten() < 0
        assert (codes.flatten()[neg] >= 2 ** (bits - 1)).all()


def test_inq_cnn_export_load_identical(inq_cnn, tmp_path):
    m = inq_cnn
    assert isinstance(m.conv1, QuantConv2d) and isinstance(m.fc, QuantLinear)
    assert isinstance(m.conv1.weight_quantizer, PowerOfTwoQuantizer)
    assert m.bn1.running_mean.abs().sum() > 0
    x = torch.randn(5, 3, 4, 4)
    ref = m(x)
    p = pack_model(m, backend="auto")
    assert isinstance(p.conv1, PackedConv2d) and p.conv1.fmt == "pow2"
    assert isinstance(p.fc, PackedLinear) and p.fc.fmt == "pow2" and p.fc.bits == 5
    assert torch.equal(p(x), ref)
    save_packed(p, tmp_path / "inq.safetensors")
    q = load_packed(tmp_path / "inq.safetensors", TinyCNN().eval())
    assert isinstance(q.conv2, PackedConv2d) and q.conv2.fmt == "pow2"
    assert torch.equal(q(x), ref)
    assert torch.equal(q.bn1.running_mean, m.bn1.running_mean)
    assert torch.equal(q.bn1.running_var, m.bn1.running_var)
    # stored weights are the fake-quant weights, value for value
    assert torch.equal(q.fc.dequantize(), m.fc.quantized_weight())


def test_file_size_within_one_percent_of_storage_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear.from_float(nn.Linear(300, 500), PowerOfTwoQuantizer(5)), nn.ReLU(),
        QuantLinear.from_float(nn.Linear(500, 70, bias=False), PowerOfTwoQuantizer(3)))
    summary = {r.name: r.bits for r in model_storage_bits(model).layers}
    assert summary["0"] == 5 * 300 * 500 + 8 + 32 * 500  # b bits/weight + n1 + fp32 bias
    assert summary["2"] == 3 * 500 * 70 + 8
    p = pack_model(model)
    info = save_packed(p, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        in_file = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for layer in ("0", "2"):
        bits = sum(t.numel() * t.element_size() * 8 for k, t in in_file.items()
                   if k.startswith(layer + "."))
        assert abs(bits - summary[layer]) / summary[layer] < 0.01, layer
    total = model_storage_bits(model).total_bits
    with open(tmp_path / "w.safetensors", "rb") as f:  # safetensors: u64 header length first
        header = 8 + int.from_bytes(f.read(8), "little")
    assert header < 2048  # tensor names / offsets, layer specs, run info, checksum
    assert abs((info["file_bytes"] - header) * 8 - total) / total < 0.01
    x = torch.randn(4, 300)
    q = load_packed(tmp_path / "w.safetensors", nn.Sequential(
        nn.Linear(300, 500), nn.ReLU(), nn.Linear(500, 70, bias=False)))
    assert torch.equal(q(x), model(x))


def _rewrite(src, out, replace=None, meta_update=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    t.update(replace or {})
    meta.update(meta_update or {})
    meta["sha256"] = checksum(t, meta)  # re-signed: test the validation beyond the checksum
    save_file(t, str(out), metadata=meta)
    return out


def test_corrupted_or_mismatched_file_clear_error(inq_cnn, tmp_path):
    src = tmp_path / "a.safetensors"
    save_packed(pack_model(inq_cnn), src)
    with safe_open(str(src), framework="pt") as f:
        planes = f.get_tensor("fc.planes")
    bad = _rewrite(src, tmp_path / "n1.safetensors",
                   {"fc.n1": torch.tensor([3], dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"fc\.n1 is .*int32.* expected .*int8"):
        load_packed(bad, TinyCNN())
    bad = _rewrite(src, tmp_path / "p.safetensors", {"fc.planes": planes[:4]})
    with pytest.raises(ValueError, match=r"fc\.planes is .* shape \(5, 1, 16\)"):
        load_packed(bad, TinyCNN())
    corrupt = planes.clone()
    corrupt[:4] = -1  # every low bit set: exponent index 15 > 2^(5-2) = 8
    bad = _rewrite(src, tmp_path / "c.safetensors", {"fc.planes": corrupt})
    with pytest.raises(ValueError, match=r"fc has power-of-two exponent index 15; .*0\.\.8"):
        load_packed(bad, TinyCNN())

    class Other(TinyCNN):  # mismatched architecture
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 4 * 4, 5)

    with pytest.raises(ValueError, match=r"fc: weight shape \(4, 128\) in the file, \(5, 128\) in"):
        load_packed(src, Other())
