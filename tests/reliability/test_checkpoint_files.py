"""Checkpoint files (qtrain.checkpointing, qtrain.callbacks.run_checkpoint): written during
training by the default config, atomically (kill -9 mid-write), with a checksum and the
run's metadata verified on load; ckpt_path=last / <run dir> resolution."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import zipfile
from datetime import timedelta

import pytest
import torch
from hydra.utils import instantiate

from qtrain.callbacks.resume_state import ResumeState
from qtrain.callbacks.run_checkpoint import RunCheckpoint
from qtrain.checkpointing import (
    VerifiedCheckpointIO,
    checkpoint_checksum,
    read_checkpoint,
    resolve_ckpt_path,
    run_metadata,
    write_checkpoint,
)
from qtrain.errors import ConfigError, DataFileError
from tests.callbacks.tiny_lightning import TinyCNN, image_loader, trainer
from tests.hydra_helpers import compose_cfg, run


def _meta(tmp_path, *overrides):
    return run_metadata(compose_cfg(["recipe=qat_int4_digits", *overrides], tmp_path))


def _fit(tmp_path, meta, epochs=2, **ckpt_kw):
    """A real Trainer fit (5 batches/epoch) with the run's checkpoint callback and IO."""
    torch.manual_seed(0)
    cb = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="epoch{epoch:03d}-step{step}",
                       auto_insert_metric_name=False, **ckpt_kw)
    tr = trainer(max_epochs=epochs, callbacks=[cb, ResumeState()], enable_checkpointing=True,
                 plugins=[VerifiedCheckpointIO(meta)], default_root_dir=str(tmp_path))
    tr.fit(TinyCNN(), image_loader(n=40, batch=8), image_loader(n=16, seed=1))
    return tmp_path / "checkpoints"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    meta = _meta(d, "quant.bits=8")
    return _fit(d, meta) / "last.ckpt", meta


def _steps(folder) -> list[int]:
    return sorted(int(p.stem.split("step")[1]) for p in folder.glob("epoch*.ckpt"))


# ------------------------------------------------------------------ writing during training
def test_default_config_checkpoints_every_epoch_keeping_the_newest_two(tmp_path):
    cfg = compose_cfg(["recipe=qat_int4_digits"], tmp_path)
    cb = instantiate(cfg.callbacks.checkpoint)
    assert isinstance(cb, RunCheckpoint) and cb.save_top_k == 2 and cb.save_last is True
    assert cb._every_n_epochs == 1 and cb._train_time_interval == timedelta(minutes=30)
    folder = _fit(tmp_path, run_metadata(cfg), epochs=3, save_top_k=2)
    assert _steps(folder) == [10, 15]  # epochs 2 and 3 (5 steps each); epoch 1 pruned
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 15


def test_last_ckpt_replaces_a_stale_one_in_the_folder(tmp_path):
    """A run writing into a folder that already holds an older last.ckpt (resumed from a
    checkpoint kept elsewhere, or rerun into the same hydra.run.dir) replaces it: Lightning's
    version counter wrote last-v1.ckpt beside it, and ckpt_path=<run dir> then resumed from
    the stale file."""
    folder = _fit(tmp_path, None, epochs=1)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5
    folder = _fit(tmp_path, None, epochs=2)  # a new run into the same folder
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 10
    assert resolve_ckpt_path(str(tmp_path), str(tmp_path)) == str(folder / "last.ckpt")


def test_step_and_epoch_triggers_combine_but_skip_the_last_batch(tmp_path):
    folder = _fit(tmp_path, None, every_n_train_steps=2, save_top_k=-1)
    # steps 2, 4 | epoch end 5 | 6, 8 | epoch end 10 (the step trigger skips last batches)
    assert _steps(folder) == [2, 4, 5, 6, 8, 10]


def test_time_trigger_saves_during_the_epoch(tmp_path):
    folder = _fit(tmp_path / "t", None, every_n_epochs=0, save_top_k=-1,
                  train_time_interval=timedelta(microseconds=1))
    assert _steps(folder) == [1, 2, 3, 4, 6, 7, 8, 9]  # never on an epoch's last batch


def test_bad_trigger_values_name_the_key():
    with pytest.raises(ConfigError, match="every_n_train_steps=-1"):
        RunCheckpoint(every_n_train_steps=-1)
    with pytest.raises(ConfigError, match="train_time_interval"):
        RunCheckpoint(train_time_interval=timedelta(0))
    with pytest.raises(ConfigError, match="save_top_k=-3"):
        RunCheckpoint(save_top_k=-3)


# ------------------------------------------------------------------ verified reads
def test_written_file_verifies_and_holds_metadata_rng_and_loader_state(ckpt):
    path, meta = ckpt
    c = read_checkpoint(path, meta)
    assert c["qtrain"]["meta"] == meta and meta["bits"] == {"quant.bits": 8, "quant.act_bits": None}
    assert meta["recipe"] == "qat_int4_digits" and meta["method"].endswith("QATCallback")
    assert set(c["rng_states"]) >= {"torch", "numpy", "python"}
    assert c["qtrain"]["sha256"] == checkpoint_checksum(c, meta)


