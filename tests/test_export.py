"""Export: pack a fake-quant / PQ model, save, load -> identical outputs; sizes; validation."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.errors import DataFileError
from qtrain.export import checksum, load_packed, pack_model, save_packed
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.packed import PackedConv2d, PackedLinear
from qtrain.nn.uniform_quantizer import UniformQuantizer


def make_float():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))


def make_trained():
    torch.manual_seed(0)
    m = make_float()
    m[0] = QuantConv2d.from_float(m[0], UniformQuantizer(4, granularity="channel"),
                                  UniformQuantizer(8, symmetric=False, observer="ema"))
    m[4] = QuantLinear.from_float(m[4], UniformQuantizer(4, symmetric=False,
                                                         granularity="group", group_size=32))
    m.train()
    for _ in range(3):  # BatchNorm statistics and activation ranges move away from defaults
        m(torch.randn(8, 3, 4, 4) * 2 + 1)
    return m.eval()


def test_pack_save_load_identical(tmp_path):
    m = make_trained()
    x = torch.randn(5, 3, 4, 4)
    p = pack_model(m, backend="torch", scale_dtype=torch.float32)
    assert isinstance(p[0], PackedConv2d) and isinstance(p[4], PackedLinear)
    assert type(p[6]) is nn.Linear  # plain float layer kept (bits=None)
    assert torch.equal(p(x), m(x))  # exact trained codes/scales, BN stats, act quantizer
    report = save_packed(p, tmp_path / "m.safetensors")
    q = load_packed(tmp_path / "m.safetensors", make_float(), backend="torch").eval()
    assert torch.equal(q(x), m(x))
    assert torch.equal(q[1].running_mean, m[1].running_mean) and m[1].running_mean.abs().sum() > 0
    qt = load_packed(tmp_path / "m.safetensors", make_float(), backend="triton").eval()
    torch.testing.assert_close(qt(x), m(x), rtol=1e-5, atol=1e-5)
    assert report["n_packed_layers"] == 2


def test_file_size_matches_storage_formula(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256, bias=False))
    p = pack_model(model, bits=4, group_size=128, symmetric=False, backend="torch",
                   scale_dtype=torch.float16)
    r = save_packed(p, tmp_path / "w.safetensors")
    # codes 4 bit + per-group fp16 scale (the named option) + uint8 zero; fp32 bias
    l1 = 512 * 512 * 4 + (512 * 4) * (16 + 8) + 512 * 32
    l2 = 256 * 512 * 4 + (256 * 4) * (16 + 8)
    assert r["storage_bits"] == l1 + l2
    assert abs(r["file_bytes"] * 8 - (l1 + l2)) / (l1 + l2) < 0.01
    assert r["file_bytes"] * 8 < 0.15 * 32 * (512 * 512 + 512 + 256 * 512)  # vs fp32


class FakePQLinear(nn.Linear):
    """Duck-typed PQ layer in fairseq's assignment order (block j of row n at j * N + n)."""

    def __init__(self, n, k, bs, n_centroids, seed):
        super().__init__(k, n)
        g = torch.Generator().manual_seed(seed)
        self.block_size = bs
        self.centroids = nn.Parameter(torch.randn(n_centroids, bs, generator=g).half().float())
        self.register_buffer("assignments", torch.randint(0, n_centroids, (k // bs * n,),
                                                          generator=g))

    def weight_from_codebook(self):
        n, k, bs = self.out_features, self.in_features, self.block_size
        return self.centroids[self.assignments].reshape(k // bs, n, bs).permute(1, 0, 2).reshape(n, k)

    def forward(self, x):
        return nn.functional.linear(x, self.weight_from_codebook(), self.bias)


def test_pq_layer_export(tmp_path):
    model = nn.Sequential(FakePQLinear(12, 32, 8, 16, seed=1), nn.ReLU())
    p = pack_model(model, backend="triton")
    assert p[0].fmt == "codebook"
    x = torch.randn(3, 32)
    torch.testing.assert_close(p(x), model(x), rtol=1e-5, atol=1e-5)
    save_packed(p, tmp_path / "pq.safetensors")
    skeleton = nn.Sequential(nn.Linear(32, 12), nn.ReLU())
    q = load_packed(tmp_path / "pq.safetensors", skeleton, backend="torch")
    torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)


def _rewrite(path, out, meta_update=None, drop=None, replace=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(meta_update or {})
    if drop:
        t.pop(drop)
    t.update(replace or {})
    meta["sha256"] = checksum(t, meta)  # a consistent (re-signed) file: test what lies beyond
    save_file(t, str(out), metadata=meta)
    return out


def test_load_validation(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    p = pack_model(model, bits=4, group_size=32, backend="torch")
    src = tmp_path / "a.safetensors"
    save_packed(p, src)
    bad = _rewrite(src, tmp_path / "v.safetensors", {"format_version": "0"})
    with pytest.raises(ValueError, match="format_version='0'; expected 1"):
        load_packed(bad, model)
    bad = _rewrite(src, tmp_path / "l.safetensors", {"layout": "other"})
    with pytest.raises(ValueError, match="layout='other'"):
        load_packed(bad, model)
    bad = _rewrite(src, tmp_path / "d.safetensors", drop="1.running_var")
    with pytest.raises(ValueError, match=r"missing tensors \['1.running_var'\]"):
        load_packed(bad, model)
    bad = _rewrite(src, tmp_path / "s.safetensors", replace={"0.scales": torch.ones(32, 3)})
    with pytest.raises(ValueError, match=r"0.scales is .* expected .* shape \(32, 2\)"):
        load_packed(bad, model)
    bad = _rewrite(src, tmp_path / "b.safetensors", replace={"1.weight": torch.ones(31)})
    with pytest.raises(ValueError, match="tensor '1.weight' is torch.float32 \\(31,\\)"):
        load_packed(bad, model)
    with safe_open(str(src), framework="pt") as f:
        assert json.loads(f.metadata()["layers"])["0"]["group_size"] == 32
    with pytest.raises(DataFileError, match="0: a packed layer in the file, no such layer"):
        load_packed(src, nn.Sequential())


def test_real_pq_linear_export():
    from qtrain.nn.pq_layers import PQLinear

    torch.manual_seed(0)
    model = nn.Sequential(PQLinear.from_float(nn.Linear(32, 12), block_size=8, n_centroids=16))
    p = pack_model(model, backend="torch")
    assert isinstance(p[0], PackedLinear) and p[0].fmt == "codebook"
    x = torch.randn(3, 32)
    torch.testing.assert_close(p(x), model(x), rtol=1e-3, atol=1e-3)  # fp16 codebook


class _EmbedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(600, 16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, idx):
        h = self.emb(idx)  # (b, t, 16)
        return self.conv(h.transpose(1, 2).unsqueeze(-1)).sum()


def test_unpacked_pq_layers_store_uint8_indices(tmp_path):
    """PQEmbedding / PQConv2d stay PQ layers in the file; their indices are written as uint8
    (K <= 256), the file matches the storage formula, and loading restores identical outputs."""
    from qtrain.export import storage_bits
    from qtrain.nn.pq_layers import PQConv2d, PQEmbedding

    torch.manual_seed(0)
    model = _EmbedConvNet()
    model.emb = PQEmbedding.from_float(model.emb, block_size=8, n_centroids=64, n_iter=5)
    model.conv = PQConv2d.from_float(model.conv, block_size=9, n_centroids=32, n_iter=5)
    idx = torch.randint(0, 600, (2, 5))
    ref = model(idx)
    p = pack_model(model)
    info = save_packed(p, tmp_path / "pq.safetensors")
    n_idx = model.emb.assignments.numel() + model.conv.assignments.numel()
    # 8 bits per index instead of 64: the file holds n_idx bytes of indices
    assert storage_bits(p) == sum(t.numel() * t.element_size() * 8
                                  for t in p.state_dict().values()) - 56 * n_idx
    assert 0 <= info["file_bytes"] - info["storage_bits"] // 8 < 4096  # header + metadata only
    skeleton = _EmbedConvNet()
    skeleton.emb = PQEmbedding.from_float(skeleton.emb, block_size=8, n_centroids=64, n_iter=1)
    skeleton.conv = PQConv2d.from_float(skeleton.conv, block_size=9, n_centroids=32, n_iter=1)
    q = load_packed(tmp_path / "pq.safetensors", skeleton, backend="torch")
    assert q.emb.assignments.dtype == torch.int64
    assert torch.equal(q(idx), ref)
