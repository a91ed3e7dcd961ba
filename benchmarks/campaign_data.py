"""CIFAR-10 for the GPU campaign (benchmarks/gpu_campaign.sh): pack the shared JPEG copy small
enough to travel to the device machine, and turn it back into the pickle layout that
``data=cifar10`` reads.

    python benchmarks/campaign_data.py pack SRC OUT      # here: SRC/{train,test}_jpeg.npz -> OUT
    python benchmarks/campaign_data.py unpack OUT ROOT   # there: -> ROOT/cifar-10-batches-py/

SRC is the shared copy's format (``jpeg`` uint8 bytes concatenated, ``offsets``, ``labels``,
``classes``; ``names`` is dropped). Every image of that copy starts with the same 623-byte JPEG
header (quantisation and Huffman tables, frame and scan headers: one encoder, one quality), so
``pack`` stores that header once and each image's entropy-coded rest: 62 MB -> ~18 MB, which
keeps the working tree plus data under the device machine's 64 MiB transfer limit. ``unpack``
rebuilds every JPEG byte for byte (the SHA-256 of the concatenated original bytes is stored by
``pack`` and checked; a mismatch stops with an error) and decodes it to RGB with Pillow, or with
``torchvision.io.decode_jpeg`` where Pillow is missing; both are libjpeg(-turbo) decoders. The
decoder used and the SHA-256 of the decoded pixels go into ``ROOT/campaign_data.json``.

The pickle layout is the one of the shared ``materialize.py --format pickle`` (the files the
recipes' CPU numbers were measured on): one fixed shuffle (``default_rng(0)``), five train
batches, ``test_batch``, ``batches.meta``, bytes keys. Checksums differ from the official
release: train with ``data.verify_checksums=false``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import sys

import numpy as np

SPLITS = ("train", "test")
SOS = b"\xff\xda"  # start of scan: the entropy-coded data follows its header segment


class CampaignDataError(RuntimeError):
    pass


def jpeg_header_len(blob: bytes) -> int:
    """Bytes up to the end of the start-of-scan segment (everything before the image data)."""
    k = blob.find(SOS)
    if k < 0 or k + 4 > len(blob):
        raise CampaignDataError("not a baseline JPEG: no start-of-scan marker")
    return k + 2 + int.from_bytes(blob[k + 2:k + 4], "big")


def _blobs(jpeg: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = jpeg.tobytes()
    return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def pack_split(src: str, dst: str) -> dict:
    """``src`` (the shared ``*_jpeg.npz``) -> ``dst``: one common header + per-image rests.
    Images whose header differs from the first one's keep their full bytes (header_len 0
    for the split), so any JPEG set packs; the shared copy has one header."""
    z = np.load(src)
    for key in ("jpeg", "offsets", "labels", "classes"):
        if key not in z.files:
            raise CampaignDataError(f"{src}: no {key!r} array (has {z.files})")
    jpeg, offsets = z["jpeg"], z["offsets"].astype(np.int64)
    blobs = _blobs(jpeg, offsets)
    if len(blobs) != len(z["labels"]):
        raise CampaignDataError(f"{src}: {len(blobs)} images but {len(z['labels'])} labels")
    header = blobs[0][:jpeg_header_len(blobs[0])]
    if not all(b.startswith(header) for b in blobs):
        header = b""
    rests = [b[len(header):] for b in blobs]
    lens = np.fromiter((len(r) for r in rests), np.int64, len(rests))
    body_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    np.savez(dst, header=np.frombuffer(header, np.uint8), body=np.frombuffer(b"".join(rests), np.uint8),
             offsets=body_offsets, labels=z["labels"].astype(np.int64), classes=z["classes"],
             sha256=np.array(hashlib.sha256(jpeg.tobytes()).hexdigest()))
    return {"images": len(blobs), "header_bytes": len(header), "bytes": os.path.getsize(dst)}


def unpack_blobs(path: str) -> tuple[list[bytes], np.ndarray, list[str]]:
    """The original JPEG files of a packed split (checked against the stored SHA-256)."""
    z = np.load(path)
    header = z["header"].tobytes()
    blobs = [header + r for r in _blobs(z["body"], z["offsets"])]
    got = hashlib.sha256(b"".join(blobs)).hexdigest()
    if got != str(z["sha256"]):
        raise CampaignDataError(f"{path}: rebuilt JPEG bytes have SHA-256 {got}, the packed "
                                f"original {z['sha256']}: the file is damaged; pack it again")
    return blobs, z["labels"], [str(c) for c in z["classes"]]


def _decode_pil_chunk(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def _decode_pil(blobs: list[bytes], chunk: int = 5000) -> np.ndarray:
    """Pillow decoding, in up to 8 processes for large sets (the device has 16 cores)."""
    import PIL  # noqa: F401  (ImportError here: the caller falls back to torchvision)

    workers = min(8, os.cpu_count() or 1, -(-len(blobs) // chunk))
    if workers <= 1:
        return _decode_pil_chunk(blobs)
    from concurrent.futures import ProcessPoolExecutor

    parts = [blobs[i:i + chunk] for i in range(0, len(blobs), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_decode_pil_chunk, parts)))


def _decode_torchvision(blobs: list[bytes]) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out = [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
           for b in blobs]
    return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


def decode(blobs: list[bytes], decoder: str = "auto") -> tuple[np.ndarray, str]:
    """uint8 ``(N, H, W, 3)`` RGB pixels and the decoder that made them (``auto``: Pillow,
    else torchvision)."""
    order = {"auto": ("pil", "torchvision"), "pil": ("pil",), "torchvision": ("torchvision",)}
    if decoder not in order:
        raise CampaignDataError(f"decoder={decoder!r}; allowed: {sorted(order)}")
    errors = []
    for name in order[decoder]:
        try:
            fn = _decode_pil if name == "pil" else _decode_torchvision
            return fn(blobs), name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise CampaignDataError("no JPEG decoder: " + "; ".join(errors))


def write_pickles(root: str, split: str, x: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
    """``materialize.py --format pickle``'s layout for one split."""
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
        raise CampaignDataError(f"{split}: decoded images are {x.dtype} {x.shape}, need uint8 "
                                "(N, 32, 32, 3)")
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    order = np.random.default_rng(0).permutation(len(x))  # the originals are shuffled
    flat, y = flat[order], np.asarray(y)[order]
    parts = np.array_split(np.arange(len(x)), 5) if split == "train" else [np.arange(len(x))]
    for k, idx in enumerate(parts):
        name = f"data_batch_{k + 1}" if split == "train" else "test_batch"
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y[idx].tolist(),
                         b"data": flat[idx], b"filenames": [f"{i}.png".encode() for i in idx]}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes],
                     b"num_cases_per_batch": 10000, b"num_vis": 3072}, f)


