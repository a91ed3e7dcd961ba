"""``init_from``: start a run from the weights of a finished (float) run.

Most quantization papers start from a trained full-precision model: INQ, TTQ, LSQ, DSQ,
HAWQ, Deep Compression and the fine-tuning variants of PACT/DoReFa load the FP32 network and
then quantize it. ``init_from=<path>`` does that for any recipe: the model's weights (and
buffers: BatchNorm statistics) are loaded from a qtrain checkpoint **before** the method's
callback converts the layers, so the quantizers are initialised from the trained weights
(LSQ's step 2<|w|>/sqrt(Q_P), PACT's alpha, k-means codebooks, ...).

``init_from`` is not ``ckpt_path``: ``ckpt_path`` resumes *the same* run (optimizer, step,
RNG, data position); ``init_from`` takes only the model's tensors and starts a new run at
step 0 with the recipe's own optimizer and schedule.

Accepted values (a relative path is taken from the working directory, else from the project
root: recipes name ``recipes/weights/...``): a ``.ckpt`` file written by qtrain (verified like a resume: readable, qtrain
metadata, SHA-256 checksum intact; see :mod:`qtrain.checkpointing`), a run directory or its
``checkpoints/`` folder (its ``last.ckpt``). The checkpoint must hold exactly this model's
float tensors: a missing, unexpected or differently shaped tensor raises one
:class:`~qtrain.errors.ConfigError` naming ``init_from`` and the first offending keys
(a checkpoint of a quantized run holds quantizer tensors too: start from the FP32 run's).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from qtrain import checkpointing
from qtrain.errors import ConfigError

KEY = "init_from"
#: a relative ``init_from`` not found from the working directory is looked up here (recipes
#: name weights shipped in the repository as ``recipes/weights/...``)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "model."  # the task module (qtrain.modules) holds the network as ``self.model``


def resolve(value: Any) -> str | None:
    """The checkpoint file ``init_from`` names (None when unset)."""
    if value is None or value == "":
        return None
    path = os.path.expanduser(str(value))
    if not os.path.isabs(path) and not os.path.exists(path):
        in_project = os.path.join(PROJECT_ROOT, path)
        path = in_project if os.path.exists(in_project) else path
    if os.path.isdir(path):
        for cand in (os.path.join(path, "checkpoints", checkpointing.LAST),
                     os.path.join(path, checkpointing.LAST)):
            if os.path.isfile(cand):
                return cand
        raise ConfigError(f"{KEY}={value}: a folder without checkpoints/{checkpointing.LAST} or "
                          f"{checkpointing.LAST}; pass a run dir, its checkpoints/ folder or a "
                          ".ckpt file")
    if not os.path.isfile(path):
        raise ConfigError(f"{KEY}={value}: no such file or folder (allowed: a qtrain .ckpt file, "
                          "a run dir or its checkpoints/ folder)")
    return path


def read_model_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The network's tensors (``model.`` prefix removed) of the verified checkpoint ``path``
    and its provenance (file, checksum, recipe, step)."""
    ckpt = checkpointing.read_checkpoint(path)  # any recipe: only the tensors are taken
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError(f"{KEY}={path}: the checkpoint has no state_dict")
    model_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not model_state:
        raise ConfigError(f"{KEY}={path}: no '{PREFIX}*' tensors in its state_dict (keys start "
                          f"with {sorted({k.split('.')[0] for k in state})})")
    block = ckpt[checkpointing.KEY]
    info = {"file": os.path.abspath(path), "sha256": block["sha256"],
            "recipe": block["meta"].get("recipe"), "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch")}
    return model_state, info


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``: every tensor of the model must be present with its
    shape, and nothing else may be in ``state``."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"not in this model {_first(unexpected)}")
    if shapes:
        problems.append(f"shape (checkpoint vs model) {_first(shapes, 3)}")
    if problems:
        raise ConfigError(
            f"{KEY}={source}: the checkpoint's tensors do not fit this model ({'; '.join(problems)})."
            " init_from takes a checkpoint of the same architecture's float run (e.g. the "
            "fp32_* recipe's); a quantized run's checkpoint also holds quantizer tensors")
    model.load_state_dict(state, strict=True)


def read(value: Any) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Resolve and read ``init_from`` (None when unset): done before data and model are
    built, so a wrong path or a damaged file stops the run at once."""
    path = resolve(value)
    return None if path is None else read_model_state(path)


def initialise(model: nn.Module, value: Any, loaded=None) -> dict | None:
    """Load ``init_from`` into ``model`` (``loaded``: what :func:`read` returned, else it is
    read now); returns its provenance for the run summary."""
    loaded = read(value) if loaded is None else loaded
    if loaded is None:
        return None
    state, info = loaded
    load_into(model, state, str(value))
    return info
