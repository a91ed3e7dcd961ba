"""ONNX QDQ export (qtrain.export_onnx): a QAT-trained digits CNN exported, loaded and run by
onnxruntime without qtrain, against the trained fake-quant model; integer initializers decoded
independently (numpy, the ONNX spec's nibble order); sizes; one error for unsupported layers;
the train.py hook and the CLI on a real run."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qtrain.callbacks.qat import QATCallback  # noqa: E402
from qtrain.errors import ConfigError  # noqa: E402
from qtrain.export import pack_model  # noqa: E402
from qtrain.export_onnx import main, run_onnx, save_onnx  # noqa: E402
from qtrain.models.small import SmallCNN  # noqa: E402
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear  # noqa: E402
from qtrain.nn.format_quantizers import TWNQuantizer  # noqa: E402
from qtrain.nn.pq_layers import PQLinear  # noqa: E402
from qtrain.nn.uniform_quantizer import UniformQuantizer  # noqa: E402
from tests.hydra_helpers import ROOT, run  # noqa: E402

T = onnx.TensorProto


@functools.cache
def digits():
    """scikit-learn's real 8x8 digits, standardised: (train x, y), (test x, y)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


# name -> (weight quantizer, activation quantizer, bits, act bits, first_last, weight type)
CASES = {
    "int8_channel": (dict(symmetric=True, granularity="channel"), dict(symmetric=False), 8, 8,
                     "quantize", T.INT8),
    "int8_channel_zp": (dict(symmetric=False, granularity="channel"), dict(symmetric=False),
                        8, 8, "quantize", T.UINT8),
    "int4_group_zp": (dict(symmetric=False, granularity="group", group_size=8),
                      dict(symmetric=False), 4, 4, "keep", T.UINT4),
    "int4_group": (dict(symmetric=True, granularity="group", group_size=8),
                   dict(symmetric=True), 4, 8, "keep", T.INT4),
}


@functools.cache
def trained(case: str):
    """SmallCNN QAT-trained for 40 Adam steps on the real digits with the repo's QAT
    callback conversion (EMA activation ranges, BatchNorm statistics moved): (fake-quant
    model, packed model), both in eval mode."""
    wkw, akw, bits, abits, first_last, _ = CASES[case]
    torch.manual_seed(0)
    model = SmallCNN(10, 1, 8, channels=8, hidden=64)
    QATCallback(bits=bits, act_bits=abits,
                weight=functools.partial(UniformQuantizer, observer="minmax", **wkw),
                act=functools.partial(UniformQuantizer, granularity="tensor", observer="ema",
                                      **akw),
                first_last=first_last).convert(model)
    (x, y), _ = digits()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, pack_model(model, backend="torch").eval()


def decode(init) -> np.ndarray:
    """An integer initializer decoded from its raw bytes by the ONNX spec (4-bit types: two
    elements a byte, the first in the low nibble; signed INT4 in two's complement)."""
    raw = np.frombuffer(init.raw_data, dtype=np.uint8)
    n = int(np.prod(init.dims))
    if init.data_type in (T.INT8, T.UINT8):
        v = raw.view(np.int8 if init.data_type == T.INT8 else np.uint8).astype(np.int64)
    else:
        v = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
        if init.data_type == T.INT4:
            v = np.where(v >= 8, v - 16, v)
    return v.reshape(init.dims)


def dequantized(inits: dict, name: str) -> np.ndarray:
    """(q - z) * s of layer ``name`` from the file, per channel or per block (numpy)."""
    q = decode(inits[f"{name}.weight_quantized"])
    s = onnx.numpy_helper.to_array(inits[f"{name}.weight_scale"])
    zi = inits.get(f"{name}.weight_zero_point")
    z = np.zeros_like(s, dtype=np.int64) if zi is None else decode(zi)
    q2 = q.reshape(q.shape[0], -1)
    g = q2.shape[1] // (s.shape[1] if s.ndim == 2 else 1)
    s2, z2 = (np.repeat(a.reshape(q.shape[0], -1), g, axis=1) for a in (s, z))
    return ((q2 - z2).astype(np.float32) * s2).astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_the_trained_model(case, tmp_path):
    model, packed = trained(case)
    _, (xt, yt) = digits()
    info = save_onnx(packed, xt[:1], tmp_path / "m.onnx", run={"recipe": "test"})
    proto = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    assert info["n_quantized_layers"] == len(quant) > 0
    want_type = CASES[case][5]
    for name, fq in quant.items():
        # the file's integers, decoded by hand, are exactly the trained fake-quant weight
        assert inits[f"{name}.weight_quantized"].data_type == want_type
        assert (f"{name}.weight_zero_point" in inits) == (want_type in (T.UINT8, T.UINT4))
        assert f"{name}.weight" not in inits  # no float copy left
        with torch.no_grad():
            ref = fq.weight_quantizer(fq.weight).reshape(fq.weight.shape[0], -1).numpy()
        np.testing.assert_array_equal(dequantized(inits, name), ref)
    n_float = sum(int(np.prod(i.dims)) for i in proto.graph.initializer
                  if i.data_type == T.FLOAT)
    assert n_float < sum(fq.weight.numel() for fq in quant.values()) / 4  # scales, BN, bias
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    assert json.loads(dict((p.key, p.value) for p in proto.metadata_props)["qtrain.run"]) == {
        "recipe": "test"}
    # onnxruntime, without qtrain, on the real test digits vs the trained fake-quant model
    got = run_onnx(tmp_path / "m.onnx", xt)
    with torch.no_grad():
        ref = model(xt)
        assert torch.equal(packed(xt), ref)  # (pack_model is exact)
    # weights bit-identical; what remains is float summation order (conv / gemm / BN in
    # another order: ~1e-7), which moves an activation lying within that of a rounding
    # boundary of the next Q/DQ by one step -- 2 of 203k codes at features.3 for int8 when
    # measured -- and that step propagates to a few outputs. Most outputs agree to 1e-4:
    tol = 1e-4 * ref.abs().max().item()
    off = ((got - ref).abs() > tol).float().mean().item()
    assert off <= 0.02, off
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (ref.argmax(1) == yt).float().mean() > 0.6  # a trained model, not noise


