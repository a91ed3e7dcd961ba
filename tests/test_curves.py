"""qtrain.curves: validation error per epoch from a run's CSV metrics, and the PNG."""

import pytest

from qtrain.curves import main, read_curve
from qtrain.errors import DataFileError


def _run(tmp_path, name, rows):
    d = tmp_path / name / "csv"
    d.mkdir(parents=True)
    lines = ["epoch,step,train_loss_step,val_acc,val_loss"] + rows
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / name


def test_error_per_epoch_from_the_step(tmp_path):
    # 4 steps per epoch: train rows at steps 0..3 (epoch 0), 4.. (epoch 1); val at 1, 3, 7
    run = _run(tmp_path, "a", ["0,0,2.0,,", "0,1,,0.5,1.0", "0,3,,0.9,0.5", "1,4,1.0,,",
                               "1,7,,0.975,0.1"])
    assert read_curve(run) == [(0.5, 50.0), (1.0, pytest.approx(10.0)), (2.0, pytest.approx(2.5))]
    assert read_curve(run, "val_loss", steps_per_epoch=8) == [(0.25, 1.0), (0.5, 0.5), (1.0, 0.1)]


def test_png_and_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _run(tmp_path, "a", ["0,3,,0.9,0.5", "1,7,,0.95,0.3"])
    out = tmp_path / "c.png"
    assert main([f"{a}=stochastic", "--out", str(out), "--steps-per-epoch", "4"]) == 0
    assert out.stat().st_size > 1000 and "stochastic: 1.00:10.00, 2.00:5.00" in capsys.readouterr().out
    assert main([f"{tmp_path / 'nope'}=x", "--out", str(out)]) == 2
    with pytest.raises(DataFileError, match="no column"):
        read_curve(a, "val_top5")