def pack(src: str, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    info = {}
    for split in SPLITS:
        path = os.path.join(src, f"{split}_jpeg.npz")
        if not os.path.isfile(path):
            raise CampaignDataError(f"{path}: missing (SRC must hold train_jpeg.npz and "
                                    "test_jpeg.npz)")
        info[split] = pack_split(path, os.path.join(out, f"cifar10_{split}.npz"))
    return info


def unpack(packed: str, root: str, decoder: str = "auto") -> dict:
    info = {}
    for split in SPLITS:
        blobs, y, classes = unpack_blobs(os.path.join(packed, f"cifar10_{split}.npz"))
        x, used = decode(blobs, decoder)
        write_pickles(root, split, x, y, classes)
        info[split] = {"images": len(x), "decoder": used,
                       "pixels_sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    with open(os.path.join(root, "campaign_data.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="shared {train,test}_jpeg.npz -> compact npz (run here)")
    p.add_argument("src")
    p.add_argument("out")
    u = sub.add_parser("unpack", help="compact npz -> cifar-10-batches-py (run on the device)")
    u.add_argument("packed")
    u.add_argument("root")
    u.add_argument("--decoder", default="auto", choices=("auto", "pil", "torchvision"))
    a = ap.parse_args(argv)
    try:
        info = pack(a.src, a.out) if a.cmd == "pack" else unpack(a.packed, a.root, a.decoder)
    except CampaignDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
