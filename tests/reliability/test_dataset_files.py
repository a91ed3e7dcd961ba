"""Bad dataset files: crafted / garbage / truncated CIFAR pickles and truncated or corrupt
MNIST IDX files each raise one DataFileError naming the file and what to do; a crafted
pickle never runs code. The files are written here in the real on-disk formats (the
cifar-10-batches-py dict layout, IDX big-endian headers), independently of qtrain."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from qtrain.data.vision import CIFARDataModule, MNISTDataModule
from qtrain.errors import DataFileError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(root, protocol=2, n=3):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in BATCHES:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                         "data": data, "filenames": [f"{i}.png" for i in range(n)]}, f,
                        protocol=protocol)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f,
                    protocol=protocol)
    return d


def setup_cifar(root, verify=False):
    dm = CIFARDataModule(root=str(root), verify_checksums=verify, augment=False)
    dm.setup()
    return dm


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_layout_every_protocol_reads(tmp_path, protocol):
    d = write_cifar(tmp_path, protocol)
    dm = setup_cifar(tmp_path)
    with open(d / "test_batch", "rb") as f:
        ref = pickle.load(f)
    assert np.array_equal(dm.val_set.data.transpose(0, 3, 1, 2).reshape(3, -1), ref["data"])
    assert dm.val_set.targets == ref["labels"] and dm.val_set.classes[9] == "c9"


class _Exploit:
    """A pickle whose __reduce__ calls os.system: unpickling it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_runs_no_code(tmp_path):
    d = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({"data": _Exploit(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataFileError, match=r"data_batch_2: .*'posix\.system' is not allowed"):
        setup_cifar(tmp_path / "data")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(marker)))  # the same payload does run unrestricted
    assert marker.exists()


@pytest.mark.parametrize("damage,msg", [
    (lambda b: os.urandom(len(b)), "not a readable pickle"),
    (lambda b: b[: len(b) // 2], "not a readable pickle"),
    (lambda b: pickle.dumps({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}),
     r"'data' is uint8 \(3, 100\)"),
    (lambda b: pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0]}),
     "3 images but 1 labels"),
    (lambda b: pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
], ids=["garbage", "truncated", "wrong_shape", "label_count", "not_a_dict"])
def test_corrupt_cifar_batch(tmp_path, damage, msg):
    d = write_cifar(tmp_path)
    path = d / "test_batch"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFileError, match=msg) as e:
        setup_cifar(tmp_path)
    assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_verified_copy_is_md5_checked_before_unpickling(tmp_path):
    d = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({"data": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(DataFileError, match="data_batch_1 has md5 .*re-download"):
        setup_cifar(tmp_path / "data", verify=True)
    assert not marker.exists()


def write_idx(path, arr, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def write_mnist(root, n=5):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 0x801)
    return raw


def test_mnist_real_idx_reads(tmp_path):
    raw = write_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path))
    dm.setup()
    img = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    x, _ = dm.val_set[4]
    assert torch.allclose(x.flatten() * 0.3081 + 0.1307,
                          torch.tensor(img[4 * 784:5 * 784] / 255.0, dtype=torch.float32),
                          atol=1e-5)


@pytest.mark.parametrize("fname,damage,msg", [
    ("train-images-idx3-ubyte", lambda b: b[:-100], r"3836 bytes; its header \(5, 28, 28\) "
                                                     r"needs 3936 \(truncated"),
    ("t10k-labels-idx1-ubyte", lambda b: b[:6], "only 6 bytes"),
    ("train-images-idx3-ubyte", lambda b: b"\x1f\x8b" + b[2:], "magic number 0x1f8b0803"),
    ("t10k-images-idx3-ubyte", lambda b: b[:8] + struct.pack(">II", 32, 32) + b[16:],
     r"dimensions \(5, 32, 32\)"),
    ("train-labels-idx1-ubyte", lambda b: struct.pack(">II", 0x801, 4) + b[8:12],
     "4 labels for 5 images"),
], ids=["truncated_images", "truncated_header", "gzip_not_gunzipped", "wrong_dims",
        "label_count"])
def test_corrupt_mnist_idx(tmp_path, fname, damage, msg):
    raw = write_mnist(tmp_path)
    path = raw / fname
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFileError, match=msg) as e:
        MNISTDataModule(root=str(tmp_path)).setup()
    assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_cifar100_layout_and_corrupt_meta(tmp_path):
    """cifar-100-python: 'train' / 'test' with 'fine_labels', 'meta' with 'fine_label_names'."""
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(3)
    for name, n in (("train", 6), ("test", 4)):
        with open(d / name, "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)],
                         "fine_labels": rng.integers(0, 100, n).tolist(),
                         "coarse_labels": rng.integers(0, 20, n).tolist(),
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f, protocol=2)
    dm = CIFARDataModule(name="cifar100", root=str(tmp_path), verify_checksums=False)
    dm.setup()
    assert len(dm.train_set) == 6 and dm.val_set.classes[42] == "f42"
    (d / "meta").write_bytes(pickle.dumps({"coarse_label_names": ["c0"]}))
    with pytest.raises(DataFileError, match=r"meta: no class-name list 'fine_label_names'"):
        CIFARDataModule(name="cifar100", root=str(tmp_path), verify_checksums=False).setup()
