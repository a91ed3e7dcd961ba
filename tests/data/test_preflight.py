"""qtrain.data.preflight: a dataset folder that is not there fails before torch is imported;
what the data module can still fetch or write (download, smoke data) is left to it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from qtrain.data.preflight import check_data_root
from qtrain.errors import MissingFileError
from tests.hydra_helpers import compose_cfg


def _cfg(target, **data):
    return OmegaConf.create({"data": {"_target_": f"qtrain.data.vision.{target}", **data}})


def test_absent_folder_is_one_error_naming_data_root(tmp_path):
    absent = str(tmp_path / "absent")
    for target, hint in (("CIFARDataModule", ", or data.download=true to fetch it"),
                         ("MNISTDataModule", ", or data.download=true to fetch it"),
                         ("ImageNetDataModule", "")):
        with pytest.raises(MissingFileError) as e:
            check_data_root(_cfg(target, root=absent, download=False, fake=False))
        assert str(e.value) == (f"data.root={absent!r}: no such folder (set data.root to the "
                                f"folder holding the dataset in its standard layout{hint})")
    # ImageNet cannot be downloaded: download=true does not excuse it
    with pytest.raises(MissingFileError):
        check_data_root(_cfg("ImageNetDataModule", root=absent, download=True))


def test_what_the_data_module_handles_passes(tmp_path):
    absent = str(tmp_path / "absent")
    check_data_root(_cfg("CIFARDataModule", root=str(tmp_path)))  # there: files checked later
    check_data_root(_cfg("CIFARDataModule", root=absent, download=True))  # fetched (or refused)
    check_data_root(_cfg("MNISTDataModule", root=absent, fake=True))  # smoke data written there
    check_data_root(_cfg("CIFARDataModule", root=None))  # unset: the data module says so
    check_data_root(OmegaConf.create({"data": {"_target_": "qtrain.data.digits.DigitsDataModule",
                                               "root": absent}}))  # bundled, no folder read


def test_composed_recipes(tmp_path):
    """The real composed configs: a CIFAR recipe with an absent data.root fails, its smoke
    run (data written into data.root) does not."""
    absent = f"data.root={tmp_path}/absent"
    with pytest.raises(MissingFileError, match="data.root="):
        check_data_root(compose_cfg(["recipe=qat_int8_resnet20_cifar10", absent], tmp_path))
    check_data_root(compose_cfg(["recipe=qat_int8_resnet20_cifar10", "debug=smoke"], tmp_path))
