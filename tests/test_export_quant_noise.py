"""Export of Quant-Noise layers (Fan et al. 2020) as their fully quantized (p = 1) model.

int8 / int4 -> uniform format with the forward's codes and float32 scales (per tensor:
min-max codes 0..2^N-1 with a uint8 zero-point; per channel: symmetric); pq -> codebook
format (uint8 codes = nearest codeword of the current weight, fp16 centroids). Linear,
Conv2d and Embedding layers.
"""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qtrain.export import load_packed, pack_model, save_packed, storage_bits
from qtrain.nn.fake_quant import QuantConv2d, QuantEmbedding, QuantLinear
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant.size import model_storage_bits

CASES = [("int8", "tensor"), ("int8", "channel"), ("int4", "tensor"), ("int4", "channel"),
         ("pq", "tensor")]


class Net(nn.Module):
    """Embedding (64 x 1024), Linear 1024 -> 64, 3x3 Conv2d 128 -> 64 (rows of >= 1024
    weights, so a per-tensor scale stored once per row costs < 1% of the int4 codes)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 1024, padding_idx=0)
        self.lin = nn.Linear(1024, 64)
        self.conv = nn.Conv2d(128, 64, 3, padding=1)

    def forward(self, idx, img):
        return self.lin(self.emb(idx).mean(1)) + self.conv(img).mean((2, 3))


def _qn(mode, gran, seed, **kw):
    return QuantNoiseQuantizer(None, 0.5, 8, mode, gran, seed, eval_p=1.0, pq_n_iter=3, **kw)


def make_qn(mode, gran, train_steps=2):
    torch.manual_seed(0)
    m = Net()
    m.emb = QuantEmbedding.from_float(m.emb, _qn(mode, gran, 1))
    m.lin = QuantLinear.from_float(m.lin, _qn(mode, gran, 2))
    m.conv = QuantConv2d.from_float(m.conv, _qn(mode, gran, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    for _ in range(train_steps):  # noisy training steps: pq codebooks are fitted here
        for q in _quantizers(m):
            q.new_step()
        opt.zero_grad()
        m(*_inputs(seed=10)).square().mean().backward()
        opt.step()
    return m.eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (3, 5), generator=g), torch.randn(3, 128, 4, 4, generator=g)


def _quantizers(m):
    return [m.emb.weight_quantizer, m.lin.weight_quantizer, m.conv.weight_quantizer]


def test_int_codes_hand_worked():
    """int4 per tensor (Fan 2020 sec. 3.1): S = (max - min) / (2^4 - 1) = (3 + 0.75) / 15 =
    0.25, Z = round(0.75 / 0.25) = 3; codes round(w / S) + Z, half to even (0.5 -> 0,
    1.5 -> 2): 3.0 -> 15, -0.75 -> 0, 2.5 -> 13, 0.4 -> 5, 0.125 -> 3, 1.5 -> 9, -0.25 -> 2,
    0.375 -> 5 (the symmetric amax scale, 3 / 7.5, would put 3.0 on code 7 of [-8, 7])."""
    w = torch.tensor([[3.0, -0.75, 2.5, 0.4], [0.125, 1.5, -0.25, 0.375]])
    qn = QuantNoiseQuantizer(None, mode="int4", granularity="tensor")
    q = qn.export_qparams(w)
    assert q["codes"].tolist() == [[15, 0, 13, 5], [3, 9, 2, 5]]
    assert q["scale"].tolist() == [0.25] and q["zero_point"].tolist() == [3.0]
    assert q["bits"] == 4 and not q["symmetric"]
    assert torch.equal((q["codes"] - q["zero_point"]) * q["scale"], qn.quantized_value(w))
    qc = QuantNoiseQuantizer(None, mode="int8", granularity="channel").export_qparams(w * 2)
    assert torch.allclose(qc["scale"], torch.tensor([6.0, 3.0]) / 127.5)  # per row max|2w|
    assert qc["symmetric"] and qc["zero_point"].tolist() == [0.0, 0.0]
    s = qc["scale"][:, None]
    assert torch.equal(qc["codes"], torch.mul(w * 2, s.reciprocal()).round().clamp(-128, 127)
                       .int())


@pytest.mark.parametrize("mode,gran", CASES)
def test_pack_save_load_identical_to_fully_quantized(mode, gran, tmp_path):
    m = make_qn(mode, gran)
    if mode == "pq":  # the packed codebook is fp16: make the trained one fp16-exact
        for q in _quantizers(m):
            q.centroids = q.centroids.half().float()
    x = _inputs()
    ref = m(*x)  # eval_p = 1: the fully quantized fake-quant forward
    w_before = [p.clone() for p in m.parameters()]
    p = pack_model(m, backend="torch")
    assert isinstance(p.emb, PackedEmbedding) and isinstance(p.conv, PackedConv2d)
    assert type(p.lin) is PackedLinear
    fmt = "codebook" if mode == "pq" else "uniform"
    assert p.emb.fmt == p.lin.fmt == p.conv.fmt == fmt
    for name in ("emb", "lin", "conv"):  # stored weight == phi(W), value for value
        fq = getattr(m, name)
        assert torch.equal(getattr(p, name).dequantize(),
                           fq.quantized_weight().reshape(fq.weight.shape[0], -1)), name
    assert torch.equal(p(*x), ref)
    save_packed(p, tmp_path / "qn.safetensors")
    loaded = load_packed(tmp_path / "qn.safetensors", Net().eval(), backend="torch")
    assert isinstance(loaded.emb, PackedEmbedding) and loaded.emb.emb_args["padding_idx"] == 0
    assert torch.equal(loaded(*x), ref)
    assert all(torch.equal(a, b) for a, b in zip(w_before, m.parameters()))  # float kept
    if mode != "pq":
        assert loaded.lin.bits == int(mode[3:]) and loaded.lin.scales.dtype == torch.float32
        if gran == "tensor":  # one scale and zero-point, repeated per row
            assert loaded.lin.scales.unique().numel() == 1
            assert loaded.lin.zeros.dtype == torch.uint8 and loaded.lin.zeros.unique().numel() == 1


def _brute_nearest(w, centroids, bs):
    """Index of the nearest codeword (squared distance, float64) of every block, by a loop."""
    blocks = w.detach().reshape(-1, bs).double()
    c = centroids.double()
    return torch.tensor([int(((c - b) ** 2).sum(1).argmin()) for b in blocks])


def test_pq_fp16_codebook_close_and_codes_are_nearest_of_current_weight():
    m = make_qn("pq", "tensor")
    x = _inputs()
    q = m.lin.weight_quantizer
    cents = q.centroids.clone()
    with torch.no_grad():  # an update after the last refit (pq_refresh = 1000 steps)
        m.lin.weight.mul_(1.5).add_(0.01)
    p = pack_model(m, backend="torch")
    torch.testing.assert_close(p(*x), m(*x), rtol=2e-3, atol=2e-3)  # fp16 centroids only
    assert torch.equal(q.centroids, cents)
    ref = _brute_nearest(m.lin.weight, cents, 8).reshape(64, 1024 // 8)
    assert torch.equal(p.lin.codes.long(), ref)
    assert p.lin.centroids.shape == (256, 8) and p.conv.centroids.shape == (256, 9)


def test_pq_never_run_is_fitted_on_export(tmp_path):
    m = make_qn("pq", "tensor", train_steps=0)
    assert all(q.centroids.numel() == 0 for q in _quantizers(m))
    p = pack_model(m, backend="torch")
    assert all(q.centroids.numel() == 0 for q in _quantizers(m))  # model itself untouched
    x = _inputs()
    ref = m(*x)  # the eval forward fits the same codebook (same seed and step)
    ref_codes = _brute_nearest(m.lin.weight, m.lin.weight_quantizer.centroids, 8)
    assert torch.equal(p.lin.codes.long(), ref_codes.reshape(64, -1))
    torch.testing.assert_close(p(*x), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode,gran", CASES)
def test_file_bytes_within_one_percent_of_summary(mode, gran, tmp_path):
    m = make_qn(mode, gran, train_steps=1)
    summary = {r.name: r.bits for r in model_storage_bits(m).layers}
    save_packed(pack_model(m), tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        in_file = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for layer in ("emb", "lin", "conv"):
        bits = sum(t.numel() * t.element_size() * 8 for k, t in in_file.items()
                   if k.startswith(layer + "."))
        assert abs(bits - summary[layer]) / summary[layer] < 0.01, (layer, bits, summary[layer])
    # hand-worked summary of the Linear: codes + fp32 scale(s) + fp32 bias, or
    # 8-bit indices + 256 x 8 fp16 centroids + fp32 bias
    qparams = {"int8": 32 + 8, "int4": 32 + 4}.get(mode, 0) if gran == "tensor" else 32 * 64
    want = {"int8": 8 * 65536 + qparams, "int4": 4 * 65536 + qparams,
            "pq": 8 * 65536 // 8 + 16 * 256 * 8}[mode] + 32 * 64
    assert summary["lin"] == want


def test_bad_pq_codebook_size():
    torch.manual_seed(0)
    m = nn.Sequential(QuantLinear.from_float(nn.Linear(16, 256), QuantNoiseQuantizer(
        9, mode="pq", eval_p=1.0, pq_n_iter=1)))
    with pytest.raises(ValueError, match=r"^0: Quant-Noise pq with 512 centroids.*at most 256"):
        pack_model(m)


# ---- tied embedding / output projection (one weight Parameter) ----------------------------

def _tied_lm(mode, seeds):
    from qtrain.models.transformer_lm import TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(64, dropout=0.0, tiny=True).eval()
    assert lm.output_projection.weight is lm.embed_tokens.weight
    kw = {"pq_n_iter": 2} if mode == "pq" else {}
    bits = 4 if mode == "pq" else None  # tiny table: 64 x 32 / 8 = 256 blocks
    lm.embed_tokens = QuantEmbedding.from_float(lm.embed_tokens, QuantNoiseQuantizer(
        bits, 0.1, 8, mode, "channel", seeds[0], eval_p=1.0, **kw))
    lm.output_projection = QuantLinear.from_float(lm.output_projection, QuantNoiseQuantizer(
        bits, 0.1, 8, mode, "channel", seeds[1], eval_p=1.0, **kw))
    assert lm.output_projection.weight is lm.embed_tokens.weight
    if mode == "pq":
        for layer in (lm.embed_tokens, lm.output_projection):
            q = layer.weight_quantizer
            q.quantized_value(layer.weight)
            q.centroids = q.centroids.half().float()
    return lm.eval()  # the new quantizer modules too (eval_p = 1)


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), json.loads(f.metadata()["tied"])


@pytest.mark.parametrize("mode,seeds", [("int8", (1, 2)), ("int4", (1, 2)), ("pq", (5, 5))])
def test_tied_embedding_output_projection_written_once(mode, seeds, tmp_path):
    from qtrain.models.transformer_lm import TransformerLM

    lm = _tied_lm(mode, seeds)
    tok = torch.randint(0, 64, (2, 7))
    ref = lm(tok)
    p = pack_model(lm)
    buf = "codes" if mode == "pq" else "packed"
    assert getattr(p.output_projection, buf) is getattr(p.embed_tokens, buf)
    info = save_packed(p, tmp_path / "t.safetensors")
    keys, tied = _file(tmp_path / "t.safetensors")
    assert not any(k.startswith("output_projection.") for k in keys)  # no bias: all tied
    assert tied[f"output_projection.{buf}"] == f"embed_tokens.{buf}"
    assert info["storage_bits"] == storage_bits(p)
    once = sum(t.numel() * t.element_size() * 8 for k, t in p.state_dict().items()
               if not k.startswith("output_projection."))
    assert info["storage_bits"] == once
    q = load_packed(tmp_path / "t.safetensors", TransformerLM(64, dropout=0.0, tiny=True).eval())
    assert getattr(q.output_projection, buf) is getattr(q.embed_tokens, buf)
    assert torch.equal(q(tok), ref)


def test_tied_pq_different_codebooks_stay_separate(tmp_path):
    """Two tied layers whose Quant-Noise codebooks differ (different seeds) are exported as
    two codebooks, so the file reproduces the fully quantized model exactly."""
    from qtrain.models.transformer_lm import TransformerLM

    lm = _tied_lm("pq", (1, 2))
    assert not torch.equal(lm.embed_tokens.weight_quantizer.centroids,
                           lm.output_projection.weight_quantizer.centroids)
    tok = torch.randint(0, 64, (2, 7))
    p = pack_model(lm)
    save_packed(p, tmp_path / "d.safetensors")
    keys, tied = _file(tmp_path / "d.safetensors")
    assert "output_projection.centroids" in keys and "output_projection.centroids" not in tied
    q = load_packed(tmp_path / "d.safetensors", TransformerLM(64, dropout=0.0, tiny=True).eval())
    assert torch.equal(q(tok), lm(tok))


# ---- the train.py command ------------------------------------------------------------------

def test_quant_noise_recipe_smoke_export(tmp_path):
    """``train.py recipe=quant_noise_int8_lm_wikitext103 debug=smoke export=true``; the file
    loads into a fresh float model and its test perplexity is the run's quantized one."""
    from hydra.utils import instantiate

    from qtrain.run import build_datamodule
    from tests.hydra_helpers import compose_cfg, run

    # the packed file holds the weights (activation ranges are not part of a packed layer):
    # compare with the run's weights-only quantized metric
    overrides = ["recipe=quant_noise_int8_lm_wikitext103", "debug=smoke", "export=true",
                 "quant.quantize_activations=false",
                 "callbacks.layer_report.png=false"]  # not what this checks: CPU
    s = run(overrides, tmp_path / "run")
    path = tmp_path / "run" / "model_packed.safetensors"
    assert s["packed_file"] == str(path) and path.exists() and s["packed_layers"] == 14
    assert 0 < s["packed_mb"] < s["quant_mb"]  # the summary also counts unsaved buffers
    cfg = compose_cfg(overrides, tmp_path / "load")
    dm = build_datamodule(cfg)
    q = load_packed(path, instantiate(cfg.model))
    assert isinstance(q.embed_tokens, PackedEmbedding) and q.embed_tokens.bits == 8
    assert q.output_projection.packed is q.embed_tokens.packed  # still tied
    module = instantiate(cfg.task, model=q)
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path / "load"))
    got = trainer.test(module, datamodule=dm, verbose=False)[0][f"test_{module.metric}"]
    assert got == pytest.approx(s["quant_metric"], rel=1e-5)
