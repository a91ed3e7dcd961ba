"""The GPU campaign (benchmarks/gpu_campaign.sh, campaign_run.py, campaign_data.py).

Default suite: the data packing round trip (against Pillow decoding the original JPEGs and
qtrain's own CIFAR reader), the epoch sizing and the hard time box of the driver with a real
process. Slow: the whole script at tiny scale on CPU (real train.py processes: FP32 then three
recipes from its checkpoint) and, where ../shared/data exists, the packed real CIFAR-10 against
the shared ``materialize.py --format pickle`` byte for byte."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses / process pools look the module up by name
    spec.loader.exec_module(mod)
    return mod


cdata = _load("campaign_data")
crun = _load("campaign_run")


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="JPEG", quality=quality)
    return b.getvalue()


def write_real_format(folder: Path, n_train: int = 64, n_test: int = 40, seed: int = 0,
                      qualities=(75,)) -> dict:
    """``{train,test}_jpeg.npz`` in the shared copy's format (jpeg bytes, offsets, labels,
    names, classes) from random images; returns the JPEG blobs per split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        blobs = [_jpeg(im, qualities[i % len(qualities)]) for i, im in enumerate(imgs)]
        labels = rng.integers(0, 10, n)
        off = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        np.savez(folder / f"{split}_jpeg.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8),
                 offsets=off, labels=labels, names=np.array([f"{i}.png" for i in range(n)]),
                 classes=np.array(CLASSES))
        out[split] = (blobs, labels)
    return out


def _read_with_qtrain(root: Path, train: bool):
    """The split as data=cifar10 reads it (qtrain.data.vision._SafePickles: the restricted
    unpickler and layout checks of qtrain.data.file_checks, files in torchvision's order)."""
    from qtrain.data import file_checks as FC

    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    parts = [FC.cifar_batch(str(folder / n), "labels") for n in names]
    data = np.vstack([d for d, _ in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray([y for _, ys in parts for y in ys])
    return data, labels, FC.cifar_classes(str(folder / "batches.meta"), "label_names")


@pytest.mark.parametrize("qualities", [(75,), (75, 90)])
def test_pack_unpack_round_trip(tmp_path, qualities):
    src = write_real_format(tmp_path / "src", qualities=qualities)
    info = cdata.pack(str(tmp_path / "src"), str(tmp_path / "packed"))
    # one encoder setting: one shared header stored once; two settings: full bytes kept
    assert info["train"]["header_bytes"] == (623 if len(qualities) == 1 else 0)
    assert cdata.unpack_blobs(str(tmp_path / "packed" / "cifar10_train.npz"))[0] == src["train"][0]
    cdata.unpack(str(tmp_path / "packed"), str(tmp_path / "root"), "pil")
    for split, train in (("train", True), ("test", False)):
        blobs, labels = src[split]
        ref = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        x, y, classes = _read_with_qtrain(tmp_path / "root", train)
        order = np.random.default_rng(0).permutation(len(blobs))  # materialize.py's shuffle
        np.testing.assert_array_equal(x, ref[order])
        np.testing.assert_array_equal(y, labels[order])
        assert classes == CLASSES
    meta = json.loads((tmp_path / "root" / "campaign_data.json").read_text())
    assert meta["train"]["decoder"] == "pil" and meta["train"]["images"] == 64


def test_torchvision_decoder_matches_pillow(tmp_path):
    src = write_real_format(tmp_path / "src", n_train=12, n_test=4)
    pil, used_pil = cdata.decode(src["train"][0], "pil")
    tv, used_tv = cdata.decode(src["train"][0], "torchvision")
    assert (used_pil, used_tv) == ("pil", "torchvision")
    np.testing.assert_array_equal(pil, tv)


def test_damaged_pack_is_refused(tmp_path):
    write_real_format(tmp_path / "src", n_train=8, n_test=4)
    cdata.pack(str(tmp_path / "src"), str(tmp_path / "packed"))
    path = tmp_path / "packed" / "cifar10_test.npz"
    z = dict(np.load(path))
    z["body"] = z["body"].copy()
    z["body"][5] ^= 0xFF
    np.savez(path, **z)
    with pytest.raises(cdata.CampaignDataError, match="SHA-256"):
        cdata.unpack_blobs(str(path))
    assert cdata.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "root")]) == 2


def _args(tmp_path, **kw):
    a = crun.argparse.Namespace(
        work=str(tmp_path), data_root="/data", scale="full", budget_s=540.0, t0=1000.0,
        recipes=["ttq_resnet20_cifar10", "lsq_w2a2_resnet20_cifar10"], precision="bf16-mixed",
        fp32_epochs=164, fp32_val_every=4, recipe_reserve_s=150.0, ft_epochs=0, ft_lr=0.01,
        ft_slowdown=0.0, default_epoch_s=2.5, seed=0)
    vars(a).update(kw)
    return a


