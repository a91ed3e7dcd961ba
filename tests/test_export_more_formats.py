"""pack_model / save_packed / load_packed for the learned, float, bucketed, calibrated and
value-aware weight quantizers: outputs of the loaded packed model vs. the fake-quant model in
eval mode, file tensor bits vs. the run summary's storage bits, preflight, and one recipe."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qtrain.export import (
    check_packable,
    checksum,
    load_packed,
    load_run,
    pack_model,
    save_packed,
)
from qtrain.nn.bucket_quantizer import BucketUniformQuantizer
from qtrain.nn.calibrated_quantizer import CalibratedQuantizer, ValueAwareQuantizer
from qtrain.nn.fake_quant import QuantConv2d, QuantEmbedding, QuantLinear
from qtrain.nn.format_quantizers import (
    DynamicFixedPointQuantizer,
    FloatQuantizer,
    S2FP8Quantizer,
    TTQQuantizer,
    TWNQuantizer,
)
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from qtrain.nn.lab_quantizer import LABWeightQuantizer
from qtrain.nn.learned_quantizers import (
    DoReFaWeightQuantizer,
    DSQQuantizer,
    PolinoDifferentiableQuantizer,
    SoftToHardVQ,
)
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.quant.size import model_storage_bits
from qtrain_kernels import layout as L


class Net(nn.Module):
    """Long rows (K = 2304 and 4096) so the per-row scale copies stay < 1% of the codes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(256, 32, 3, padding=1)
        self.lin = nn.Linear(4096, 10)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)).repeat(1, 128))


# (quantizer factory, packed fmt, max |out - ref| relative to max |ref| with pack_model's
#  default float32 scales; 0 = bit-exact. 1e-6: LAB's alpha is summed in another order than
#  its forward's, one fp32 rounding: measured 9e-10 on a weight of max |W| ~ 0.03)
CASES = {
    "dorefa1": (lambda: DoReFaWeightQuantizer(1), "binary", 0),
    "dorefa2": (lambda: DoReFaWeightQuantizer(2), "lut", 0),
    "dorefa4": (lambda: DoReFaWeightQuantizer(4), "lut", 0),
    "dsq2": (lambda: DSQQuantizer(2), "lut", 0),
    "dsq4": (lambda: DSQQuantizer(4), "lut", 0),
    "ttq": (lambda: TTQQuantizer(), "lut", 0),
    "polino2": (lambda: PolinoDifferentiableQuantizer(2), "bucketed", 0),
    "polino4_ste": (lambda: PolinoDifferentiableQuantizer(4, ste=True), "bucketed", 0),
    "polino4_tensor": (lambda: PolinoDifferentiableQuantizer(4, bucket_size=None), "lut", 0),
    "soft_to_hard": (lambda: SoftToHardVQ(4), "lut", 1e-6),
    "bucket": (lambda: BucketUniformQuantizer(4, 256), "uniform", 1e-5),
    "bucket_stochastic": (lambda: BucketUniformQuantizer(2, 128, "stochastic", 0), "uniform",
                          1e-5),
    "dfp8": (lambda: DynamicFixedPointQuantizer(8), "uniform", 0),
    "dfp16_stochastic": (lambda: DynamicFixedPointQuantizer(16, "stochastic", 0), "float", 0),
    "e4m3": (lambda: FloatQuantizer(8), "float", 0),
    "e5m2": (lambda: FloatQuantizer(8, "e5m2"), "float", 0),
    "fp16": (lambda: FloatQuantizer(16), "float", 0),
    "bf16": (lambda: FloatQuantizer(16, "bf16"), "float", 0),
    "fp8_training": (lambda: FP8TrainingQuantizer(), "float", 0),
    "fp8_training_chunked": (lambda: FP8TrainingQuantizer(fmt="e4m3", accumulation="chunked"),
                             "float", 1e-3),  # packed: fp32 GEMM, fake-quant: fp16 chunks
    "s2fp8": (lambda: S2FP8Quantizer(), "float", 0),
    "fp8_training_s2fp8": (lambda: FP8TrainingQuantizer(fmt="s2fp8", grad_fmt="s2fp8"), "float",
                           0),  # S2FP8 training (Cambier 2020): E5M2 codes + alpha / beta
    "calibrated": (lambda: CalibratedQuantizer(4, "minmax"), "uniform", 0),
    "calibrated_aciq_affine": (lambda: CalibratedQuantizer(8, "aciq", symmetric=False), "uniform",
                             0),
    "value_aware": (lambda: ValueAwareQuantizer(4, 0.01), "value_aware", 0),
    "value_aware_affine": (lambda: ValueAwareQuantizer(4, 0.02, False), "value_aware", 0),
    "lab": (lambda: LABWeightQuantizer(), "binary", 1e-6),
    "twn": (lambda: TWNQuantizer(), "ternary", 0),
    "twn_channel": (lambda: TWNQuantizer(per_channel=True), "ternary", 0),
}


