"""Data checks that need no torch: ``train.py`` (:mod:`qtrain.cli`) runs them right after the
config check and before ``import torch`` / Lightning (seconds of CPU), so a dataset folder
that is not there fails in well under a second, with one line naming ``data.root``.

Only what is certain from the config and the file system is checked here: a data module that
reads a local folder and will not download it (``data.download`` false or absent, not smoke
mode) needs ``data.root`` to be an existing folder. The data module itself (its ``setup``,
:meth:`qtrain.data.base.QDataModule.require_root`) still checks the files inside it, in the
run (and for code that calls :func:`qtrain.run.train` directly).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from qtrain.errors import MissingFileError

# data modules that read a folder of local files -> whether data.download=true can fetch it
LOCAL_FOLDER: dict[str, bool] = {
    "qtrain.data.vision.CIFARDataModule": True,
    "qtrain.data.vision.MNISTDataModule": True,
    "qtrain.data.vision.ImageNetDataModule": False,
}


def check_data_root(cfg: DictConfig) -> None:
    """Raise :class:`qtrain.errors.MissingFileError` naming ``data.root`` when the composed
    config's data module reads a local folder that does not exist and will not download it."""
    data = cfg.get("data") if isinstance(cfg, DictConfig) else None
    if not isinstance(data, DictConfig):
        return
    target = OmegaConf.select(data, "_target_", default=None)
    if target not in LOCAL_FOLDER:
        return
    if OmegaConf.select(data, "fake", default=False) is True:  # smoke data is written there
        return
    downloadable = LOCAL_FOLDER[target]
    if downloadable and OmegaConf.select(data, "download", default=False) is True:
        return  # fetched (or refused offline) by the data module
    root = OmegaConf.select(data, "root", default=None)
    if not isinstance(root, str) or not root:
        return  # not set: the data module says so
    if not os.path.isdir(os.path.expanduser(root)):
        raise MissingFileError(
            f"data.root={root!r}: no such folder (set data.root to the folder holding the "
            "dataset in its standard layout"
            + (", or data.download=true to fetch it" if downloadable else "") + ")")