def test_plan_sizes_epochs_to_the_time_left(tmp_path):
    assert crun.fmt_max_time(3725.4) == "00:01:02:05"
    a = _args(tmp_path)
    # FP32: deadline 1000 + 540 - 10 - 150 = 1380; launched at 1020: box 1380-1020-30-20 = 310 s
    fp = crun.plan_fp32(a, 1020.0, 2)
    assert fp.hard_deadline == 1380.0 and fp.max_time_s == 310.0
    assert "++trainer.max_time=00:00:05:10" in fp.overrides
    assert "scheduler.milestones=[82,123]" in fp.overrides  # 32k / 48k iterations of 391
    # recipes at 1400: train 1530-1400-50 = 80 s; 2 s FP32 epochs x slowdown 2 -> 20 epochs
    meta = {}
    runs = crun.plan_recipes(a, 1400.0, tmp_path / "fp32", 2.0, meta)
    assert [r.max_epochs for r in runs] == [20, 20] and meta["recipe_epoch_estimate_s"] == 4.0
    assert all(f"init_from={tmp_path / 'fp32'}" in r.overrides for r in runs)
    assert all("quant_start_epoch=0" in r.overrides and r.hard_deadline == 1530.0 for r in runs)
    # more time than the recipe's own schedule: its max_epochs (200) is the cap
    runs = crun.plan_recipes(_args(tmp_path, budget_s=1e6), 1400.0, tmp_path, 0.01, {})
    assert [r.max_epochs for r in runs] == [200, 200]
    # 6 runs at once: slowdown 0.67 x 6 = 4.02 per FP32 epoch
    a6 = _args(tmp_path, recipes=["ttq_resnet20_cifar10"] * 6)
    assert crun.plan_recipes(a6, 1400.0, tmp_path, 2.0, {})[0].max_epochs == int(80 / 8.04)


def test_hard_deadline_stops_a_run_and_keeps_the_results(tmp_path):
    run_dir = tmp_path / "runs" / "sleeper"
    run_dir.mkdir(parents=True)
    r = crun.Run("sleeper", "ttq_resnet20_cifar10", "finetune", [], run_dir, 3,
                 hard_deadline=time.time() + 1.0)
    r.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              process_group=0)
    r.start = time.time()
    a = crun.argparse.Namespace(refresh_s=0.5, poll_s=0.1)
    refreshes, lines = [], []
    t = time.time()
    crun.wait_all([r], a, lines.append, lambda: refreshes.append(time.time()))
    assert time.time() - t < 10 and r.rc == -signal.SIGTERM
    assert refreshes and any("SIGTERM sleeper" in ln for ln in lines)
    assert crun.status(r) == "ended without a summary (exit -15)"
    row = crun.collect(r)
    assert "summary" not in row
    assert "TTQ" in row["paper"] and row["wall_s"] < 10


@pytest.mark.slow
def test_campaign_tiny_scale_end_to_end(tmp_path):
    write_real_format(tmp_path / "src", n_train=96, n_test=64)
    cdata.pack(str(tmp_path / "src"), str(tmp_path / "packed"))
    out = tmp_path / "out"
    env = dict(os.environ, CAMPAIGN_SCALE="tiny", CAMPAIGN_PACKED=str(tmp_path / "packed"),
               CAMPAIGN_WORK=str(tmp_path / "work"), OUT=str(out), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", CAMPAIGN_PRECISION="bf16-mixed")  # the device's autocast
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh")], env=env,
                       capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    # the device returns at most 8 files, plain names
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"results.md", "results.json", "runs.tar.gz", "campaign.log", "machine.txt",
            "fp32_resnet20_cifar10_last.ckpt"} <= set(files)
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["runs"]]
    assert names == ["fp32_resnet20_cifar10", *crun.DEFAULT_RECIPES] and res["meta"]["done"]
    fp32 = res["runs"][0]
    assert fp32["status"] == "finished" and 0 <= fp32["summary"]["fp32_metric"] <= 1
    ckpt_sha = None
    for r in res["runs"][1:]:
        s = r["summary"]
        assert r["status"] == "finished" and 0 <= s["quant_metric"] <= 1
        assert s["compression"] > 4  # 2-4 bit weights in fact, not a silent FP32 run
        # chained: every recipe started from the FP32 run's own last checkpoint
        assert Path(s["init_from"]["file"]) == (Path(fp32["summary"]["run_dir"]) / "checkpoints"
                                                / "last.ckpt").resolve()
        ckpt_sha = ckpt_sha or s["init_from"]["sha256"]
        assert s["init_from"]["sha256"] == ckpt_sha
        assert "quant_start_epoch=0" in s["overrides"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        members = set(tar.getnames())
    for n in names:
        assert f"runs/{n}/summary.json" in members and f"runs/{n}.log" in members
    assert not [m for m in members if m.endswith(".ckpt")]
    md = (out / "results.md").read_text()
    assert all(f"| `{n}` |" in md for n in names)
    assert "91.25%" in md  # the paper's number, from the recipe header


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="../shared/data/cifar10 not present")
def test_packed_real_cifar10_equals_shared_materialize(tmp_path):
    info = cdata.pack(str(SHARED_CIFAR), str(tmp_path / "packed"))
    size = sum(f.stat().st_size for f in (tmp_path / "packed").iterdir())
    assert info["train"]["images"] == 50000 and info["test"]["images"] == 10000
    assert size < 20e6  # travels with the working tree under the 64 MiB limit
    cdata.unpack(str(tmp_path / "packed"), str(tmp_path / "ours"))
    subprocess.run([sys.executable, str(SHARED_CIFAR / "materialize.py"), str(tmp_path / "ref"),
                    "--format", "pickle"], check=True, capture_output=True)
    for f in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        a = (tmp_path / "ours" / "cifar-10-batches-py" / f).read_bytes()
        assert a == (tmp_path / "ref" / "cifar-10-batches-py" / f).read_bytes(), f
