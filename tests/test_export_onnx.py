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
from qtrain.export_onnx import main, run_onnx, save_onnx, to_onnx  # noqa: E402
from qtrain.models.small import SmallCNN  # noqa: E402
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear  # noqa: E402
from qtrain.nn.format_quantizers import TWNQuantizer  # noqa: E402
from qtrain.nn.learned_quantizers import (  # noqa: E402
    DoReFaActQuantizer,
    LSQQuantizer,
    PACTQuantizer,
)
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
    return train_cnn(functools.partial(UniformQuantizer, observer="minmax", **wkw),
                     functools.partial(UniformQuantizer, granularity="tensor", observer="ema",
                                       **akw), bits, abits, first_last)


def train_cnn(weight, act, bits: int, abits: int, first_last: str):
    torch.manual_seed(0)
    model = SmallCNN(10, 1, 8, channels=8, hidden=64)
    QATCallback(bits=bits, act_bits=abits, weight=weight, act=act,
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


# ------------------------------------------------------------ learned activation quantizers
P = functools.partial
_UW = P(UniformQuantizer, observer="minmax", symmetric=True, granularity="channel")
# name -> (weight quantizer, activation quantizer, bits, act bits, Q/DQ type, code range,
#          bit-exact Q/DQ)
ACT_CASES = {
    "pact4": (_UW, P(PACTQuantizer, alpha_init="calibrate"), 4, 4, np.uint8, (0, 15), True),
    "pact8": (_UW, P(PACTQuantizer, alpha_init="calibrate"), 8, 8, np.uint8, (0, 255), True),
    "lsq4": (P(LSQQuantizer, signed=True, role="weight"),
             P(LSQQuantizer, signed=False, role="activation"), 4, 4, np.uint8, (0, 15), True),
    "lsq3_signed": (P(LSQQuantizer, signed=True, role="weight"),
                    P(LSQQuantizer, signed=True, role="activation"), 3, 3, np.int8, (-4, 3),
                    True),
    "dorefa4": (_UW, P(DoReFaActQuantizer), 4, 4, np.uint8, (0, 15), False),
}


@functools.cache
def trained_act(case: str):
    w, a, bits, abits, *_ = ACT_CASES[case]
    return train_cnn(w, a, bits, abits, "keep")


def expected_scale(aq) -> np.float32:
    """The step of each quantizer by its paper, in numpy float32 (independent of qtrain's
    act_qparams): PACT alpha / (2^k - 1) (Choi 2018 eq. 2), LSQ s (Esser 2020 eq. 1),
    DoReFa 1 / (2^k - 1) (Zhou 2016 eq. 11 -- as a multiplier)."""
    n = np.float32(2**aq.bits - 1)
    if isinstance(aq, PACTQuantizer):
        return np.float32(aq.alpha.item()) / n
    if isinstance(aq, LSQQuantizer):
        return np.float32(aq.step.item())
    return np.float32(1) / n


def producer(g, name: str):
    return next(n for n in g.node if name in n.output)


def act_chain(g, layer: str) -> tuple:
    """The (QuantizeLinear, Clip or None, DequantizeLinear) nodes feeding quantized layer
    ``layer``'s Conv / Gemm (found from its weight's DequantizeLinear); AssertionError if the
    input is not quantized."""
    wdq = next(n for n in g.node if n.name == f"{layer}.weight_DequantizeLinear")
    op = next(n for n in g.node if wdq.output[0] in n.input)
    assert op.op_type in ("Conv", "Gemm", "MatMul"), op.op_type
    dq = producer(g, op.input[0])
    assert dq.op_type == "DequantizeLinear", f"{layer}: input from {dq.op_type}, not a Q/DQ"
    clip = producer(g, dq.input[0])
    q = producer(g, clip.input[0]) if clip.op_type == "Clip" else clip
    assert q.op_type == "QuantizeLinear", f"{layer}: {q.op_type} before DequantizeLinear"
    return q, (clip if clip.op_type == "Clip" else None), dq


def subgraph(g, nodes) -> bytes:
    """The Q -> (Clip) -> DQ nodes with their constants as a model of their own."""
    from onnx import helper

    need = {i for n in nodes for i in n.input[1:]}
    consts = [n for n in g.node if n.op_type == "Constant" and n.output[0] in need]
    x = helper.make_tensor_value_info(nodes[0].input[0], T.FLOAT, None)
    y = helper.make_tensor_value_info(nodes[-1].output[0], T.FLOAT, None)
    m = helper.make_model(helper.make_graph(consts + list(nodes), "qdq", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 21)])
    return m.SerializeToString()


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_learned_activation_quantizers_export_as_qdq(case, tmp_path):
    """PACT / LSQ / DoReFa activations of a digits CNN trained 40 steps: every quantized
    layer's input goes through QuantizeLinear -> (Clip) -> DequantizeLinear with the
    quantizer's step, zero-point 0, INT8 / UINT8; that Q/DQ alone, run by onnxruntime on the
    layer's real inputs plus rounding ties and out-of-range values, equals the quantizer's
    forward bit for bit (DoReFa: within float32 rounding); the whole model matches the
    fake-quant model on the real test digits."""
    *_, dtype, (lo, hi), exact = ACT_CASES[case]
    model, packed = trained_act(case)
    (x, _), (xt, yt) = digits()
    save_onnx(packed, xt[:1], tmp_path / "m.onnx")
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant"}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    assert len(layers) == 2
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) == len(layers)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in layers.items()]
    with torch.no_grad():
        ref = model(xt)
    for h in hooks:
        h.remove()
    for name, m in layers.items():
        aq = m.act_quantizer
        q, clip, dq = act_chain(g, name)
        s, z = consts[q.input[1]], consts[q.input[2]]
        assert s.dtype == np.float32 and s == expected_scale(aq)
        assert z.dtype == dtype and z == 0 and dq.input[1:] == q.input[1:]
        full = (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if (lo, hi) == full:
            assert clip is None
        else:
            assert (consts[clip.input[1]], consts[clip.input[2]]) == (lo, hi)
        # the Q/DQ alone on this layer's real inputs, ties k + 1/2 steps, values outside
        step = float(s)
        ties = (torch.arange(lo - 3, hi + 3, dtype=torch.float32) + 0.5) * step
        v = torch.cat([inputs[name].reshape(-1), ties, torch.tensor([-1e3, 1e3, 0.0])])
        sess = ort.InferenceSession(subgraph(g, [n for n in (q, clip, dq) if n is not None]),
                                    providers=["CPUExecutionProvider"])
        got_q = torch.from_numpy(sess.run(None, {q.input[0]: v.numpy()})[0])
        with torch.no_grad():
            want = aq(v)
        if exact:
            assert torch.equal(got_q, want)
        else:  # DoReFa: x (2^k - 1) then / (2^k - 1) vs x / float32(1/(2^k - 1)), * it:
            # one ulp apart, and a value on a rounding tie may take the other code
            d, n_real = (got_q - want).abs(), inputs[name].numel()
            moved = d > 2 * torch.finfo(torch.float32).eps
            assert d.max() <= step * 1.001
            assert moved[:n_real].float().mean() <= 1e-3, moved[:n_real].sum()
        codes = torch.round(want / step)
        assert (codes.min(), codes.max()) == (lo, hi)  # ties / outliers reach both ends
    got = run_onnx(tmp_path / "m.onnx", xt)
    d = (got - ref).abs()
    # float summation order of conv / gemm / BN differs (see above): measured max 8e-6 of
    # logits up to 28 for all cases but pact8 (one 8-bit code moved: 4.8e-3)
    assert d.max() <= 0.05 * ref.abs().max()
    assert (d > 1e-4 * ref.abs().max()).float().mean() <= 0.02
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (ref.argmax(1) == yt).float().mean() > 0.6  # a trained model, not noise


def test_quantize_linear_rounds_half_to_even_like_torch(tmp_path):
    """ONNX QuantizeLinear rounds half to even (the spec; onnxruntime does), as torch.round
    (and LSQ's / PACT's forward) and numpy do: exact ties with a power-of-two step."""
    m = torch.nn.Sequential(QuantLinear.from_float(
        torch.nn.Linear(4, 2), UniformQuantizer(8, granularity="channel"),
        LSQQuantizer(8, signed=True, role="activation", init_step=0.5))).eval()
    g = to_onnx(pack_model(m, backend="torch"), torch.zeros(1, 4)).graph
    q, clip, dq = act_chain(g, "0")
    assert clip is None
    v = torch.arange(-6, 6, dtype=torch.float32) * 0.5 + 0.25  # x / 0.5 = k + 0.5 exactly
    sess = ort.InferenceSession(subgraph(g, [q, dq]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {q.input[0]: v.numpy()})[0]
    np.testing.assert_array_equal(got / 0.5, np.round(v.numpy() / 0.5))  # numpy: half-even
    assert list(got / 0.5) == [-6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6]
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(got), m[0].act_quantizer(v))


def test_export_onnx_preflight_names_layers_before_training(tmp_path):
    """Real composition of the default recipe with PACT (DoReFa weights -> the packed 'lut'
    format, no QDQ form): export_onnx=true fails in on_fit_start -- after the QAT
    conversion, before any step or checkpoint -- naming both quantized layers."""
    with pytest.raises(ConfigError, match=r"export_onnx=true: 2 layer\(s\) have no ONNX QDQ "
                       r"form: features\.3 \(packed format 'lut'\); classifier\.1 \(packed "
                       r"format 'lut'\)\. Supported: .*PACTQuantizer.* -- run without "
                       r"export_onnx=true"):
        run(["recipe=qat_int4_digits", "quant=pact", "debug=smoke", "export=true",
             "export_onnx=true"], tmp_path)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "summary.json").exists()