def _fake_quant_net(make):
    torch.manual_seed(0)
    m = Net()
    m.conv = QuantConv2d.from_float(m.conv, make())
    m.lin = QuantLinear.from_float(m.lin, make())
    x = torch.randn(2, 256, 4, 4)
    m.train()(x)  # lazy initialisation (TTQ scales, DSQ range, Polino points, observers)
    return m.eval(), x


def _layer_bits(path):
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        meta = f.metadata()
    bits = {n: sum(v.numel() * v.element_size() * 8 for k, v in t.items()
                   if k.startswith(n + ".")) for n in ("conv", "lin")}
    return bits, json.loads(meta["layers"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_matches_fake_quant_model(case, tmp_path):
    make, fmt, tol = CASES[case]
    m, x = _fake_quant_net(make)
    if case == "polino2":  # learned points, not the quantile initialisation
        m.lin.weight_quantizer.points.data.mul_(1.1)
    if case == "lab":  # a curvature from "Adam": alpha = ||d w||_1 / ||d||_1, not mean|w|
        for fq in (m.conv, m.lin):
            w = fq.weight.detach().abs()
            d = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) + 10 * w / w.max()
            fq.weight_quantizer.set_curvature(d)
            alpha = (d * w).sum() / d.sum()
            assert not torch.isclose(alpha, w.mean(), rtol=1e-2)
        ref = m(x)
    ref = m(x) if "stochastic" not in case else None
    check_packable(m)
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(m), path)
    q = load_packed(path, Net()).eval()
    assert isinstance(q.conv, PackedConv2d) and q.lin.fmt == q.conv.fmt == fmt
    for name in ("conv", "lin"):  # the stored weight is the eval-mode fake-quant weight
        fq = getattr(m, name)
        wq = fq.weight_quantizer
        if hasattr(wq, "rounding"):
            wq.rounding = "nearest"  # stochastic rounding: packed with round-to-nearest
        want = wq(fq.weight).as_subclass(torch.Tensor).reshape(fq.weight.shape[0], -1)
        got = getattr(q, name).dequantize()
        if tol == 0:
            assert torch.equal(got, want.float()), name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
    if ref is None:
        ref = m(x)
    out = q(x)
    if tol == 0:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=4 * tol * ref.abs().max().item())
    # file tensor bits of each packed layer vs. the summary's storage bits (within 1%, 1.5%
    # for 1-bit rows: the fp32 per-row alpha copies are 32 bits per 2304-element conv row,
    # 1.4% of its 1-bit codes)
    summary = {r.name: r.bits for r in model_storage_bits(m).layers}
    bits, specs = _layer_bits(path)
    assert specs["lin"]["fmt"] == fmt
    for name in ("conv", "lin"):
        lim = 0.015 if case in ("dorefa1", "lab") else 0.01
        assert abs(bits[name] - summary[name]) / summary[name] < lim, (name, bits, summary)


