"""Packed files (qtrain.export): a flipped bit, a truncated or garbage file, a file of another
configuration each raise one DataFileError naming the file (and what differs); the packed
model of every activation-quantizer family reloads from the file alone and reproduces the
trained fake-quant model bit for bit (float32 scales, the forward's precision)."""

import json
import struct

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from qtrain.errors import DataFileError
from qtrain.export import (
    ACT_QUANTIZERS,
    load_packed,
    load_run,
    pack_model,
    save_packed,
)
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import (
    BinaryActQuantizer,
    BinaryWeightQuantizer,
    DynamicFixedPointQuantizer,
)
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from qtrain.nn.learned_quantizers import (
    DoReFaActQuantizer,
    DoReFaWeightQuantizer,
    DSQQuantizer,
    LSQQuantizer,
    PACTQuantizer,
)
from qtrain.nn.uniform_quantizer import UniformQuantizer


def float_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


# every activation-quantizer family a recipe uses with export (weight, activation)
FAMILIES = {
    "qat_uniform": (lambda: UniformQuantizer(4, granularity="channel"),
                    lambda: UniformQuantizer(4, symmetric=False, observer="ema")),
    "pact": (lambda: DoReFaWeightQuantizer(4), lambda: PACTQuantizer(4, alpha_init=3.0)),
    "lsq": (lambda: LSQQuantizer(2), lambda: LSQQuantizer(2, signed=False, role="activation")),
    "dsq": (lambda: DSQQuantizer(2), lambda: DSQQuantizer(2)),
    "dorefa": (lambda: DoReFaWeightQuantizer(2), lambda: DoReFaActQuantizer(4)),
    "xnor": (lambda: BinaryWeightQuantizer(), lambda: BinaryActQuantizer(1)),
    "fixed_point": (lambda: DynamicFixedPointQuantizer(8),
                    lambda: DynamicFixedPointQuantizer(8)),
    "fp8": (lambda: FP8TrainingQuantizer(), lambda: FP8TrainingQuantizer()),
    "value_aware": (lambda: ValueAwareQuantizer(4, 0.02),
                    lambda: ValueAwareQuantizer(4, 0.02, False)),
    "ptq_percentile": (lambda: UniformQuantizer(8, granularity="channel"),
                       lambda: CalibratedQuantizer(8, "percentile", symmetric=False,
                                                   percentile=99.0, bins=512)),
    "ptq_aciq": (lambda: UniformQuantizer(8, granularity="channel"),
                 lambda: CalibratedQuantizer(4, "aciq-gaussian")),
}


def trained_net(family, steps=4):
    """float_net with layers 3 and 8 fake-quantized, trained a few SGD steps (learned alpha /
    step / DSQ range move away from their initial values; BN and EMA statistics update)."""
    wq, aq = FAMILIES[family]
    m = float_net()
    m[3] = QuantConv2d.from_float(m[3], wq(), aq())
    m[8] = QuantLinear.from_float(m[8], wq(), aq())
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    m.train()
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer in (m[3], m[8]):
        if isinstance(layer.act_quantizer, CalibratedQuantizer) and family == "ptq_aciq":
            layer.act_quantizer.freeze()  # PTQ: range from the collected statistics
    return m.eval()


def x_batch():
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def learned(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if "act_quantizer" in k}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_reloads_bit_exact_from_the_file_alone(family, tmp_path):
    m = trained_net(family)
    assert type(m[3].act_quantizer).__name__ in ACT_QUANTIZERS
    x = x_batch()
    with torch.no_grad():
        ref = m(x)
        path = tmp_path / "m.safetensors"
        save_packed(pack_model(m), path)
        q = load_packed(path, float_net()).eval()  # float model: nothing trained passed in
        assert type(q[3].act_quantizer) is type(m[3].act_quantizer)
        got = learned(q)
        want = learned(m)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(q(x), ref)
    if family in ("pact", "lsq", "dsq"):  # the learned parameters did train
        init = {"pact": ("alpha", 3.0), "lsq": ("step", None), "dsq": ("alpha", 0.2)}[family]
        p = getattr(m[3].act_quantizer, init[0])
        assert init[1] is None or float(p.detach()) != init[1]


def test_fp16_scales_are_the_named_option_and_not_exact(tmp_path):
    """The issue's case: fp16 scales changed the outputs; float32 (default) does not."""
    m = trained_net("qat_uniform")
    x = x_batch()
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(pack_model(m)(x), ref)
        half = pack_model(m, scale_dtype=torch.float16)
        assert half[3].scales.dtype == torch.float16
        assert not torch.equal(half(x), ref)


def _tensor_offset(path, key):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0], raw


def _saved(tmp_path, family="qat_uniform"):
    m = trained_net(family)
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(m), path, run={"recipe": "r", "method": "qat", "bits": 4,
                                           "act_bits": 4})
    return m, path