def test_activation_qdq_nodes_carry_the_trained_ranges(tmp_path):
    model, packed = trained("int4_group_zp")
    save_onnx(packed, digits()[1][0][:1], tmp_path / "m.onnx")
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant"}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    aqs = [m.act_quantizer for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert len(qs) == len(aqs) == 2
    for q, aq in zip(qs, aqs, strict=True):
        # qparams by hand from the frozen EMA range (affine, 4 bits: 15 steps, 0 exact)
        lo, hi = min(float(aq.running_min), 0.0), max(float(aq.running_max), 0.0)
        scale = np.float32((hi - lo) / 15)
        assert consts[q.input[1]] == pytest.approx(scale, rel=1e-6)
        assert consts[q.input[2]] == np.clip(np.round(-lo / scale), 0, 15)
        assert consts[q.input[2]].dtype == np.uint8
    clips = [n for n in g.node if n.op_type == "Clip"]
    assert [(consts[c.input[1]], consts[c.input[2]]) for c in clips] == [(0, 15)] * 2


def test_sizes_against_fp32_onnx(tmp_path):
    _, packed = trained("int8_channel")
    x = digits()[1][0][:1]
    q = save_onnx(packed, x, tmp_path / "q.onnx")
    f = save_onnx(packed, x, tmp_path / "f.onnx", quantized=False)
    assert f["n_quantized_layers"] == 0
    n_w = sum(m.out_features * m.in_features for m in packed.modules()
              if hasattr(m, "packed"))
    inits = onnx.load(str(tmp_path / "q.onnx")).graph.initializer
    codes = [i for i in inits if i.name.endswith(".weight_quantized")]
    assert sum(len(i.raw_data) for i in codes) == n_w  # int8: one byte a weight
    rest = sum(len(i.raw_data) for i in inits if i not in codes)
    assert rest < 0.05 * 4 * n_w  # scales, biases, BatchNorm
    # the fp32 file holds 4-byte weights; graph structure (names, shapes) adds ~6 KB each
    assert f["file_bytes"] > 4 * n_w > 2.5 * q["file_bytes"]
    assert {i.data_type for i in onnx.load(str(tmp_path / "f.onnx")).graph.initializer} <= {
        T.FLOAT, T.INT64}


