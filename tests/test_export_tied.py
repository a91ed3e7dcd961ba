"""Export of tied weights (LM embedding = output projection): written once, re-tied on load."""

import json

import pytest
import torch
from safetensors import safe_open

from qtrain.export import checksum, load_packed, pack_model, save_packed, storage_bits
from qtrain.models.transformer_lm import TransformerLM
from qtrain.nn.pq_layers import PQEmbedding, PQLinear, pq_tied


def _lm(seed=0):
    torch.manual_seed(seed)
    return TransformerLM(64, dropout=0.0, tiny=True).eval()


def _keys_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), f.metadata()


def test_float_tied_lm_roundtrip(tmp_path):
    lm = _lm()
    tok = torch.randint(0, 64, (2, 7))
    info = save_packed(pack_model(lm), tmp_path / "f.safetensors")
    keys, meta = _keys_and_meta(tmp_path / "f.safetensors")
    assert "output_projection.weight" not in keys and "embed_tokens.weight" in keys
    assert json.loads(meta["tied"]) == {"output_projection.weight": "embed_tokens.weight"}
    assert info["storage_bits"] == 32 * sum(p.numel() for p in lm.parameters())  # once
    q = load_packed(tmp_path / "f.safetensors", _lm(seed=1))
    assert q.output_projection.weight is q.embed_tokens.weight
    assert torch.equal(q(tok), lm(tok))


def test_ipq_tied_lm_one_codebook_in_file(tmp_path):
    lm = _lm()
    lm.embed_tokens = PQEmbedding.from_float(lm.embed_tokens, 8, 16, n_iter=2)
    lm.output_projection = pq_tied(lm.output_projection, lm.embed_tokens)
    tok = torch.randint(0, 64, (2, 7))
    p = pack_model(lm)
    assert isinstance(p.output_projection, PQLinear)  # tied codebook kept as PQ layers
    assert p.output_projection.centroids is p.embed_tokens.centroids
    info = save_packed(p, tmp_path / "q.safetensors")
    keys, meta = _keys_and_meta(tmp_path / "q.safetensors")
    assert not any(k.startswith("output_projection.") for k in keys)
    once = sum(t.numel() * (8 if k == "embed_tokens.assignments" else t.element_size() * 8)
               for k, t in p.state_dict().items() if not k.startswith("output_projection."))
    assert info["storage_bits"] == storage_bits(p) == once  # uint8 indices, codebook once
    assert 0 <= info["file_bytes"] - info["storage_bits"] // 8 < 8192
    q = load_packed(tmp_path / "q.safetensors", _lm(seed=2))  # plain float skeleton
    assert isinstance(q.embed_tokens, PQEmbedding)
    assert q.output_projection.centroids is q.embed_tokens.centroids
    assert torch.equal(q(tok), lm(tok))


def test_inconsistent_tie_metadata(tmp_path):
    from safetensors.torch import save_file

    lm = _lm()
    save_packed(pack_model(lm), tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["tied"] = json.dumps({"output_projection.weight": "nothing.weight"})
    meta["sha256"] = checksum(t, meta)  # re-signed: test the tie check beyond the checksum
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="tied tensor 'output_projection.weight'"):
        load_packed(tmp_path / "bad.safetensors", _lm())