def test_one_flipped_scale_bit_is_detected(tmp_path):
    m, path = _saved(tmp_path)
    off, raw = _tensor_offset(path, "3.scales")
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(raw[:off] + bytes([raw[off] ^ 0x01]) + raw[off + 1:])
    with pytest.raises(DataFileError, match=f"{bad}: SHA-256 checksum mismatch.*re-export"):
        load_packed(bad, float_net())
    assert torch.equal(load_packed(path, float_net()).eval()(x_batch()), m(x_batch()))


def test_edited_metadata_is_detected(tmp_path):
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "meta.safetensors"
    bad.write_bytes(raw.replace(b'\\"bits\\":4', b'\\"bits\\":3', 1))  # still parses
    assert bad.read_bytes() != raw
    with pytest.raises(DataFileError, match="checksum mismatch"):
        load_packed(bad, float_net())


@pytest.mark.parametrize("cut", [0, 5, 100, -1000, -1])
def test_truncated_file(tmp_path, cut):
    _, path = _saved(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(DataFileError, match=f"packed file {bad} cannot be read.*truncated"):
        load_packed(bad, float_net())


def test_garbage_missing_and_unsigned_files(tmp_path):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataFileError, match="cannot be read"):
        load_packed(garbage, float_net())
    with pytest.raises(DataFileError, match="does not exist"):
        load_packed(tmp_path / "nope.safetensors", float_net())
    # a file in the previous layout (no file_version / checksum): refused, not trusted
    _, path = _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("sha256", "file_version")}
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    old = tmp_path / "old.safetensors"
    save_file(t, str(old), metadata=meta)
    with pytest.raises(DataFileError, match="file_version=None without a checksum"):
        load_packed(old, float_net())


def test_other_configuration_says_what_differs(tmp_path):
    _, path = _saved(tmp_path)  # weights 4-bit uniform, activations 4-bit uniform EMA
    other = float_net()
    other[3] = QuantConv2d.from_float(other[3], UniformQuantizer(2, granularity="channel"),
                                      UniformQuantizer(4, symmetric=False, observer="ema"))
    other[8] = QuantLinear.from_float(other[8], UniformQuantizer(4, granularity="channel"),
                                      PACTQuantizer(4))
    with pytest.raises(DataFileError) as e:
        load_packed(path, other)
    msg = str(e.value)
    assert f"packed file {path} was written for another configuration" in msg
    assert "3: weight bits 4 in the file, 2 in the model" in msg
    assert "8: activation quantizer UniformQuantizer in the file, PACTQuantizer in" in msg
    with pytest.raises(DataFileError, match=r"recipe: 'r' in the file, 'other' expected"):
        load_packed(path, float_net(), expect={"recipe": "other", "bits": 4})
    load_packed(path, float_net(), expect={"recipe": "r", "bits": 4})  # same: loads


def _run_dir(tmp_path, bits_in_config):
    """A run directory as train.py writes it: config_resolved.yaml + model_packed.safetensors
    (SmallCNN from conf/model/digits_cnn.yaml, QAT 4-bit weights, EMA 8-bit activations)."""
    from hydra.utils import instantiate

    model_cfg = {"_target_": "qtrain.models.small.SmallCNN", "num_classes": 10,
                 "in_channels": 1, "image_size": 8, "channels": 16, "hidden": 128,
                 "tiny": False}
    m = instantiate(model_cfg)
    m.train()
    for name, mod in list(m.named_modules()):
        if type(mod) in (nn.Conv2d, nn.Linear) and name:
            new = (QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear).from_float(
                mod, UniformQuantizer(4), UniformQuantizer(8, symmetric=False, observer="ema"))
            parent = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
            setattr(parent, name.rpartition(".")[2], new)
    for _ in range(3):
        m(torch.randn(8, 1, 8, 8))
    m.eval()
    run = {"recipe": "qat_digits", "method": "qtrain.callbacks.qat.QATCallback", "bits": 4,
           "act_bits": 8}
    save_packed(pack_model(m), tmp_path / "model_packed.safetensors", run)
    cfg = {"recipe_name": "qat_digits", "model": model_cfg,
           "quant": {"_target_": run["method"], "bits": bits_in_config, "act_bits": 8}}
    (tmp_path / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    return m


def test_load_run_checks_the_run_config(tmp_path):
    m = _run_dir(tmp_path, bits_in_config=4)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(load_run(tmp_path)(x), m(x))
    cfg = yaml.safe_load((tmp_path / "config_resolved.yaml").read_text())
    cfg["quant"]["bits"] = 2  # the file of another bit width copied into this run dir
    (tmp_path / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataFileError, match="bits: 4 in the file, 2 expected"):
        load_run(tmp_path)


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    _, path = _saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