def _tensor_offset(path) -> int:
    """Byte offset of the largest tensor record's data inside the (zip) checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, extra = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + n + extra + info.file_size // 2


def _flip(src, dst, offset):
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x10
    dst.write_bytes(bytes(data))


def test_flipped_byte_in_a_tensor_is_a_checksum_error_naming_the_file(ckpt, tmp_path):
    path, meta = ckpt
    bad = tmp_path / "flipped.ckpt"
    _flip(path, bad, _tensor_offset(path))
    assert torch.load(bad, weights_only=True)["epoch"] == 1  # torch alone loads it silently
    with pytest.raises(DataFileError, match=f"{bad}.*checksum mismatch"):
        read_checkpoint(bad, meta)


def test_any_flipped_byte_is_rejected_or_changes_nothing(ckpt, tmp_path):
    """40 random positions over the whole file: never a silently different checkpoint,
    never a raw exception."""
    path, meta = ckpt
    good = checkpoint_checksum(torch.load(path, weights_only=True), meta)
    size, rng = path.stat().st_size, random.Random(0)
    for k, off in enumerate(rng.sample(range(size), 40)):
        bad = tmp_path / f"f{k}.ckpt"
        _flip(path, bad, off)
        try:
            c = read_checkpoint(bad, meta)
        except DataFileError as e:
            assert str(bad) in str(e)
        else:
            assert checkpoint_checksum(c, meta) == good, off


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1])
def test_truncated_file_is_one_clear_error(ckpt, tmp_path, keep):
    path, meta = ckpt
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[:n])
    with pytest.raises(DataFileError, match=f"{bad}: cannot be read, the file is truncated or corrupt"):
        read_checkpoint(bad, meta)


def test_other_bit_width_or_recipe_says_what_differs(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(DataFileError, match=r"quant\.bits: checkpoint 8, this run 4"):
        read_checkpoint(path, _meta(tmp_path, "quant.bits=4"))
    other = run_metadata(compose_cfg(["recipe=qat_int8_resnet20_cifar10"], tmp_path))
    with pytest.raises(DataFileError, match="recipe: checkpoint 'qat_int4_digits', this run "
                                            "'qat_int8_resnet20_cifar10'.*model: checkpoint"):
        read_checkpoint(path, other)


def test_file_without_qtrain_block_or_with_code_is_refused(ckpt, tmp_path):
    path, meta = ckpt
    plain = tmp_path / "plain.ckpt"
    c = torch.load(path, weights_only=True)
    del c["qtrain"]
    torch.save(c, plain)  # e.g. a Lightning checkpoint written without qtrain's plugin
    with pytest.raises(DataFileError, match="no qtrain metadata and checksum"):
        read_checkpoint(plain, meta)

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(DataFileError, match="Python objects other than tensors"):
        read_checkpoint(evil, meta)
    assert not marker.exists()


def _write_forever(path: str, ready_fd: int) -> None:
    """The writer: rewrites an 8 MB checkpoint in a loop; one byte on ``ready_fd`` after the
    first complete write."""
    for i in range(10**6):
        write_checkpoint({"w": torch.full((2_000_000,), float(i)), "i": i}, path)
        if i == 0:
            os.write(ready_fd, b"1")


def test_kill9_while_writing_never_leaves_a_broken_file(tmp_path):
    """A writer process rewriting an 8 MB checkpoint in a loop is SIGKILLed at random moments
    (mostly mid-write): the file is always a complete, verified checkpoint. The writer is
    forked from this process (a real process, a real SIGKILL), so it does not pay a fresh
    interpreter's ~10 s CPU of torch + Lightning imports per kill."""
    path = tmp_path / "last.ckpt"
    rng = random.Random(1)
    fork = multiprocessing.get_context("fork")
    for _ in range(2):
        ready, done = os.pipe()
        p = fork.Process(target=_write_forever, args=(str(path), done), daemon=True)
        p.start()
        os.close(done)
        try:
            assert os.read(ready, 1) == b"1"  # one full write done
        finally:
            os.close(ready)
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=60)
        assert p.exitcode == -signal.SIGKILL
        c = read_checkpoint(path)
        assert torch.equal(c["w"], torch.full((2_000_000,), float(c["i"])))


# ------------------------------------------------------------------ ckpt_path
def test_ckpt_path_last_run_dir_and_file(tmp_path):
    runs = tmp_path / "runs" / "r"
    old, new, cur = runs / "a", runs / "b", runs / "c"
    for d in (old, new):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
    os.utime(old / "checkpoints" / "last.ckpt", (1, 1))
    cur.mkdir()
    assert resolve_ckpt_path("last", str(cur)) == str(new / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(old), str(cur)) == str(old / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(old / "checkpoints"), str(cur)) == str(old / "checkpoints" / "last.ckpt")
    f = str(old / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(f, str(cur)) == f
    assert resolve_ckpt_path(None, str(cur)) is None
    (cur / "checkpoints").mkdir()
    (cur / "checkpoints" / "last.ckpt").write_bytes(b"y")  # a rerun into the same folder
    assert resolve_ckpt_path("last", str(cur)) == str(cur / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="ckpt_path=last: no .*checkpoints/last.ckpt"):
        resolve_ckpt_path("last", str(tmp_path / "elsewhere" / "x"))
    with pytest.raises(ConfigError, match="ckpt_path=.*nope: no such file"):
        resolve_ckpt_path(str(tmp_path / "nope"), str(cur))
    with pytest.raises(ConfigError, match="without checkpoints/last.ckpt"):
        resolve_ckpt_path(str(tmp_path), str(cur))


def test_resume_into_another_bit_width_fails_before_training(tmp_path):
    """The real run path: a 4-bit run's checkpoint given to an 8-bit run is refused (before,
    it loaded silently: same tensor names) and the truncated file is one clear error."""
    common = ["recipe=qat_int4_digits", "debug=smoke", "trainer.max_epochs=1"]
    run(common, tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(DataFileError, match=r"quant\.bits: checkpoint 4, this run 8"):
        run(common + ["quant.bits=8", f"ckpt_path={tmp_path / 'a'}"], tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing trained
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(DataFileError, match="truncated or corrupt"):
        run(common + [f"ckpt_path={tmp_path / 'a'}"], tmp_path / "c")
