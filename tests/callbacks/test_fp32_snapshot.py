"""The FP32 snapshot (qtrain.callbacks.fp32_snapshot): written once to the run dir, referenced by
name + SHA-256 from every checkpoint (no second copy of the model in a checkpoint), restored
bitwise on resume (the run's FP32 test row equals the uninterrupted run's), and a missing or
changed file is one clear error naming it."""

from __future__ import annotations

import functools
import hashlib

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn

from qtrain.callbacks import fp32_snapshot as S
from qtrain.callbacks.deep_compression import DeepCompressionCallback
from qtrain.callbacks.elq import ELQCallback
from qtrain.callbacks.inq import INQCallback
from qtrain.callbacks.qat import QATCallback
from qtrain.data.digits import DigitsDataModule
from qtrain.errors import DataFileError, MissingFileError
from qtrain.modules.classification import ImageClassifier
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.run import _test_snapshot

NAME = S.file_name("qat")


def _module(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    return ImageClassifier(model, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _qat() -> QATCallback:
    return QATCallback(bits=4, weight=lambda bits: UniformQuantizer(bits, symmetric=True),
                       act=lambda bits: UniformQuantizer(bits, observer="ema"),
                       first_last="quantize", start_epoch=1)


class _EpochEnd(pl.Callback):
    """The module's state at the end of each training epoch (an independent copy)."""

    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _fit(run_dir, callbacks, module=None, epochs=3, ckpt_path=None):
    ck = pl.callbacks.ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_top_k=-1,
                                      every_n_epochs=1, save_last=True,
                                      filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, deterministic=True,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=2,
                         limit_test_batches=2, default_root_dir=str(run_dir),
                         callbacks=[*callbacks, ck])
    module = module or _module()
    dm = DigitsDataModule(batch_size=32, fake=True)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, module, dm


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A real 3-epoch QAT run (epoch 0 FP32, quantized from epoch 1) with a checkpoint per epoch."""
    run_dir = tmp_path_factory.mktemp("qat_run")
    pl.seed_everything(0)
    cb, ends = _qat(), _EpochEnd()
    trainer, module, dm = _fit(run_dir, [cb, ends])
    return run_dir, cb, ends, trainer, module, dm


def test_snapshot_is_written_once_and_checkpoints_only_reference_it(qat_run):
    run_dir, cb, ends, _, module, _ = qat_run
    path = run_dir / NAME
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == [NAME]
    on_disk = load_file(path)
    # the file is the module state at the end of the FP32 epoch 0 (independent capture)
    assert on_disk.keys() == ends.states[0].keys()
    for k, v in ends.states[0].items():
        assert torch.equal(on_disk[k], v), k
        assert torch.equal(cb.fp32_state[k], v), k
    assert not torch.equal(on_disk["model.0.weight"], module.model[0].weight.detach())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model_bytes = _tensor_bytes(module.state_dict())
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch000.ckpt", "epoch001.ckpt", "epoch002.ckpt", "last.ckpt"]
    for p in ckpts[1:]:  # after the FP32 phase
        ck = torch.load(p, weights_only=True)
        state = ck["callbacks"]["QATCallback"]
        assert "fp32_state" not in state
        assert state[S.KEY] == {"file": NAME, "sha256": digest, "bytes": path.stat().st_size,
                                "tensors": len(on_disk)}
        # no second copy of the model: the model's tensors plus everything else but the
        # optimizer state (SGD momentum: one more copy of the parameters, legitimately)
        rest = {k: v for k, v in ck.items() if k != "optimizer_states"}
        assert _tensor_bytes(ck["state_dict"]) == model_bytes
        assert _tensor_bytes(rest) < 1.3 * model_bytes
        assert _tensor_bytes(state) == 0
    assert torch.load(ckpts[0], weights_only=True)["callbacks"]["QATCallback"][S.KEY] is None


def test_resume_in_another_dir_restores_the_snapshot_and_the_fp32_row(qat_run, tmp_path):
    run_dir, cb, _, trainer, module, dm = qat_run
    ref_row = _test_snapshot(trainer, module, dm, cb.fp32_state, "test_acc")
    pl.seed_everything(0)
    cb2 = _qat()
    t2, m2, dm2 = _fit(tmp_path, [cb2], module=_module(seed=5),
                       ckpt_path=str(run_dir / "checkpoints" / "epoch001.ckpt"))
    assert cb2.fp32_state.keys() == cb.fp32_state.keys()
    assert all(torch.equal(cb2.fp32_state[k], v) for k, v in cb.fp32_state.items())
    assert _test_snapshot(t2, m2, dm2, cb2.fp32_state, "test_acc") == ref_row
    # the resumed run's dir holds its own copy (same bytes), which its checkpoints reference
    assert (tmp_path / NAME).read_bytes() == (run_dir / NAME).read_bytes()
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ref = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["callbacks"]["QATCallback"][S.KEY] == ref["callbacks"]["QATCallback"][S.KEY]
    for k, v in ref["state_dict"].items():  # the resumed training itself is exact too
        assert torch.equal(last["state_dict"][k], v), k


def _copy_run(src, dst):
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "checkpoints" / "epoch001.ckpt").write_bytes((src / "checkpoints" / "epoch001.ckpt").read_bytes())
    return dst / "checkpoints" / "epoch001.ckpt"


def test_missing_or_changed_snapshot_is_one_error_naming_the_file(qat_run, tmp_path):
    run_dir = qat_run[0]
    ckpt = _copy_run(run_dir, tmp_path / "moved")  # the checkpoint without its run dir's file
    with pytest.raises(MissingFileError, match=rf"FP32 snapshot {NAME}: not found .*moved/checkpoints/{NAME}"):
        _fit(tmp_path / "new", [_qat()], ckpt_path=str(ckpt))
    data = bytearray((run_dir / NAME).read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of a tensor
    (tmp_path / "moved" / NAME).write_bytes(bytes(data))
    with pytest.raises(DataFileError, match=rf"moved/{NAME} .*differs from what the checkpoint references"):
        _fit(tmp_path / "new", [_qat()], ckpt_path=str(ckpt))
    (tmp_path / "moved" / NAME).write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DataFileError, match=r"corrupt, truncated or from another run"):
        _fit(tmp_path / "new", [_qat()], ckpt_path=str(ckpt))
    (tmp_path / "moved" / NAME).write_bytes((run_dir / NAME).read_bytes())  # put back: resumes
    _fit(tmp_path / "new", [_qat()], ckpt_path=str(ckpt))


def test_a_checkpoint_with_the_tensors_inline_still_resumes_and_moves_them_to_a_file(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    cb = _qat()
    cb.fp32_snapshot.run_dir = str(tmp_path)
    cb.load_state_dict({"fp32_metric": 0.5, "fp32_state": state})
    assert cb.fp32_state is not None and torch.equal(cb.fp32_state["w"], state["w"])
    ref = cb.state_dict()[S.KEY]  # the next checkpoint: the tensors go to the run dir's file
    assert ref["sha256"] == hashlib.sha256((tmp_path / NAME).read_bytes()).hexdigest()
    assert torch.equal(load_file(tmp_path / NAME)["n"], state["n"])
    fresh = _qat()
    fresh.load_state_dict({"fp32_metric": 0.5, S.KEY: None})
    assert fresh.fp32_state is None and fresh.state_dict()[S.KEY] is None


def test_bytes_are_deterministic():
    a = {"b": torch.randn(3, 4).t(), "a": torch.ones(2, dtype=torch.bool)}  # non-contiguous too
    b = {"a": a["a"].clone(), "b": a["b"].contiguous()}
    assert len({S.serialize(a) for _ in range(8)} | {S.serialize(b)}) == 1  # maps in hash order vary


# every method callback with an FP32 phase: the checkpoint references the file, no tensors
CALLBACKS = {
    "inq": lambda: INQCallback(bits=5, schedule=[0.5, 1.0], start=1, unit="epoch"),
    "elq": lambda: ELQCallback(kind="ternary", schedule=[0.5, 1.0], boundaries=[1, 2], unit="epoch"),
    "deep_compression": lambda: DeepCompressionCallback(
        sparsity={"Conv2d": 0.5, "Linear": 0.5}, bits={"Conv2d": 4, "Linear": 4},
        index_bits={"Conv2d": 4, "Linear": 4}, start=1, prune_epochs=[0], quantize_epoch=1),
}


@pytest.mark.parametrize("tag", sorted(CALLBACKS))
def test_every_method_keeps_the_snapshot_out_of_its_checkpoints(tag, tmp_path):
    pl.seed_everything(0)
    cb, ends = CALLBACKS[tag](), _EpochEnd()
    _fit(tmp_path, [cb, ends])
    on_disk = load_file(tmp_path / S.file_name(tag))
    for k, v in ends.states[0].items():  # end of the FP32 epoch 0
        assert torch.equal(on_disk[k], v), k
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ck["callbacks"].items() if k.startswith(type(cb).__name__))
    assert "fp32_state" not in state and state[S.KEY]["file"] == S.file_name(tag)
    pl.seed_everything(0)
    fresh = CALLBACKS[tag]()
    _fit(tmp_path / "resumed", [fresh], epochs=3, ckpt_path=str(tmp_path / "checkpoints" / "epoch001.ckpt"))
    assert all(torch.equal(fresh.fp32_state[k], v) for k, v in ends.states[0].items())


@pytest.mark.slow  # 3 train.py runs (~1 min each on a shared 2-core CPU)
def test_kill9_after_the_fp32_phase_then_resume_gives_the_same_fp32_row(tmp_path):
    """A real ``train.py`` (digits QAT, FP32 epoch 0) SIGKILLed inside epoch 1, resumed with
    ``ckpt_path=last`` into a new run dir: the final checkpoint equals the uninterrupted run's
    bitwise (snapshot reference included) and so does the summary's FP32 test row."""
    import json
    import signal

    from tests.hydra_helpers import run
    from tests.reliability.resume_helpers import differing, final_state, kill_overrides, train_py

    common = ["recipe=qat_int4_digits", "debug=smoke", "trainer.max_epochs=3", "quant_start_epoch=1",
              "callbacks.checkpoint.every_n_train_steps=1"]
    ref = run(common, tmp_path / "reference")
    killed = train_py(common + kill_overrides(5) + [f"hydra.run.dir={tmp_path}/1_killed"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "1_killed" / NAME).is_file()  # written with the first checkpoint after
    resumed = train_py(common + ["ckpt_path=last", f"hydra.run.dir={tmp_path}/2_resumed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = final_state(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    b = final_state(tmp_path / "2_resumed" / "checkpoints" / "last.ckpt")
    assert differing(a, b) == []
    assert a["callbacks.QATCallback.fp32_snapshot.file"] == NAME
    summary = json.loads((tmp_path / "2_resumed" / "summary.json").read_text())
    assert summary["fp32_source"] == ref["fp32_source"] == "FP32 phase's last weights"
    assert summary["fp32_metric"] == ref["fp32_metric"]
    assert (tmp_path / "2_resumed" / NAME).read_bytes() == (tmp_path / "reference" / NAME).read_bytes()


def test_no_file_until_a_checkpoint_references_it(tmp_path):
    """A run that never checkpoints (a bare Trainer) writes nothing; the first state_dict
    (what a checkpoint stores) writes the file it references. The object pickles (ddp_spawn)."""
    import pickle

    pl.seed_everything(0)
    cb = CALLBACKS["inq"]()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_train_batches=2, limit_val_batches=1,
                         default_root_dir=str(tmp_path))
    trainer.callbacks.append(cb)
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=32, fake=True))
    assert cb.fp32_state is not None and not list(tmp_path.glob("*.safetensors"))
    ref = cb.state_dict()[S.KEY]
    assert ref["sha256"] == hashlib.sha256((tmp_path / ref["file"]).read_bytes()).hexdigest()
    copy = pickle.loads(pickle.dumps(cb.fp32_snapshot))
    assert all(torch.equal(copy.state[k], v) for k, v in cb.fp32_state.items())
