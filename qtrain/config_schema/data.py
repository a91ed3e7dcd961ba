"""Schemas of the ``data`` group (conf/data/*.yaml): one per data module class; keys are the
class's own arguments plus :class:`qtrain.data.base.BaseDataModule`'s (``**kw``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qtrain.config_schema.core import Float, Int, opt, schema

LOADERS = Literal["tensor", "torchvision"]  # qtrain.data.tensor_images.LOADERS


@dataclass
class Base:
    """qtrain.data.base.BaseDataModule's arguments (every module passes ``**kw`` on)."""

    root: str | None = opt()
    batch_size: Int(ge=1) = opt()
    eval_batch_size: Int(ge=1) | None = opt()
    num_workers: Int(ge=0) = opt()
    fake: bool = opt()
    seed: Int(ge=0) = opt()


@schema("qtrain.data.digits.DigitsDataModule", yaml="conf/data/digits.yaml")
class DigitsDataModule(Base):
    loader: LOADERS = opt()


@schema("qtrain.data.vision.CIFARDataModule", yaml="conf/data/cifar10.yaml, cifar100.yaml")
class CIFARDataModule(Base):
    name: Literal["cifar10", "cifar100"] = opt()  # qtrain.data.vision.CIFAR_STATS
    format: Literal["pickle", "imagefolder"] = opt()  # qtrain.data.vision.FORMATS
    download: bool = opt()
    verify_checksums: bool = opt()
    augment: bool = opt()
    loader: LOADERS = opt()


@schema("qtrain.data.vision.MNISTDataModule", yaml="conf/data/mnist.yaml")
class MNISTDataModule(Base):
    download: bool = opt()
    loader: LOADERS = opt()


@schema("qtrain.data.vision.ImageNetDataModule", yaml="conf/data/imagenet.yaml")
class ImageNetDataModule(Base):
    image_size: Int(ge=1) = opt()
    num_classes: Int(ge=1) = opt()


@schema("qtrain.data.text_lm.LMDataModule", yaml="conf/data/ptb.yaml, wikitext2.yaml, "
        "wikitext103.yaml")
class LMDataModule(Base):
    name: Literal["wikitext2", "wikitext103", "ptb"] = opt()  # qtrain.data.text_lm.LAYOUTS
    seq_len: Int(ge=1) = opt()
    train_file: str | None = opt()
    valid_file: str | None = opt()
    test_file: str | None = opt()
    hf_name: str | None = opt()
    max_train_tokens: Int(ge=1) | None = opt()


@schema("qtrain.data.glue.GLUEDataModule", yaml="conf/data/glue.yaml")
class GLUEDataModule(Base):
    task: Literal["sst2", "cola", "mrpc", "qnli", "rte", "mnli"] = opt()  # glue.TASKS
    tokenizer: str = opt()
    max_length: Int(ge=1) = opt()
    hf: bool = opt()
    max_train_samples: Int(ge=1) | None = opt()
    max_eval_samples: Int(ge=1) | None = opt()


@schema("qtrain.data.synthetic.SyntheticDataModule", yaml="conf/data/synthetic.yaml")
class SyntheticDataModule(Base):
    num_classes: Int(ge=1) = opt()
    image_size: Int(ge=1) = opt()
    channels: Int(ge=1) = opt()
    n_train: Int(ge=1) = opt()
    n_val: Int(ge=1) = opt()
    n_test: Int(ge=1) = opt()
    noise: Float(ge=0) = opt()
