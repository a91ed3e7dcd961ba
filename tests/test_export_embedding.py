"""Export of uniform-quantized embeddings (``QuantEmbedding`` + ``UniformQuantizer``, Jacob et
al. 2018; Q-BERT ``GroupwiseQuantizer``, Shen et al. 2019) as :class:`PackedEmbedding` in the
uniform packed format: exact codes / scales, file size = storage bits, ties kept."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qtrain.export import load_packed, pack_model, save_packed
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.format_quantizers import PowerOfTwoQuantizer
from qtrain.nn.groupwise_quantizer import GroupwiseQuantizer
from qtrain.nn.packed import PackedEmbedding, PackedLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant.size import model_storage_bits

V, D = 32, 2048  # rows of 2048 codes: one fp32 scale (+ uint8 zero) per row is < 1% of them


def _uq(sym, gran, bits=4):
    return UniformQuantizer(bits, symmetric=sym, granularity=gran,
                            group_size=128 if gran == "group" else None)


# (name, factory(sym)) -- every weight quantizer that must pack into the uniform format
QUANTIZERS = [("tensor", lambda s: _uq(s, "tensor")), ("channel", lambda s: _uq(s, "channel")),
              ("group", lambda s: _uq(s, "group")),
              ("qbert", lambda s: GroupwiseQuantizer(4, num_groups=6, num_heads=2, symmetric=s))]
CASES = [(n, s) for n, _ in QUANTIZERS for s in (True, False)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D, 5)  # float layer, kept as it is

    def forward(self, idx):
        return self.head(self.emb(idx))


def make(name, sym):
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():  # rows of different ranges (per-row / per-group scales differ)
        m.emb.weight.mul_(torch.linspace(0.1, 3.0, V)[:, None]).add_(0.05)
    m.emb = QuantEmbedding.from_float(m.emb, dict(QUANTIZERS)[name](sym))
    return m.eval()


def _tok(seed=0):
    return torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(seed))


def test_hand_worked_codes_and_zero_points():
    """2-bit affine per row: row 0 [-2, 0.5, 4]: S = 6 / 3 = 2, Z = 0 - round(-1) = 1,
    codes round(x / 2) + 1 = [0, 1, 3] -> [-2, 0, 4]; row 1 [0, 1.5, 3]: S = 1, Z = 0,
    codes [0, 2, 3] (1.5 -> 2, half to even) -> [0, 2, 3]."""
    emb = nn.Embedding(2, 3)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[-2.0, 0.5, 4.0], [0.0, 1.5, 3.0]]))
    m = nn.Sequential(QuantEmbedding.from_float(emb, _uq(False, "channel", bits=2)))
    p = pack_model(m, backend="torch", scale_dtype=torch.float32)
    assert isinstance(p[0], PackedEmbedding) and p[0].bits == 2 and not p[0].symmetric
    assert p[0].zeros.tolist() == [[1], [0]] and p[0].scales.tolist() == [[2.0], [1.0]]
    assert p[0].dequantize().tolist() == [[-2.0, 0.0, 4.0], [0.0, 2.0, 3.0]]
    assert p(torch.tensor([1, 0])).tolist() == [[0.0, 2.0, 3.0], [-2.0, 0.0, 4.0]]


@pytest.mark.parametrize("name,sym", CASES)
def test_pack_save_load_identical(name, sym, tmp_path):
    m = make(name, sym)
    x = _tok()
    ref = m(x)
    w_before = [t.clone() for t in m.parameters()]
    p = pack_model(m, backend="torch", scale_dtype=torch.float32)
    assert isinstance(p.emb, PackedEmbedding) and p.emb.fmt == "uniform"
    assert p.emb.bits == 4 and p.emb.symmetric == sym and type(p.head) is nn.Linear
    assert p.emb.group_size == (128 if name == "group" else None)
    assert torch.equal(p.emb.dequantize(), m.emb.quantized_weight())  # phi(W), value for value
    assert torch.equal(p(x), ref)
    save_packed(p, tmp_path / "e.safetensors")
    q = load_packed(tmp_path / "e.safetensors", Net().eval(), backend="torch")
    assert isinstance(q.emb, PackedEmbedding) and q.emb.emb_args["padding_idx"] == 0
    assert q.emb.scales.dtype == torch.float32
    assert torch.equal(q(x), ref)
    assert all(torch.equal(a, b) for a, b in zip(w_before, m.parameters()))  # float kept


@pytest.mark.parametrize("name,sym", CASES)
def test_file_bytes_within_one_percent_of_storage_bits(name, sym, tmp_path):
    m = make(name, sym)
    summary = {r.name: r.bits for r in model_storage_bits(m).layers}
    n_params = {"tensor": 1, "channel": V, "group": V * D // 128, "qbert": 6}[name]
    assert summary["emb"] == 4 * V * D + n_params * (32 + (0 if sym else 4))  # hand-worked
    save_packed(pack_model(m, scale_dtype=torch.float32), tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        bits = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8
                   for k in f.keys() if k.startswith("emb."))  # noqa: SIM118
    assert abs(bits - summary["emb"]) / summary["emb"] < 0.01, (bits, summary["emb"])


def test_default_fp32_scales_exact_fp16_option_close():
    m = make("channel", False)
    p = pack_model(m, backend="torch")  # scale_dtype float32: the pack_model default
    assert p.emb.scales.dtype == torch.float32 and torch.equal(p(_tok()), m(_tok()))
    p = pack_model(m, backend="torch", scale_dtype=torch.float16)  # the named option
    assert p.emb.scales.dtype == torch.float16 and not torch.equal(p(_tok()), m(_tok()))
    torch.testing.assert_close(p(_tok()), m(_tok()), rtol=2e-3, atol=2e-3)


def test_groupwise_linear_packed_too():
    """Q-BERT groups of whole rows in a Linear: same per-row uniform format, exact output."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 12)
    with torch.no_grad():
        lin.weight.mul_(torch.arange(1, 13.0)[:, None])
    m = nn.Sequential(QuantLinear.from_float(lin, GroupwiseQuantizer(3, 4, 2, symmetric=False)))
    x = torch.randn(5, 64)
    p = pack_model(m, backend="torch", scale_dtype=torch.float32)
    assert type(p[0]) is PackedLinear and p[0].bits == 3
    assert p[0].scales.unique().numel() == 4  # 4 groups of 3 rows: scale repeated per row
    assert torch.equal(p(x), m(x))