def test_int4_file_holds_two_codes_a_byte(tmp_path):
    _, packed = trained("int4_group")
    save_onnx(packed, digits()[1][0][:1], tmp_path / "m.onnx")
    for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer:
        if i.name.endswith(".weight_quantized"):
            assert len(i.raw_data) == -(-int(np.prod(i.dims)) // 2)


def test_unsupported_layers_are_named_in_one_error():
    torch.manual_seed(0)
    model = SmallCNN(10, 1, 8, channels=4, hidden=16)
    model.features[3] = QuantConv2d.from_float(model.features[3], TWNQuantizer())
    model.classifier[1] = PQLinear.from_float(model.classifier[1], block_size=4,
                                              n_centroids=4)
    model.classifier[3] = QuantLinear.from_float(model.classifier[3],
                                                 UniformQuantizer(8, granularity="channel"))
    packed = pack_model(model.eval(), backend="torch")
    with pytest.raises(ConfigError, match=r"2 layer\(s\) have no ONNX QDQ form: "
                       r"features\.3 \(packed format 'ternary'\); classifier\.1 \(packed "
                       r"format 'codebook'\)\. Supported: packed 'uniform' weights"):
        save_onnx(packed, torch.zeros(1, 1, 8, 8), "/nonexistent/never_written.onnx")


def test_dynamic_activation_range_is_rejected():
    m = SmallCNN(10, 1, 8, channels=4, hidden=16)
    m.classifier[3] = QuantLinear.from_float(m.classifier[3], UniformQuantizer(8),
                                             UniformQuantizer(8, observer="minmax"))
    with pytest.raises(ConfigError, match=r"classifier\.3 \(activation quantizer "
                       r"UniformQuantizer\(granularity='tensor', observer='minmax'\)"):
        save_onnx(pack_model(m.eval(), backend="torch"), torch.zeros(1, 1, 8, 8), "x.onnx")


def test_train_py_export_onnx_and_cli(tmp_path):
    """Real Hydra + Trainer run of the default recipe (smoke) with export=true
    export_onnx=true: model.onnx next to the packed file, checked on a test batch; the CLI
    re-exports it from the run directory."""
    s = run(["recipe=qat_int4_digits", "debug=smoke", "export=true", "export_onnx=true"],
            tmp_path / "run")
    assert s["onnx_file"].endswith("model.onnx") and s["onnx_mb"] > 0
    assert s["onnx_max_abs_diff"] < 1e-3
    info = main([str(tmp_path / "run"), "--out", str(tmp_path / "cli.onnx"),
                 "--fp32-out", str(tmp_path / "fp32.onnx"), "--input-shape", "2,1,8,8"])
    assert info["n_quantized_layers"] == s["packed_layers"] and info["max_abs_diff"] < 1e-3
    assert info["file_bytes"] < info["fp32"]["file_bytes"]


def test_export_onnx_needs_export(tmp_path):
    with pytest.raises(ConfigError, match="export_onnx=true needs export=true"):
        run(["recipe=qat_int4_digits", "debug=smoke", "export_onnx=true"], tmp_path)


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
    """The CLI as a user runs it, on the packed file of a real run; the example input from
    the run's data config (smoke copy); a bad source is one line, exit status 2."""
    run(["recipe=qat_int4_digits", "debug=smoke", "export=true"], tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "qtrain.export_onnx",
                          str(tmp_path / "run" / "model_packed.safetensors"), "--out",
                          str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["max_abs_diff"] < 1e-3
    bad = subprocess.run([sys.executable, "-m", "qtrain.export_onnx", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "n.onnx")], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_embedding_table_becomes_dequantize_gather(tmp_path):
    """A uniform per-row int8 embedding (QAT types [Embedding]) -> UINT8 table + zero-points,
    DequantizeLinear -> Gather; token ids in, the fake-quant model's vectors out exactly."""
    from torch import nn

    from qtrain.nn.fake_quant import QuantEmbedding

    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    model = nn.Sequential(QuantEmbedding.from_float(emb, UniformQuantizer(
        8, symmetric=False, granularity="channel")), nn.Flatten(), nn.Linear(48, 4)).eval()
    ids = torch.randint(0, 50, (7, 3))
    packed = pack_model(model, backend="torch")
    save_onnx(packed, ids[:1], tmp_path / "e.onnx")
    g = onnx.load(str(tmp_path / "e.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    assert inits["0.weight_quantized"].data_type == T.UINT8
    assert [n.op_type for n in g.node][:2] == ["DequantizeLinear", "Gather"]
    with torch.no_grad():
        ref = model(ids)
        w = model[0].weight_quantizer(model[0].weight).numpy()
    np.testing.assert_array_equal(dequantized(inits, "0"), w)
    torch.testing.assert_close(run_onnx(tmp_path / "e.onnx", ids), ref, rtol=1e-6, atol=1e-6)


def test_ptq_calibrated_activations(tmp_path):
    """Frozen PTQ CalibratedQuantizer activations (percentile clip range, affine 8 bits)
    with int8 per-channel weights: the Q/DQ carry the calibrated scale / zero-point and
    onnxruntime reproduces the fake-quant model on the real test digits."""
    from qtrain.nn.calibrated_quantizer import CalibratedQuantizer

    torch.manual_seed(0)
    model = SmallCNN(10, 1, 8, channels=8, hidden=64)
    aqs = []
    for seq, i in ((model.features, 3), (model.classifier, 1), (model.classifier, 3)):
        aqs.append(CalibratedQuantizer(8, "percentile", symmetric=False))
        cls = QuantConv2d if isinstance(seq[i], torch.nn.Conv2d) else QuantLinear
        seq[i] = cls.from_float(seq[i], UniformQuantizer(8, granularity="channel"), aqs[-1])
    (x, _), (xt, _) = digits()
    model.eval()
    for q in aqs:
        q.calibrating = True
    with torch.no_grad():
        model(x[:512])
    for q in aqs:
        q.freeze()
    packed = pack_model(model, backend="torch")
    save_onnx(packed, xt[:1], tmp_path / "p.onnx")
    g = onnx.load(str(tmp_path / "p.onnx")).graph
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant"}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert [(float(consts[q.input[1]]), int(consts[q.input[2]])) for q in qs] == [
        (float(q.scale), int(q.zero_point)) for q in aqs]
    with torch.no_grad():
        ref = model(xt)
    got = run_onnx(tmp_path / "p.onnx", xt)
    # untrained network, small logits: a one-step activation flip (summation order, see
    # above) is ~1e-4 of them; measured max 2e-4 of 0.18
    assert (got - ref).abs().max() <= 0.01 * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    aqs[0].unfreeze()
    with pytest.raises(ConfigError, match=r"features\.3 \(activation quantizer "
                       r"CalibratedQuantizer not frozen"):
        save_onnx(pack_model(model, backend="torch"), xt[:1], tmp_path / "n.onnx")
