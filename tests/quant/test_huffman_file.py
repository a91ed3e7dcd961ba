"""Canonical Huffman streams and the Deep Compression file (qtrain.quant.huffman) against
codes worked by hand (RFC 1951's example) and :func:`qtrain.quant.size.huffman_bits`."""

import json
import struct

import pytest
import torch

from qtrain.errors import DataFileError
from qtrain.quant import huffman as H
from qtrain.quant import pruning as P
from qtrain.quant.size import huffman_bits


def test_canonical_codes_rfc1951_example():
    # RFC 1951 sec. 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) for A..H give
    # F=00 A=010 B=011 C=100 D=101 E=110 G=1110 H=1111
    lengths = dict(enumerate((3, 3, 3, 3, 3, 2, 4, 4)))
    got = {s: format(c, f"0{ln}b") for s, (c, ln) in H.canonical_codes(lengths).items()}
    assert got == {5: "00", 0: "010", 1: "011", 2: "100", 3: "101", 4: "110",
                   6: "1110", 7: "1111"}


def test_encode_worked_by_hand_and_roundtrip():
    # weight symbols of the hand-worked 2x6 layer (tests/quant/test_pruning.py):
    # [0, 3, 1, 2, 3, 1], counts 1/2/1/2 (Huffman: every symbol at depth 2)
    sym = torch.tensor([0, 3, 1, 2, 3, 1])
    data, n_bits, lengths = H.encode(sym)
    assert n_bits == huffman_bits(sym) == 12
    assert sorted(lengths.values()) == [2, 2, 2, 2]  # 4 symbols, 6 = 1+1+2+2: all length 2
    # canonical: 0=00 1=01 2=10 3=11 -> 00 11 01 10 11 01 -> 0b00110110 0b1101(0000)
    assert data == bytes([0b00110110, 0b11010000])
    assert H.decode(data, n_bits, lengths, 6).tolist() == sym.tolist()
    skew = torch.tensor([7] * 13 + [2] * 5 + [9] * 2 + [4])  # lengths 1, 2, 3, 3
    data, n_bits, lengths = H.encode(skew)
    assert lengths == {7: 1, 2: 2, 9: 3, 4: 3} and n_bits == 13 + 10 + 6 + 3
    assert H.decode(data, n_bits, lengths, skew.numel()).tolist() == skew.tolist()


def test_random_streams_roundtrip_at_huffman_bits():
    g = torch.Generator().manual_seed(0)
    for k, n in ((2, 1), (5, 300), (64, 5000)):
        probs = torch.rand(k, generator=g) ** 3 + 1e-3
        sym = torch.multinomial(probs, n, replacement=True, generator=g)
        data, n_bits, lengths = H.encode(sym)
        assert n_bits == huffman_bits(sym) and len(data) == (n_bits + 7) // 8
        assert torch.equal(H.decode(data, n_bits, lengths, n), sym)
    assert H.encode(torch.zeros(0, dtype=torch.long))[:2] == (b"", 0)


def test_file_roundtrip_sizes_and_corruption(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 50, generator=g)
    mask = w.abs() > 1.6  # ~11% kept: long gaps -> filler zeros with 5-bit indices
    codes = torch.randint(0, 31, w.shape, generator=g)
    centroids = torch.linspace(-2, 2, 31)
    bias = torch.randn(30, generator=g)
    path = tmp_path / "m.dch"
    size = H.write_dc_file(path, {"fc": {"mask": mask, "codes": codes, "centroids": centroids,
                                         "index_bits": 5, "bias": bias}})
    got = H.read_dc_file(path)["fc"]
    assert torch.equal(got["weight"], P.shared_weight(centroids, codes, mask))
    assert torch.equal(got["bias"], bias)
    r = P.sparse_layer_size(mask, codes, 31, 5, bias_numel=30)
    assert r.fillers > 0
    raw = path.read_bytes()
    (n,) = struct.unpack("<I", raw[4:8])
    top = json.loads(raw[8:8 + n])
    head = dict(zip(top["keys"], top["layers"][0]))
    assert (head["weight_bits"], head["index_bits_total"]) == (r.huffman_weight_bits,
                                                               r.huffman_index_bits)
    payload = (r.huffman_weight_bits + 7) // 8 + (r.huffman_index_bits + 7) // 8 + 4 * (31 + 30) \
        + 32 + 32  # code tables: K + 1 = 32 weight symbols, 2^5 index symbols, a byte each
    assert size == len(raw) == 8 + n + payload
    (tmp_path / "bad.dch").write_bytes(b"XXXX" + raw[4:])
    with pytest.raises(DataFileError, match="magic"):
        H.read_dc_file(tmp_path / "bad.dch")
    cut = bytearray(raw)
    cut[8 + n + 1] ^= 0xFF  # a flipped byte in the weight stream
    (tmp_path / "flip.dch").write_bytes(bytes(cut))
    with pytest.raises(DataFileError, match="CRC"):
        H.read_dc_file(tmp_path / "flip.dch")
    (tmp_path / "cut.dch").write_bytes(raw[:-3])
    with pytest.raises(DataFileError, match="CRC"):
        H.read_dc_file(tmp_path / "cut.dch")