def test_per_channel_axis1_and_other_quantizers():
    emb = nn.Embedding(8, 16)
    bad = nn.Sequential(QuantEmbedding.from_float(emb, UniformQuantizer(8, granularity="channel",
                                                                        axis=1)))
    with pytest.raises(ValueError, match=r"^0: per-channel export needs axis=0, got 1"):
        pack_model(bad)
    kept = nn.Sequential(QuantEmbedding.from_float(nn.Embedding(8, 16), PowerOfTwoQuantizer(4)))
    assert type(pack_model(kept)[0]) is QuantEmbedding  # not a uniform format: left as is


# ---- tied embedding / output projection (one weight Parameter) ----------------------------

@pytest.mark.parametrize("name", ["tensor", "channel", "qbert"])
def test_tied_embedding_output_projection_stays_tied(name, tmp_path):
    from qtrain.models.transformer_lm import TransformerLM

    make_q = {"tensor": lambda: _uq(True, "tensor", 8), "channel": lambda: _uq(False, "channel"),
              "qbert": lambda: GroupwiseQuantizer(8, num_groups=8)}[name]
    torch.manual_seed(0)
    lm = TransformerLM(64, dropout=0.0, tiny=True)
    lm.embed_tokens = QuantEmbedding.from_float(lm.embed_tokens, make_q())
    lm.output_projection = QuantLinear.from_float(lm.output_projection, make_q())
    assert lm.output_projection.weight is lm.embed_tokens.weight
    lm.eval()
    tok = torch.randint(0, 64, (2, 7))
    ref = lm(tok)
    p = pack_model(lm, backend="torch", scale_dtype=torch.float32)
    assert isinstance(p.embed_tokens, PackedEmbedding)
    assert p.output_projection.packed is p.embed_tokens.packed
    assert p.output_projection.scales is p.embed_tokens.scales
    assert torch.equal(p(tok), ref)
    info = save_packed(p, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        keys, tied = set(f.keys()), json.loads(f.metadata()["tied"])
    assert not any(k.startswith("output_projection.") for k in keys)  # no bias: all tied
    assert tied["output_projection.packed"] == "embed_tokens.packed"
    once = sum(t.numel() * t.element_size() * 8 for k, t in p.state_dict().items()
               if not k.startswith("output_projection."))
    assert info["storage_bits"] == once
    q = load_packed(tmp_path / "t.safetensors", TransformerLM(64, dropout=0.0, tiny=True).eval(),
                    backend="torch")
    assert q.output_projection.packed is q.embed_tokens.packed
    assert torch.equal(q(tok), ref)
