"""Loggers get the run's story (issue 13, item 1): a real smoke run with the CSV and
TensorBoard loggers, read back from their own files (CSV metrics + hparams.yaml; the
TensorBoard event file through tensorboard's EventAccumulator)."""

import csv

import pytest
import yaml

from qtrain.checkpointing import checkpoint_config
from qtrain.dashboard import final_metrics
from tests.hydra_helpers import run


def test_final_metrics_have_distinct_names():
    s = {"metric": "acc", "quant_metric": 0.9, "float_weights_metric": 0.95, "fp32_metric": 0.97,
         "fp32_mb": 1.0, "quant_mb": 0.25, "compression": 4.0, "huffman_mb": None}
    assert final_metrics(s) == {"test/acc_quant": 0.9, "test/acc_float_master": 0.95,
                                "test/acc_fp32": 0.97, "size/fp32_mb": 1.0,
                                "size/quant_mb": 0.25, "size/compression": 4.0}


def test_csv_and_tensorboard_get_config_final_metrics_and_sizes(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    summary = run(["debug=smoke", "logger=many", "quant.bits=3"], tmp_path)
    # CSV: the resolved config and one row with every final number, under distinct names
    hp = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hp["quant"]["bits"] == 3 and hp["model"]["_target_"] == "qtrain.models.small.SmallCNN"
    # every checkpoint carries the same resolved config (read back through the verified reader)
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for c in ckpts:
        assert checkpoint_config(c) == hp, c.name
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    final = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith(
        ("test/", "size/"))}
    assert final["test/acc_quant"] == pytest.approx(summary["quant_metric"])
    assert final["test/acc_float_master"] == pytest.approx(summary["float_weights_metric"])
    assert final["test/acc_fp32"] == pytest.approx(summary["fp32_metric"])
    assert final["size/quant_mb"] == pytest.approx(summary["quant_mb"])
    assert final["size/compression"] == pytest.approx(summary["compression"])
    # TensorBoard: the same scalars in the event file
    dirs = {p.parent for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}
    tags, acc = set(), None
    for d in dirs:  # the hparams plugin may write its own file
        a = ea_mod.EventAccumulator(str(d))
        a.Reload()
        if "test/acc_quant" in a.Tags()["scalars"]:
            acc = a
        tags |= set(a.Tags()["scalars"])
    assert {"test/acc_quant", "test/acc_fp32", "size/quant_mb", "size/compression"} <= tags
    (last,) = acc.Scalars("test/acc_quant")[-1:]
    assert last.value == pytest.approx(summary["quant_metric"], rel=1e-6)