def test_dorefa_codes_by_hand(tmp_path):
    """DoReFa eq. (9) by hand on a 1 x 4 weight, 2 bits: t = tanh(w) / (2 max|tanh w|) + 1/2,
    u = round(3 t), W = 2 u / 3 - 1 stored as u into the table [-1, -1/3, 1/3, 1]."""
    lin = QuantLinear.from_float(nn.Linear(4, 1, bias=False), DoReFaWeightQuantizer(2))
    lin.weight.data = torch.tensor([[-2.0, -0.1, 0.3, 1.0]])
    tm = torch.tanh(torch.tensor(2.0)).item()
    want_u = [round(3 * (torch.tanh(torch.tensor(v)).item() / (2 * tm) + 0.5))
              for v in (-2.0, -0.1, 0.3, 1.0)]
    assert want_u == [0, 1, 2, 3]
    net = nn.Sequential(lin).eval()
    p = pack_model(net)[0]
    assert p.fmt == "lut" and p.lut.dtype == torch.float32
    assert p.lut[0].tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0], rel=2e-7)
    assert L.unpack_codes(p.packed, 2, 4).tolist() == [want_u]
    torch.testing.assert_close(p.dequantize(), torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0]]))
    assert torch.equal(p.dequantize(), lin.weight_quantizer(lin.weight).detach())


def test_ttq_table_and_codes():
    lin = QuantLinear.from_float(nn.Linear(4, 2, bias=False), TTQQuantizer(threshold=0.25))
    lin.weight.data = torch.tensor([[-4.0, -0.5, 2.0, 0.9], [1.5, -1.1, 0.0, 4.0]])
    q = lin.weight_quantizer
    q.w_p.data.fill_(0.7)
    q.w_n.data.fill_(1.3)
    q.initialized.fill_(True)
    p = pack_model(nn.Sequential(lin).eval())[0]
    assert p.fmt == "lut" and p.lut.tolist() == [[pytest.approx(-1.3), 0.0,
                                                  pytest.approx(0.7), 0.0]]
    # delta = 0.25 * 4 = 1: |w| > 1 -> +-; codes t + 1
    want = torch.tensor([[-1.3, 0, 0.7, 0], [0.7, -1.3, 0, 0.7]])
    torch.testing.assert_close(p.dequantize(), want)


