"""Config schemas (qtrain.config_schema): a bad value of the quant, data, trainer or top-level
config fails before torch is imported, as one ConfigError naming the key, the value and the
allowed values; unknown recipes, group options and keys get "did you mean".

In-process cases compose the real config with Hydra's compose API and run
``qtrain.validation.check_config`` -- what ``qtrain.cli`` runs before importing torch and turns
into exit status 2. A few subprocess cases run ``python train.py`` itself and check the exit
status, the one line, the FAILED marker, that ``torch`` was never imported, and the CPU time
to the error.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import resource
import subprocess
import sys
import time
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from qtrain.config_schema import SCHEMAS, Top, check_argv, keys_of
from qtrain.config_schema.core import Node, check_node
from qtrain.errors import ConfigError
from qtrain.validation import check_config
from tests.hydra_helpers import CONF, ROOT


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _compose(overrides):
    """The composed config as a run sees it (HydraConfig set: ``${hydra:...}`` resolves)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(full):
        full.hydra.runtime.output_dir = "/nonexistent/run"  # never written: nothing runs
        full.hydra.job.override_dirname = "test"
    HydraConfig.instance().set_config(full)
    return OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])


# (overrides, key=value as the message names it, words of the allowed values that must appear)
Q = ["~recipe"]  # a quant option as its yaml has it (the default recipe sets quant.bits: 4)
BAD = {
    # ---- quant: type, range, enum, bit width vs the quantizer class, unknown key
    "quant.bits type": (["quant.bits=four"], "quant.bits='four'", ["an integer in 1..8",
                                                                  "UniformQuantizer"]),
    "quant.bits float": (["quant.bits=4.5"], "quant.bits=4.5", ["an integer in 1..8"]),
    "quant.bits range": (["quant.bits=12"], "quant.bits=12", ["1..8", "UniformQuantizer"]),
    "quant.act_bits range": (["quant.act_bits=0"], "quant.act_bits=0", ["1..8"]),
    "granularity enum": (["quant.weight.granularity=chanel"], "quant.weight.granularity='chanel'",
                         ["tensor, channel, group", "did you mean 'channel'"]),
    "symmetric bool": (["quant.weight.symmetric=maybe"], "quant.weight.symmetric='maybe'",
                       ["true or false"]),
    "ema_decay range": (["quant.act.ema_decay=1.5"], "quant.act.ema_decay=1.5", ["(0, 1)"]),
    "ema needs tensor": (["quant.act.granularity=channel"], "quant.act.granularity='channel'",
                         ["granularity tensor"]),
    "first_last enum": (["quant.first_last=first"], "quant.first_last='first'",
                        ["quantize, keep, 8bit"]),
    "layer types enum": (["quant.types=[Linear,Conv3d]"], "quant.types[1]='Conv3d'",
                         ["Linear, Conv2d, Embedding", "did you mean 'Conv2d'"]),
    "start_epoch range": (["quant.start_epoch=-1"], "quant.start_epoch=-1", [">= 0"]),
    "overrides bits": (["++quant.overrides={conv1: {bits: 9}}"], "quant.overrides.conv1.bits=9",
                       ["1..8"]),
    "unknown quantizer key": (["+quant.weight.granularty=channel"], "quant.weight.granularty",
                              ["did you mean 'granularity'", "allowed keys: symmetric"]),
    "pact alpha": (Q + ["quant=pact", "quant.act.alpha_init=0"], "quant.act.alpha_init=0",
                   ["> 0 or one of calibrate"]),
    "pact alpha name": (Q + ["quant=pact", "quant.act.alpha_init=calibrated"],
                        "quant.act.alpha_init='calibrated'", ["did you mean 'calibrate'"]),
    "lsq role": (Q + ["quant=lsq", "quant.weight.role=weights"], "quant.weight.role='weights'",
                 ["weight, activation", "did you mean 'weight'"]),
    "fp8 format": (Q + ["quant=fp8_training", "quant.weight.fmt=e4m4"], "quant.weight.fmt='e4m4'",
                   ["e4m3, e5m2, s2fp8", "did you mean"]),
    "fp8 bits": (Q + ["quant=fp8_training", "quant.bits=4"], "quant.bits=4",
                 ["one of 8", "FP8TrainingQuantizer"]),
    "xnor bits": (Q + ["quant=xnor", "quant.bits=2"], "quant.bits=2", ["one of 1"]),
    "xnor 8bit first/last": (Q + ["quant=xnor", "quant.first_last=8bit"],
                             "quant.first_last='8bit'", ["quantize, keep"]),
    "ptq calibration": (Q + ["quant=ptq", "quant.act.calibration=kll"],
                        "quant.act.calibration='kll'", ["minmax, ema, percentile",
                                                        "did you mean 'kl'"]),
    "ptq batches": (Q + ["quant=ptq", "quant.num_batches=0"], "quant.num_batches=0", [">= 1"]),
    "lab clip": (Q + ["quant=lab", "quant.clip=-1"], "quant.clip=-1", ["> 0 or null"]),
    "fixed point format": (Q + ["quant=stochastic_fixed16", "quant.weight.frac_bits=16"],
                           "quant.weight.frac_bits=16", ["0..15"]),
    "inq schedule": (Q + ["quant=inq", "quant.schedule=6bit"], "quant.schedule='6bit'",
                     ["5bit, 4bit, 3bit, 2bit", "list"]),
    "inq bits": (Q + ["quant=inq", "quant.bits=9"], "quant.bits=9", ["2..8"]),
    "ipq stages": (Q + ["quant=ipq", "quant.stages=fairseq"], "quant.stages='fairseq'",
                   ["fairseq_transformer, hf_bert, cnn", "did you mean 'fairseq_transformer'"]),
    "ipq unit": (Q + ["quant=ipq", "quant.unit=epochs"], "quant.unit='epochs'",
                 ["epoch, step", "did you mean 'epoch'"]),
    "deep compression sparsity": (Q + ["quant=deep_compression", "quant.sparsity.Linear=1.5"],
                                  "quant.sparsity.Linear=1.5", ["[0, 1)"]),
    "quant noise mode": (Q + ["quant=quant_noise", "quant.mode=int2"], "quant.mode='int2'",
                         ["int8, int4, pq, drop"]),
    "quant noise mode bits": (Q + ["quant=quant_noise", "quant.mode=int4"],
                              "quant.bits=8 with quant.mode='int4'", ["4 or null"]),
    "vq method": (Q + ["quant=vector_quant", "quant.method=pqq"], "quant.method='pqq'",
                  ["binary, kmeans, pq, rq", "did you mean 'pq'"]),
    "vq centroids": (Q + ["quant=vector_quant", "quant.n_centroids=512"],
                     "quant.n_centroids=512", ["1..256"]),
    "extra callback (iPQ after Quant-Noise)": (
        ["recipe=quant_noise_ipq_lm_ptb", "extra_callbacks.ipq.n_centroids=0"],
        "extra_callbacks.ipq.n_centroids=0", [">= 1"]),
    # ---- data
    "batch_size range": (["data.batch_size=0"], "data.batch_size=0", [">= 1"]),
    "batch_size type": (["data.batch_size=big"], "data.batch_size='big'", ["an integer >= 1"]),
    "loader enum": (["data.loader=tensors"], "data.loader='tensors'",
                    ["tensor, torchvision", "did you mean 'tensor'"]),
    "fake bool": (["data.fake=yes"], "data.fake='yes'", ["true or false"]),
    "cifar format": (["data=cifar10", "data.format=png"], "data.format='png'",
                     ["pickle, imagefolder"]),
    "cifar name": (["data=cifar10", "data.name=cifar11"], "data.name='cifar11'",
                   ["cifar10, cifar100", "did you mean"]),
    "glue task": (["recipe=qbert_sst2", "data.task=sst3"], "data.task='sst3'",
                  ["sst2, cola", "did you mean 'sst2'"]),
    "lm seq_len": (["data=ptb", "data.seq_len=-1"], "data.seq_len=-1", [">= 1"]),
    "unknown data key": (["+data.batchsize=3"], "data.batchsize",
                         ["did you mean 'batch_size'", "allowed keys: root, batch_size"]),
    # ---- trainer
    "precision enum": (["trainer.precision=17"], "trainer.precision=17",
                       ["16-mixed", "bf16-mixed", "32-true"]),
    "precision typo": (["trainer.precision=bf16-mix"], "trainer.precision='bf16-mix'",
                       ["did you mean 'bf16-mixed'"]),
    "accelerator enum": (["trainer.accelerator=gpus"], "trainer.accelerator='gpus'",
                         ["auto, cpu, gpu, cuda, mps, tpu", "did you mean 'gpu'"]),
    "devices range": (["trainer.devices=-2"], "trainer.devices=-2", ["an integer >= -1"]),
    "limit batches": (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5",
                      ["an integer >= 0 or a number in 0..1"]),
    "accumulate range": (["trainer.accumulate_grad_batches=0"],
                         "trainer.accumulate_grad_batches=0", [">= 1"]),
    "clip algorithm": (["+trainer.gradient_clip_algorithm=l2"],
                       "trainer.gradient_clip_algorithm='l2'", ["value, norm"]),
    "deterministic": (["trainer.deterministic=sometimes"], "trainer.deterministic='sometimes'",
                      ["true or false or one of warn"]),
    "max_epochs type": (["trainer.max_epochs=ten"], "trainer.max_epochs='ten'",
                        ["an integer >= -1"]),
    "unknown trainer key": (["+trainer.max_epoch=3"], "trainer.max_epoch",
                            ["did you mean 'max_epochs'"]),
    # ---- top level
    "seed range": (["seed=-1"], "seed=-1", ["0..4294967295"]),
    "seed type": (["seed=abc"], "seed='abc'", ["an integer"]),
    "quant_start_epoch range": (["quant_start_epoch=-2"], "quant_start_epoch=-2", [">= 0"]),
    "fit bool": (["fit=maybe"], "fit='maybe'", ["true or false"]),
    "export bool": (["export=1"], "export=1", ["true or false"]),
    "ckpt_path type": (["ckpt_path=5"], "ckpt_path=5", ["a string or null"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_fails_with_key_and_allowed_values(case, hydra_conf):
    overrides, key, allowed = BAD[case]
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(key) or f" {key}" in msg, msg
    for word in allowed:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("recipe", _options("recipe"))
def test_every_recipe_validates(recipe, hydra_conf):
    check_config(_compose([f"recipe={recipe}"]))


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in ("quant", "data", "trainer") for o in _options(g)])
def test_every_group_option_validates(group, option, hydra_conf):
    needs = {("data", "glue"): ["model=bert_base"]}  # its tokenizer is the model's
    check_config(_compose(["~recipe", f"{group}={option}", *needs.get((group, option), [])]))


def _required_targets(node) -> list[str]:
    """The node's ``_target_`` and, through its schema's Node-typed keys, those of the nodes
    it holds (a QAT callback's quantizers); other nested targets (a trainer's strategy
    object) are their own classes' business."""
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        return []
    found = [node["_target_"]]
    schema = SCHEMAS.get(node["_target_"])
    hints = typing.get_type_hints(schema, include_extras=True) if schema else {}
    for key, tp in hints.items():
        if tp is Node or Node in typing.get_args(tp):
            found += _required_targets(node.get(key))
    return found


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in ("quant", "data", "trainer") for o in _options(g)])
def test_every_group_option_has_a_schema(group, option):
    """A new conf/quant|data|trainer/*.yaml needs a schema for the class it instantiates
    (qtrain/config_schema/<group>.py); without one its values would go unchecked."""
    text = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    defaults = [d for d in text.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    targets = _required_targets(text)
    assert targets or defaults, f"conf/{group}/{option}.yaml instantiates nothing"
    missing = [t for t in targets if t not in SCHEMAS]
    assert not missing, (f"conf/{group}/{option}.yaml: no schema for {missing}; add a dataclass "
                         f"to qtrain/config_schema/{group}.py")


def test_every_top_level_key_is_declared(hydra_conf):
    """Unknown top-level keys pass at run time (a recipe may keep its own variables there,
    and a new key must not break runs); every key of conf/train.yaml is declared in
    qtrain/config_schema/top.py, so each has a type."""
    cfg = _compose(["~recipe"])
    extra = [k for k in cfg if k not in set(keys_of(Top))]
    assert not extra, f"conf/train.yaml keys {extra} not declared in config_schema/top.py"


def test_unknown_target_is_left_to_its_class():
    node = OmegaConf.create({"_target_": "somewhere.NewQuantizer", "anything": "goes"})
    check_node(node, "quant.weight")  # no schema: not judged here (the coverage test flags it)
    with pytest.raises(ConfigError, match="unknown key for UniformQuantizer"):
        check_node(OmegaConf.create({"_target_": "qtrain.nn.uniform_quantizer.UniformQuantizer",
                                     "anything": 1}), "quant.weight")


# ---- the schemas mirror the classes (keys, bit ranges, enums) ---------------------------

def _load(target):
    mod, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


def _init_keys(cls) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts: its __init__'s, and its bases' while an
    __init__ passes ``**kwargs`` on."""
    keys = set()
    for c in cls.__mro__:
        if "__init__" not in c.__dict__:
            continue
        params = inspect.signature(c.__dict__["__init__"]).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return keys - {"self"}


@pytest.mark.parametrize("target", sorted(SCHEMAS))
def test_schema_keys_and_bits_match_the_class(target):
    cls, schema = _load(target), SCHEMAS[target]
    keys = set(keys_of(schema))
    expected = _init_keys(cls) - {"bits"} if schema.__bits__ else _init_keys(cls)
    assert keys == expected, f"{target}: schema lacks {expected - keys}, extra {keys - expected}"
    if schema.__bits__ is not None:
        assert schema.__bits__ == (cls.min_bits, cls.max_bits)


def _literal(schema_target, key) -> set:
    tp = typing.get_type_hints(SCHEMAS[schema_target], include_extras=True)[key]
    out = set()

    def walk(t):
        if typing.get_origin(t) is typing.Literal:
            out.update(typing.get_args(t))
        for a in typing.get_args(t):
            walk(a)

    walk(tp)
    return out


def _enum_cases():
    import qtrain.callbacks.elq as elq
    import qtrain.callbacks.inq as inq
    import qtrain.callbacks.ipq as ipq
    import qtrain.callbacks.qat as qat
    import qtrain.callbacks.quant_noise as qn
    import qtrain.callbacks.vector_quant as vq
    import qtrain.callbacks.weight_distortion as wd
    import qtrain.data.glue as glue
    import qtrain.data.tensor_images as ti
    import qtrain.data.text_lm as lm
    import qtrain.data.vision as vision
    import qtrain.nn.format_quantizers as fq
    import qtrain.nn.fp8_training as fp8
    import qtrain.nn.learned_quantizers as lq
    import qtrain.nn.polino_quantizer as pol
    import qtrain.nn.quant_noise as nqn
    import qtrain.nn.uniform_quantizer as uq
    import qtrain.quant.distortions as dist
    import qtrain.quant.elq as qelq
    import qtrain.quant.inq as qinq
    import qtrain.quant.kmeans as km
    import qtrain.quant.rounding as rnd
    from qtrain.nn import convert

    n = "qtrain.nn."
    c = "qtrain.callbacks."
    return [
        (n + "uniform_quantizer.UniformQuantizer", "granularity", uq.GRANULARITIES),
        (n + "uniform_quantizer.UniformQuantizer", "observer", uq.OBSERVERS),
        (n + "fp8_training.FP8TrainingQuantizer", "fmt", fp8.FP8_FORMATS),
        (n + "fp8_training.FP8TrainingQuantizer", "accumulation", fp8.ACCUMULATIONS),
        (n + "fp8_training.FP8TrainingQuantizer", "grad_at", fp8.GRAD_AT),
        (n + "fp8_training.FP8TrainingQuantizer", "acc_dtype", fp8.ACC_FORMATS),
        (n + "fp8_training.FP8TrainingQuantizer", "rounding", rnd.ROUNDING_MODES),
        (n + "polino_quantizer.PolinoDifferentiableQuantizer", "init", pol.INITS),
        (n + "format_quantizers.XNORActQuantizer", "act_scaling", fq.XNOR_ACT_SCALINGS),
        (n + "learned_quantizers.DoReFaActQuantizer", "grad_at", lq.DOREFA_GRAD_AT),
        (c + "qat.QATCallback", "first_last", convert.FIRST_LAST_POLICIES),
        (c + "qat.QATCallback", "types", qat.LAYER_TYPES),
        (c + "inq.INQCallback", "strategy", qinq.STRATEGIES),
        (c + "inq.INQCallback", "unit", inq.UNITS),
        (c + "inq.INQCallback", "schedule", qinq.SCHEDULES),
        (c + "inq.INQCallback", "types", inq.LAYER_TYPES),
        (c + "ipq.IterativePQCallback", "on_incomplete", ipq.ON_INCOMPLETE),
        (c + "ipq.IterativePQCallback", "unit", ipq.UNITS),
        (c + "ipq.IterativePQCallback", "stages", [*ipq.PRESETS, "cnn"]),
        (c + "ipq.IterativePQCallback", "block_sizes", [*ipq.DEFAULT_BLOCKS, "conv"]),
        (c + "deep_compression.DeepCompressionCallback", "init", km.INITS),
        (c + "quant_noise.QuantNoiseCallback", "mode", nqn.MODES),
        (c + "quant_noise.QuantNoiseCallback", "granularity", nqn.GRANULARITIES),
        (c + "quant_noise.QuantNoiseCallback", "types", qn.TYPE_KEYS),
        (c + "vector_quant.VectorQuantizationCallback", "method", vq.METHODS),
        (c + "vector_quant.VectorQuantizationCallback", "codebook", vq.CODEBOOKS),
        (c + "vector_quant.VectorQuantizationCallback", "types", vq.LAYER_TYPES),
        (c + "vector_quant.VectorQuantizationCallback", "init", km.INITS),
        (c + "elq.ELQCallback", "kind", qelq.KINDS),
        (c + "elq.ELQCallback", "types", elq.LAYER_TYPES),
        (c + "elq.ELQCallback", "unit", elq.UNITS),
        (c + "weight_distortion.WeightDistortionCallback", "scale", dist.SCALES),
        (c + "weight_distortion.WeightDistortionCallback", "clip_scale", wd.CLIP_SCALES),
        (c + "weight_distortion.WeightDistortionCallback", "train",
         importlib.import_module("qtrain.nn.distortion_quantizer").SPEC_KEYS),
        (c + "soft_to_hard_vq.SoftToHardVQCallback", "sigma_units", lq.SIGMA_UNITS),
        ("qtrain.data.digits.DigitsDataModule", "loader", ti.LOADERS),
        ("qtrain.data.vision.CIFARDataModule", "name", vision.CIFAR_STATS),
        ("qtrain.data.vision.CIFARDataModule", "format", vision.FORMATS),
        ("qtrain.data.text_lm.LMDataModule", "name", lm.LAYOUTS),
        ("qtrain.data.glue.GLUEDataModule", "task", glue.TASKS),
    ]


def test_schema_enums_match_the_code():
    for target, key, values in _enum_cases():
        assert _literal(target, key) == set(values), (target, key)


def test_trainer_schema_matches_lightning():
    import pytorch_lightning as pl
    from lightning_fabric.accelerators import ACCELERATOR_REGISTRY

    params = inspect.signature(pl.Trainer.__init__).parameters
    precision = set()

    def walk(t):
        if typing.get_origin(t) is typing.Literal:
            precision.update(typing.get_args(t))
        for a in typing.get_args(t):
            walk(a)

    walk(params["precision"].annotation)
    assert _literal("pytorch_lightning.Trainer", "precision") == precision
    accelerators = _literal("pytorch_lightning.Trainer", "accelerator")
    assert set(ACCELERATOR_REGISTRY.available_accelerators()) | {"auto", "gpu"} == accelerators


# ---- command line: "did you mean" before Hydra composes ----------------------------------

@pytest.mark.parametrize("argv, words", [
    (["recipe=pact_w4a4_resnet20_cifar"], ["recipe=pact_w4a4_resnet20_cifar:",
                                           "did you mean 'pact_w4a4_resnet20_cifar10'",
                                           "qat_int4_digits"]),
    (["quant=unifrom"], ["quant=unifrom", "did you mean 'uniform'", "allowed: abc"]),
    (["-m", "recipe=qat_int4_digits,pact_w4a4_resnet20_cifar"],
     ["recipe=pact_w4a4_resnet20_cifar:", "did you mean 'pact_w4a4_resnet20_cifar10'"]),
    (["quant.bitz=4"], ["quant.bitz=4: no such key", "did you mean 'quant.bits'",
                        "keys of quant: bits"]),
    (["-m", "quant.bits=2,3", "trainer.max_epoch=3"], ["trainer.max_epoch=",
                                                      "did you mean 'trainer.max_epochs'"]),
    (["recipe=pact_w4a4_resnet20_cifar10", "quant.act.alpha_int=3"],
     ["did you mean 'quant.act.alpha_init'"]),
    (["fitt=false"], ["fitt=false: no such key", "did you mean 'fit'"]),
])
def test_unknown_names_suggest_the_closest(argv, words):
    with pytest.raises(ConfigError) as e:
        check_argv(argv)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_pact_calibrated_alpha_is_allowed(hydra_conf):
    check_config(_compose(Q + ["quant=pact", "quant.act.alpha_init=calibrate",
                               "+quant.act.calib_percentile=99.0"]))


def test_one_regex_is_a_pattern_list(hydra_conf):
    check_config(_compose(["quant.include=fc.*", "quant.exclude=null"]))  # as_patterns
    with pytest.raises(ConfigError, match=r"quant.include\[0\]=3: allowed: a string"):
        check_config(_compose(["quant.include=[3]"]))


@pytest.mark.parametrize("argv", [
    ["quant.bits=4", "recipe=pact_w4a4_resnet20_cifar10"],
    ["-m", "quant.bits=2,3,4", "debug=smoke"],
    ["+quant@extra_callbacks.ipq=ipq", "extra_callbacks.ipq.start=3"],
    ["--help"],
    ["hydra.run.dir=/tmp/x", "+new_key=1"],
    ["-m", "recipe=glob(qat*)", "quant.bits=choice(2,4)"],
])
def test_known_names_pass(argv):
    check_argv(argv)


# ---- train.py itself: exit status 2, one line, FAILED, no torch, time to the error -------

WRAP = ("import runpy, sys\nsys.argv = ['train.py', *sys.argv[1:]]\ntry:\n"
        "    runpy.run_path('train.py', run_name='__main__')\nfinally:\n"
        "    print('TORCH_IMPORTED', 'torch' in sys.modules, flush=True)\n")


def _train_py(*args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "QTRAIN_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAP, *args, f"hydra.run.dir={tmp_path}/run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r, wall, cpu


@pytest.mark.parametrize("args, line", [
    (["quant.bits=four"], "error: ConfigError: quant.bits='four': allowed: an integer in 1..8"),
    (["trainer.precision=bf16-mix"], "error: ConfigError: trainer.precision='bf16-mix': allowed:"),
    (["recipe=pact_w4a4_resnet20_cifar"],
     "error: ConfigError: recipe=pact_w4a4_resnet20_cifar: no such option in conf/recipe/ "
     "(did you mean 'pact_w4a4_resnet20_cifar10'?)"),
])
def test_train_py_fails_before_torch(args, line, tmp_path):
    r, wall, cpu = _train_py(*args, tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(line), r.stderr[-2000:]
    assert "TORCH_IMPORTED False" in r.stdout, r.stdout
    # the import of torch + Lightning alone takes ~5 s of CPU on the 2-core dev VM (README);
    # CPU, not wall time: the shared machine's load stretches wall time
    assert cpu < 5.0, f"{cpu:.2f} s CPU ({wall:.2f} s wall) to the error"
    failed = tmp_path / "run" / "FAILED"
    if args[0].startswith("recipe="):  # Hydra never started the run: no run dir
        assert not failed.exists()
    else:  # the run dir records it as every bad-input failure does
        assert failed.read_text().startswith(err[0].removeprefix("error: "))
        assert not (tmp_path / "run" / "RUNNING").exists()


def test_error_lines_name_the_schema_file_for_unknown_keys(hydra_conf):
    cfg = _compose(["+quant.act.bogus=1"])
    with pytest.raises(ConfigError, match=re.escape("qtrain/config_schema/")):
        check_config(cfg)
