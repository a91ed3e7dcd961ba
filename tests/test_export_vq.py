"""Export of post-training VQ layers (Gong et al. 2014): kmeans -> lut, pq -> codebook,
rq -> rq. Save -> load gives identical outputs; file size vs storage bits; rq triton == torch;
load validation."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qtrain.callbacks.vector_quant import VectorQuantizationCallback
from qtrain.export import checksum, load_packed, pack_model, save_packed
from qtrain.nn.packed import PackedLinear
from qtrain.nn.packed_rq import rq_layer
from qtrain.quant.size import model_storage_bits

CFG = {"kmeans": {"bits": 4}, "pq": {"n_centroids": 4, "block_size": 4},  # per segment
       "pq_shared": {"n_centroids": 16, "block_size": 4, "codebook": "shared"},
       "rq": {"n_centroids": 16, "block_size": 4, "n_stages": 2}}
FMT = {"kmeans": "lut", "pq": "codebook", "pq_shared": "codebook", "rq": "rq"}


def _quantize(model, method, n_iter=5, **kw):
    cb = VectorQuantizationCallback(method.split("_")[0], n_iter=n_iter,
                                    **{**CFG[method], **kw})
    cb.setup(None, model)
    cb.apply(model)
    return model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


@pytest.mark.parametrize("method", ["kmeans", "pq", "pq_shared", "rq"])
def test_export_load_identical_outputs(method, tmp_path):
    model = _quantize(_mlp(), method).eval()
    x = torch.randn(6, 32)
    ref = model(x)
    packed = pack_model(model, backend="torch")
    assert packed[0].fmt == FMT[method] and packed[2].fmt == FMT[method]
    assert torch.equal(packed(x), ref)  # fp16 codebooks in the model: bit-exact
    path = tmp_path / "m.safetensors"
    save_packed(packed, path)
    loaded = load_packed(path, _mlp(), backend="torch")
    assert torch.equal(loaded(x), ref)
    assert loaded[2].fmt == FMT[method]
    if method == "pq":  # one codebook per column segment travels as (K / bs, n_centroids, bs)
        assert loaded[0].centroids.shape == (8, 4, 4) and loaded[2].centroids.shape == (6, 4, 4)


@pytest.mark.parametrize("method,bits_per_weight", [("kmeans", 4), ("pq_shared", 2), ("rq", 4)])
def test_file_size_matches_storage_bits_long_rows(method, bits_per_weight, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 64))  # 262k weights, rows of 4096
    kw = {"n_centroids": 256} if method != "kmeans" else {}
    _quantize(model, method, n_iter=2, **kw)
    bits = model_storage_bits(model).total_bits  # what the run summary reports
    info = save_packed(pack_model(model), tmp_path / "m.safetensors")
    assert info["file_bytes"] * 8 == pytest.approx(bits, rel=0.01)
    # b bits per weight (not a byte per code)
    assert info["file_bytes"] * 8 < 1.01 * (bits_per_weight * 4096 * 64 + 64 * 32 + 2 * 256 * 64)


def test_pq_segments_file_size_matches_storage_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096))  # 4096 rows: 16 segments of 4, K = 256 each
    _quantize(model, "pq", n_iter=2, n_centroids=256)
    bits = model_storage_bits(model).total_bits
    # by hand: 8-bit index per block + 16 fp16 codebooks of 256 x 4 + fp32 bias
    assert bits == 4096 * 16 * 8 + 16 * 256 * 4 * 16 + 4096 * 32
    info = save_packed(pack_model(model), tmp_path / "m.safetensors")
    assert info["file_bytes"] * 8 == pytest.approx(bits, rel=0.01)


def test_pq_segments_load_validation(tmp_path):
    model = _quantize(_mlp(), "pq").eval()
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(model, backend="torch"), path)

    def bad_code(t):
        t["0.codes"] = t["0.codes"].clone()
        t["0.codes"][1, 0] = 4  # only 4 centroids per segment

    _rewrite(path, tmp_path / "a.safetensors", bad_code)
    with pytest.raises(ValueError, match=r"0\.codes holds 4; only 4 centroids"):
        load_packed(tmp_path / "a.safetensors", _mlp())

    def fewer_segments(t):
        t["2.centroids"] = t["2.centroids"][:5].clone()

    _rewrite(path, tmp_path / "b.safetensors", fewer_segments)
    with pytest.raises(ValueError, match=r"2\.centroids is .* shape \(6, 4, 4\)"):
        load_packed(tmp_path / "b.safetensors", _mlp())


def test_rq_triton_equals_torch_and_reference():
    torch.manual_seed(0)
    m, n, kc, bs, k = 3, 20, 6, 8, 64
    codes = torch.randint(0, k, (m, n, kc))
    cents = torch.randn(m, k, bs)
    bias = torch.randn(n)
    tri = rq_layer(codes, cents, bias, backend="triton")
    tor = rq_layer(codes, cents, bias, backend="torch")
    w = torch.zeros(n, kc * bs)  # brute force: sum over stages of fp16 centroids
    for s in range(m):
        w += cents[s].half().float()[codes[s]].reshape(n, -1)
    assert torch.equal(tor.dequantize(), w)
    for rows in (1, 37):  # GEMV and GEMM kernels
        x = torch.randn(rows, kc * bs)
        yt, yr = tri(x), tor(x)
        torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yr, x @ w.t() + bias, rtol=1e-5, atol=1e-5)


def _rewrite(path, out, edit_tensors=None, edit_meta=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["sha256"] = checksum(tensors, meta)  # re-signed: test the checks beyond the checksum
    save_file(tensors, str(out), metadata=meta)


def test_rq_load_validation(tmp_path):
    model = _quantize(_mlp(), "rq").eval()
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(model, backend="torch"), path)

    def bad_code(t):
        t["0.codes"] = t["0.codes"].clone()
        t["0.codes"][1, 0, 0] = 16  # only 16 centroids

    _rewrite(path, tmp_path / "a.safetensors", bad_code)
    with pytest.raises(ValueError, match="code 16 out of range for 16 centroids"):
        load_packed(tmp_path / "a.safetensors", _mlp())

    def three_stages(meta):
        layers = json.loads(meta["layers"])
        layers["0"]["n_stages"] = 3
        meta["layers"] = json.dumps(layers)

    _rewrite(path, tmp_path / "b.safetensors", edit_meta=three_stages)
    with pytest.raises(ValueError, match=r"0\.centroids is .* expected .* shape \(3, 16, 4\)"):
        load_packed(tmp_path / "b.safetensors", _mlp())

    def half_codes(t):
        t["2.codes"] = t["2.codes"].to(torch.int32)

    _rewrite(path, tmp_path / "c.safetensors", half_codes)
    with pytest.raises(ValueError, match=r"2\.codes is"):
        load_packed(tmp_path / "c.safetensors", _mlp())


def test_rq_layer_bad_input():
    with pytest.raises(ValueError, match="centroids must be"):
        rq_layer(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 300, 4))
    with pytest.raises(ValueError, match="codes must lie in"):
        rq_layer(torch.full((2, 3, 4), 5), torch.zeros(2, 5, 4))
    assert isinstance(rq_layer(torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 5, 4)),
                      PackedLinear)