@pytest.mark.parametrize("bs,fmt", [(16, "uniform"), (48, "bucketed"), (128, "bucketed")])
def test_bucket_sizes_not_dividing_the_rows(bs, fmt, tmp_path):
    """Buckets that straddle rows (48 vs K = 64, or 2 rows per bucket) use the ``bucketed``
    format: file bits = bits * numel + 64 per bucket, as storage_bits counts them."""
    torch.manual_seed(0)
    m = nn.Sequential(QuantLinear.from_float(nn.Linear(64, 12, bias=False),
                                             BucketUniformQuantizer(4, bs))).eval()
    save_packed(pack_model(m), tmp_path / "b.safetensors")
    q = load_packed(tmp_path / "b.safetensors", nn.Sequential(nn.Linear(64, 12, bias=False)))
    assert q[0].fmt == fmt
    want = m[0].weight_quantizer(m[0].weight)
    torch.testing.assert_close(q[0].dequantize(), want, rtol=0, atol=1e-6)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), m(x), rtol=0, atol=1e-5)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        bits = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8
                   for k in f.keys())  # noqa: SIM118 - safe_open API
    assert bits == 4 * 768 + 64 * (768 // bs) == m[0].storage_bits()


def test_unpackable_settings_raise_naming_the_layer():
    lin = nn.Linear(64, 300)
    m = nn.Sequential(QuantLinear.from_float(lin, SoftToHardVQ(9))).eval()
    with pytest.raises(ValueError, match=r"0 \(SoftToHardVQ\).*256 centers"):
        pack_model(m)
    with pytest.raises(ValueError, match=r"0 \(SoftToHardVQ: bits=9 > 8\)"):
        check_packable(m)  # before training
    m = nn.Sequential(QuantLinear.from_float(nn.Linear(8, 4), CalibratedQuantizer(4)))
    m[0].weight_quantizer.calibrating = True
    with pytest.raises(ValueError, match=r"0 \(CalibratedQuantizer\): still calibrating"):
        pack_model(m.eval())


def test_size_mismatches_are_the_formats(tmp_path):
    """Documented gaps: 3-bit codes travel in 4-bit containers (Polino 3 bits: 4/3 of the
    codes), and vector soft-to-hard VQ uses the codebook format (uint8 codes, fp16 centres)."""
    for make, ratio in ((lambda: PolinoDifferentiableQuantizer(3), 4 / 3),
                        (lambda: SoftToHardVQ(4, dim=2), 2.0)):
        m, x = _fake_quant_net(make)
        path = tmp_path / "m.safetensors"
        save_packed(pack_model(m), path)
        summary = {r.name: r.bits for r in model_storage_bits(m).layers}
        bits, _ = _layer_bits(path)
        assert bits["lin"] / summary["lin"] == pytest.approx(ratio, rel=0.02)
        torch.testing.assert_close(load_packed(path, Net()).eval()(x), m(x), rtol=0,
                                   atol=2e-3 * m(x).abs().max().item())


def test_embedding_with_ttq_weights_is_packed(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(QuantEmbedding.from_float(nn.Embedding(50, 16), TTQQuantizer()))
    idx = torch.randint(0, 50, (3, 7))
    ref = m.eval()(idx)
    save_packed(pack_model(m), tmp_path / "e.safetensors")
    q = load_packed(tmp_path / "e.safetensors", nn.Sequential(nn.Embedding(50, 16)))
    assert isinstance(q[0], PackedEmbedding) and q[0].fmt == "lut"
    assert torch.equal(q(idx), ref)


def _rewrite(path, out, edit):
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        meta = f.metadata()
    edit(t)
    meta = {**meta, "sha256": checksum(t, meta)}  # re-signed: test what lies beyond it
    save_file(t, str(out), metadata=meta)


@pytest.mark.parametrize("case,key,edit,msg", [
    ("ttq", "lin.lut", lambda v: v[:, :3].contiguous(), r"lin\.lut"),
    ("ttq", "lin.lut", lambda v: v.double(), r"lin\.lut"),
    ("e4m3", "lin.fweight", lambda v: v.float(), r"lin\.fweight"),
    ("s2fp8", "lin.s2fp8", lambda v: v[:1].contiguous(), r"lin\.s2fp8"),
    ("dorefa4", "lin.lut", lambda v: v.double(), r"lin\.lut"),
    ("value_aware", "lin.sp_values", lambda v: v[1:].contiguous(), r"lin\.sp_values"),
    ("value_aware", "lin.sp_index", lambda v: v.long(), r"lin\.sp_index"),
])
def test_load_validates_new_buffers(case, key, edit, msg, tmp_path):
    m, _ = _fake_quant_net(CASES[case][0])
    save_packed(pack_model(m), tmp_path / "m.safetensors")

    def change(t):
        t[key] = edit(t[key])

    _rewrite(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError, match=msg):
        load_packed(tmp_path / "bad.safetensors", Net())


def test_ttq_recipe_smoke_export_loads_and_scores_the_same(tmp_path):
    """``train.py recipe=ttq_resnet20_cifar10 debug=smoke export=true`` (rejected by the
    preflight before): the file loads into a fresh float ResNet-20 as lut layers and its
    test accuracy is the run's quantized accuracy."""
    from hydra.utils import instantiate

    from qtrain.run import build_datamodule
    from tests.hydra_helpers import compose_cfg, run

    # the report PNGs are not what this checks (test_train_smoke draws them for TTQ): off
    overrides = ["recipe=ttq_resnet20_cifar10", "debug=smoke", "export=true",
                 "callbacks.layer_report.png=false"]
    s = run(overrides, tmp_path / "run")
    path = tmp_path / "run" / "model_packed.safetensors"
    assert path.exists() and s["packed_layers"] > 0
    cfg = compose_cfg(overrides, tmp_path / "load")
    dm = build_datamodule(cfg)
    q = load_run(tmp_path / "run")  # architecture from the run's config_resolved.yaml
    assert not q.training
    with pytest.raises(FileNotFoundError, match=r"not found \(a run directory of"):
        load_run(tmp_path / "load")
    fmts = {m.fmt for m in q.modules() if isinstance(m, PackedLinear)}
    assert fmts == {"lut"}
    module = instantiate(cfg.task, model=q)
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path / "load"))
    got = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert got[f"test_{module.metric}"] == pytest.approx(s["quant_metric"], rel=1e-5)
