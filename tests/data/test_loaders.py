"""Loaders read files written in the real on-disk formats (CIFAR pickles, ImageFolder, MNIST
IDX, WikiText/PTB text, GLUE TSV) and fail fast naming the key when data is missing."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from qtrain.data.glue import GLUEDataModule, parse_glue_tsv
from qtrain.data.text_lm import LMDataModule, Vocabulary, tokenize
from qtrain.data.vision import CIFARDataModule, ImageNetDataModule, MNISTDataModule
from qtrain.errors import DataFileError


def _write_cifar_pickles(root, n_per_batch=4, key=str):
    """The cifar-10-batches-py layout (str keys, as the original Python 2 pickles load with
    encoding=latin1), written independently of qtrain's smoke writer."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): name}, f, protocol=2)
        expected[name] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [key(f"c{i}") for i in range(10)]}, f, protocol=2)
    return expected


def _bytes(s):
    return s.encode()


@pytest.mark.parametrize("key", [str, _bytes], ids=["str_keys", "bytes_keys"])
def test_cifar_pickle_layout(tmp_path, key):
    expected = _write_cifar_pickles(tmp_path, key=key)
    dm = CIFARDataModule(root=str(tmp_path), verify_checksums=False, augment=False)
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4
    # first test image, un-normalised, equals the stored CHW bytes
    x, y = dm.val_set[0]
    mean, std = torch.tensor(dm.transforms(False).transforms[-1].mean), torch.tensor(dm.transforms(False).transforms[-1].std)
    img = (x * std[:, None, None] + mean[:, None, None]) * 255
    data, labels = expected["test_batch"]
    assert torch.allclose(img.flatten(), torch.tensor(data[0], dtype=torch.float32), atol=0.01)
    assert y == labels[0]
    assert dm.train_set.classes[3] == "c3"


def test_cifar_verified_rejects_reencoded_copy(tmp_path):
    _write_cifar_pickles(tmp_path)
    dm = CIFARDataModule(root=str(tmp_path), verify_checksums=True)
    with pytest.raises(DataFileError, match="data_batch_1 has md5 .*verify_checksums=false"):
        dm.setup()


def test_cifar_imagefolder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("airplane", "cat"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(tmp_path / split / c / f"{i}.jpg")
    dm = CIFARDataModule(root=str(tmp_path), format="imagefolder")
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4
    assert dm.train_set.classes == ["airplane", "cat"]
    assert dm.val_set[0][0].shape == (3, 32, 32)


def test_cifar_smoke_writer_round_trip(tmp_path):
    dm = CIFARDataModule(root=str(tmp_path), fake=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 64 and len(dm.val_set) == 32


def test_mnist_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    for split in ("train", "t10k"):
        with open(raw / f"{split}-images-idx3-ubyte", "wb") as f:
            f.write(np.array([2051, 3, 28, 28], ">i4").tobytes() + imgs.astype(np.uint8).tobytes())
        with open(raw / f"{split}-labels-idx1-ubyte", "wb") as f:
            f.write(np.array([2049, 3], ">i4").tobytes() + bytes([7, 1, 3]))
    dm = MNISTDataModule(root=str(tmp_path))
    dm.setup()
    x, y = dm.train_set[2]
    assert y == 3 and x.shape == (1, 28, 28)
    assert torch.allclose(x * 0.3081 + 0.1307, torch.tensor(imgs[2] / 255.0, dtype=torch.float32), atol=1e-5)


def test_imagenet_imagefolder(tmp_path):
    for split in ("train", "val"):
        for c in ("n01440764", "n01443537"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / split / c / "a.JPEG")
    dm = ImageNetDataModule(root=str(tmp_path), image_size=64, num_classes=2)
    dm.setup()
    assert dm.val_set[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="data.num_classes=1000"):
        ImageNetDataModule(root=str(tmp_path), num_classes=1000).setup()


def test_missing_dataset_names_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        CIFARDataModule(root=str(tmp_path / "nope")).setup()
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageNetDataModule(root=str(tmp_path / "nope")).setup()


def test_wikitext_and_ptb_text(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = T = \n the cat sat \n\n the dog \n")
    (tmp_path / "wiki.valid.tokens").write_text(" the bird \n")
    with gzip.open(tmp_path / "wiki.test.tokens.gz", "wt") as f:
        f.write(" cat dog \n")
    dm = LMDataModule(name="wikitext2", root=str(tmp_path), seq_len=2)
    dm.setup()
    # train stream: = T = <eos> the cat sat <eos> the dog <eos>  (11 tokens)
    itos = dm.vocab.itos
    x, y = dm.train_set[0]
    assert [itos[i] for i in x] == ["=", "T"] and [itos[i] for i in y] == ["T", "="]
    assert len(dm.train_set) == 5
    vx, _ = dm.val_set[0]
    assert [itos[i] for i in vx] == ["the", "<unk>"]  # 'bird' unseen in train


def test_vocabulary_order_and_unk():
    v = Vocabulary(tokenize(["b a b", "c b"]))
    assert v.itos[:2] == ["<unk>", "<eos>"] and v.itos[2] == "b"
    assert v.encode(["zzz"]).tolist() == [0]


def test_lm_missing_file_names_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_file"):
        LMDataModule(name="ptb", root=str(tmp_path)).setup()


def test_glue_tsv_formats(tmp_path):
    sst = tmp_path / "sst.tsv"
    sst.write_text("sentence\tlabel\nit 's good\t1\nbad\t0\n")
    assert parse_glue_tsv("sst2", str(sst)) == ([("it 's good",), ("bad",)], [1, 0])
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze .\ngj04\t0\t*\tThe more .\n")
    assert parse_glue_tsv("cola", str(cola)) == (
        [("The sailors rode the breeze .",), ("The more .",)], [1, 0])
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tA b .\tB a .\n".encode())
    assert parse_glue_tsv("mrpc", str(mrpc)) == ([("A b .", "B a .")], [1])


def test_glue_module_tokenizes_with_local_tokenizer(tmp_path):
    from qtrain.models.hf import make_tiny_pretrained

    tok = make_tiny_pretrained("bert", str(tmp_path / "tok"))
    root = tmp_path / "sst"
    root.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (root / f).write_text("sentence\tlabel\nthe movie is good\t1\nbad film\t0\n")
    dm = GLUEDataModule(task="sst2", root=str(root), tokenizer=tok, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and set(batch["labels"].tolist()) <= {0, 1}
    assert dm.tokenizer.decode(dm.train_set[0]["input_ids"], skip_special_tokens=True) == "the movie is good"


def test_glue_hub_name_offline_fails_fast(tmp_path):
    os.environ["QTRAIN_OFFLINE"] = "1"
    root = tmp_path / "sst"
    root.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (root / f).write_text("sentence\tlabel\na\t1\n")
    dm = GLUEDataModule(task="sst2", root=str(root), tokenizer="some-org/not-cached-model")
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        dm.setup()