def test_export_onnx_preflight_passes_exportable_configs(tmp_path):
    """The same check on real compositions built (model + quant callback conversion, no
    training): LSQ passes, PACT activations with uniform weights pass; a min-max activation range (dynamic: the batch's own) is named."""
    from hydra.utils import instantiate

    from qtrain.export_onnx import preflight
    from qtrain.run import build_callbacks, build_datamodule
    from tests.hydra_helpers import compose_cfg

    def built(*over):  # as qtrain.run.train builds them
        cfg = compose_cfg(["recipe=qat_int4_digits", "debug=smoke", *over], tmp_path)
        build_datamodule(cfg)
        model = instantiate(cfg.model)
        build_callbacks(cfg)[1].convert(model)
        return model

    preflight(built("quant=lsq"))
    preflight(built("quant=pact", "quant.weight._target_=qtrain.nn.uniform_quantizer."
                    "UniformQuantizer"))
    with pytest.raises(ConfigError, match=r"2 layer\(s\).*features\.3 \(activation quantizer "
                       r"UniformQuantizer\(granularity='tensor', observer='minmax'\)"):
        preflight(built("quant.act.observer=minmax"))


# ------------------------------------------------------------ Hugging Face (dict inputs)
def _text_batch(seed: int, n: int, length: int, padded: bool) -> dict:
    """Random token ids (the tiny vocabulary's words) with right padding ([PAD] = 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)
    lens = (torch.randint(2, length + 1, (n,), generator=g) if padded
            else torch.full((n,), length))
    mask = (torch.arange(length)[None] < lens[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


class _MaskedMeanClassifier(torch.nn.Module):
    """forward(batch dict) like qtrain.models.hf.HFSequenceClassifier: token embedding,
    mean over the tokens the attention mask keeps, two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(60, 16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        m = batch["attention_mask"].unsqueeze(-1).float()
        h = (self.emb(batch["input_ids"]) * m).sum(1) / m.sum(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_dict_inputs_without_transformers(tmp_path):
    """The batch-dict path (what Hugging Face models take) on a small masked-mean model with
    int8 weights and EMA activations: named inputs, batch and sequence axes dynamic, the
    fake-quant model's outputs on padded batches of other lengths, masked tokens ignored."""
    torch.manual_seed(0)
    m = _MaskedMeanClassifier()
    QATCallback(bits=8, weight=P(UniformQuantizer, granularity="channel"),
                act=P(UniformQuantizer, symmetric=False, granularity="tensor", observer="ema"),
                types=["Linear", "Embedding"], first_last="quantize").convert(m)
    batch = {k: v for k, v in _text_batch(0, 64, 10, True).items() if k != "token_type_ids"}
    with torch.no_grad():
        m(batch)
    m.eval()
    save_onnx(pack_model(m, backend="torch"), batch, tmp_path / "d.onnx")
    g = onnx.load(str(tmp_path / "d.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) == 2
    b = {k: v for k, v in _text_batch(1, 8, 17, True).items() if k != "token_type_ids"}
    with torch.no_grad():
        ref = m(b)
    got = run_onnx(tmp_path / "d.onnx", b)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    other = dict(b, input_ids=torch.where(b["attention_mask"] == 1, b["input_ids"],
                                          torch.randint_like(b["input_ids"], 5, 60)))
    assert torch.equal(run_onnx(tmp_path / "d.onnx", other), got)
    with pytest.raises(ConfigError, match="expected a tensor or a dict of tensors"):
        save_onnx(pack_model(m, backend="torch"), [b["input_ids"]], tmp_path / "x.onnx")


@pytest.mark.slow  # transformers import + the tiny model: ~45 s wall on the shared 2-core VM
def test_hf_bert_dict_inputs_and_attention_mask(tmp_path):
    """qtrain's tiny BERT (transformers BertConfig: 2 layers, hidden 32, 2 heads; the smoke
    model of the MiniLM / BERT recipes) with Q-BERT group-wise int8 weights on every Linear
    and Embedding and EMA int8 activations, as qbert_minilm_sst2: the ONNX graph takes
    input_ids / attention_mask / token_type_ids, batch and sequence axes dynamic; traced on
    an unpadded batch of length 12, it runs padded batches of other lengths like the
    fake-quant model, and applies their mask: tokens under mask 0 do not change the output
    (bit for bit) while the same batch with the mask all ones does."""
    from qtrain.models.hf import HFSequenceClassifier, make_tiny_pretrained
    from qtrain.nn.groupwise_quantizer import GroupwiseQuantizer

    torch.manual_seed(0)
    m = HFSequenceClassifier(make_tiny_pretrained("bert", str(tmp_path / "tiny"), 0), 2)
    QATCallback(bits=8, act_bits=8, weight=P(GroupwiseQuantizer, num_groups=4),
                act=P(UniformQuantizer, symmetric=False, granularity="tensor", observer="ema"),
                types=["Linear", "Embedding"], exclude=[r"hf\.classifier"],
                first_last="quantize").convert(m)
    with torch.no_grad():  # EMA activation ranges from a few batches
        for i in range(4):
            m(_text_batch(i, 16, 16, True))
    m.eval()
    packed = pack_model(m, backend="torch").eval()
    info = save_onnx(packed, _text_batch(10, 2, 12, False), tmp_path / "bert.onnx")
    g = onnx.load(str(tmp_path / "bert.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert info["n_quantized_layers"] == 13 + 3  # 2 x (q, k, v, o, ffn in, ffn out), pooler,
    #                                             3 embedding tables
    n_act = sum(isinstance(x, QuantLinear) and x.act_quantizer is not None for x in m.modules())
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) == n_act == 13
    for length in (9, 24):
        b = _text_batch(20 + length, 32, length, True)
        assert (b["attention_mask"] == 0).any()
        with torch.no_grad():
            ref = m(b)
        got = run_onnx(tmp_path / "bert.onnx", b)
        # 13 activation Q/DQs in float summation order of their own (see above): measured
        # max 8e-5 of logits up to 0.023, mean 1e-5
        assert (got - ref).abs().max() <= 0.01 * ref.abs().max()
        assert (got - ref).abs().mean() <= 1e-3 * ref.abs().max()
        other = dict(b, input_ids=torch.where(b["attention_mask"] == 1, b["input_ids"],
                                              torch.randint_like(b["input_ids"], 5, 60)))
        assert torch.equal(run_onnx(tmp_path / "bert.onnx", other), got)
        unmasked = run_onnx(tmp_path / "bert.onnx",
                            dict(other, attention_mask=torch.ones_like(b["attention_mask"])))
        assert (unmasked - got).abs().mean() > 3 * (got - ref).abs().mean()


@pytest.mark.slow  # a smoke Q-BERT run (Hessian bit allocation included): ~2 min wall shared
def test_train_py_export_onnx_hf_recipe(tmp_path):
    """Real Hydra + Trainer smoke run of qbert_minilm_sst2 (tiny MiniLM-like BERT, Q-BERT
    group-wise weights with Hessian-assigned bits, 8-bit activations) with export=true
    export_onnx=true: the preflight passes, model.onnx takes the batch dict and matches the
    packed model on a test batch (measured 3.7e-9); the CLI re-exports it from the run dir
    with a smoke batch of the run's data config as the example."""
    s = run(["recipe=qbert_minilm_sst2", "debug=smoke", "export=true", "export_onnx=true"],
            tmp_path / "run")
    assert s["onnx_max_abs_diff"] < 1e-4 and s["packed_layers"] == 16
    g = onnx.load(s["onnx_file"]).graph
    assert {"input_ids", "attention_mask"} <= {i.name for i in g.input}
    info = main([str(tmp_path / "run"), "--out", str(tmp_path / "cli.onnx")])
    assert info["n_quantized_layers"] == 16 and info["max_abs_diff"] < 1e-4
