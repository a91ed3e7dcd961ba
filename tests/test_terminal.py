"""The terminal a person reads (qtrain.terminal, issue 13 item 6): the end-of-run summary and
per-layer tables of a real smoke run, plain text off a terminal and rich tables on one, the
progress-bar switch, and the logger group kept out of run names."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pty
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qtrain import terminal
from qtrain.errors import ConfigError
from tests.hydra_helpers import CONF, ROOT, compose_cfg, run

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RICH_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS")


def _plain_env(mp: pytest.MonkeyPatch) -> None:
    for k in RICH_ENV:
        mp.delenv(k, raising=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real run of the default recipe in smoke mode with stdout a file (not a TTY)."""
    out_dir = tmp_path_factory.mktemp("terminal_run")
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        _plain_env(mp)
        run(["debug=smoke"], out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    with open(out_dir / "layer_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return buf.getvalue(), summary, rows


def _cell(text: str, label: str) -> str:
    """The value cell of the plain summary row ``| <label> | <value> |``."""
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 2 and parts[0] == label:
            return parts[1]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def _layer_line(text: str, layer: str) -> list[str]:
    for line in text.splitlines():
        parts = [p.strip() for p in re.split(r"[|│]", line)]
        if layer in parts:
            return [p for p in parts if p]
    raise AssertionError(f"no layer row {layer!r} in:\n{text}")


def _expected_summary(s: dict) -> dict[str, str]:
    m = s["metric"]
    return {f"quantized {m} (test)": f"{s['quant_metric']:.4f}",
            f"float master weights {m} (test)": f"{s['float_weights_metric']:.4f}",
            f"FP32 {m} (test; {s['fp32_source']})": f"{s['fp32_metric']:.4f}",
            "size FP32 (MB)": f"{s['fp32_mb']:.4f}",
            "size quantized (MB)": f"{s['quant_mb']:.4f}",
            "Huffman-coded (MB)": f"{s['huffman_mb']:.4f}",
            "compression": f"{s['compression']:.2f}x",
            "epochs / time": f"{s['epochs']} / {s['time_s']:.1f}s",
            "run dir": s["run_dir"]}


def _expected_layer(r: dict) -> list[str]:
    return [r["layer"], r["method"], r["bits"], f"{float(r['bits_per_weight']):.3f}",
            r["params"], f"{float(r['rel_error']):.4f}"]


def test_smoke_run_prints_plain_tables_with_the_saved_numbers(smoke_run):
    out, s, rows = smoke_run
    assert "\x1b" not in out  # no ANSI escape codes in a log file
    assert not re.search(r"[\u2500-\u257f]", out)  # no box drawing either: plain ASCII tables
    assert "Epoch 0/" not in out  # no progress bar off a terminal
    for label, value in _expected_summary(s).items():
        assert _cell(out, label) == value
    assert len(rows) == 2  # the tiny digits CNN: conv + linear quantized (first conv kept FP32)
    assert "per-layer quantization (end)" in out
    for r in rows:  # the layer report's own CSV is the reference
        assert _layer_line(out, r["layer"]) == _expected_layer(r)


def test_rich_tables_on_a_terminal_carry_the_same_numbers(smoke_run, monkeypatch):
    _, s, rows = smoke_run
    _plain_env(monkeypatch)
    monkeypatch.setenv("FORCE_COLOR", "1")  # what a terminal (or a user forcing colour) gets
    monkeypatch.setenv("COLUMNS", "160")
    buf = io.StringIO()
    terminal.print_summary(s, rows, 25, "end", file=buf)
    raw = buf.getvalue()
    assert "\x1b[" in raw and "┃" in raw  # styled rich tables
    text = ANSI.sub("", raw)
    for label, value in _expected_summary(s).items():
        line = next(ln for ln in text.splitlines() if f"│ {label} " in ln)
        assert [p.strip() for p in line.split("│") if p.strip()] == [label, value]
    for r in rows:
        assert _layer_line(text, r["layer"]) == _expected_layer(r)
    # TTY_COMPATIBLE=0 wins over FORCE_COLOR: plain text again
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    buf = io.StringIO()
    terminal.print_summary(s, rows, 25, "end", file=buf)
    assert "\x1b" not in buf.getvalue() and _cell(buf.getvalue(), "compression") == \
        f"{s['compression']:.2f}x"


def test_without_rich_the_tables_are_plain(smoke_run, monkeypatch):
    """rich is a core dependency; an install without it (--no-deps) still gets the tables."""
    _, s, rows = smoke_run
    _plain_env(monkeypatch)
    monkeypatch.setenv("FORCE_COLOR", "1")
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)  # `import rich` raises ImportError
    buf = io.StringIO()
    terminal.print_summary(s, rows, 25, "end", file=buf)
    out = buf.getvalue()
    assert "\x1b" not in out and _cell(out, "run dir") == s["run_dir"]
    assert _layer_line(out, rows[0]["layer"]) == _expected_layer(rows[0])


def test_many_layers_are_grouped(smoke_run):
    _, s, rows = smoke_run
    text = terminal.layer_table_text(rows, 1, "end", "/x/layer_report.csv")
    assert "2 layers > terminal.layer_table_max_rows=1" in text
    assert text.endswith("every layer: /x/layer_report.csv")
    params = sum(int(r["params"]) for r in rows)
    bpw = sum(float(r["storage_bits"]) for r in rows) / params  # storage over the group
    errs = [float(r["rel_error"]) for r in rows]
    line = _layer_line(text, "UniformQuantizer")
    assert line == ["UniformQuantizer", "4", "2", str(params), f"{bpw:.3f}",
                    f"{sum(errs) / 2:.4f} / {max(errs):.4f}"]
    assert terminal.layer_table_text(rows, 0) == ""  # 0: no per-layer table


# ------------------------------------------------------------------------- progress bar

def _bar(overrides, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    callbacks: list = []
    flag = terminal.add_progress_bar(cfg, callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False,
                          enable_progress_bar=flag, default_root_dir=str(tmp_path))
    return flag, trainer.progress_bar_callback


def test_progress_bar_switch(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import RichProgressBar

    _plain_env(monkeypatch)
    # default (trainer.enable_progress_bar=null): stdout is pytest's capture, not a TTY
    assert _bar([], tmp_path) == (False, None)
    flag, bar = _bar(["trainer.enable_progress_bar=true", "terminal.progress_refresh_rate=2",
                      "terminal.progress_leave=true"], tmp_path)
    assert flag and isinstance(bar, RichProgressBar)
    assert bar.refresh_rate == 2 and bar._leave is True
    assert _bar(["trainer.enable_progress_bar=false"], tmp_path) == (False, None)
    # null on a real terminal (a pseudo-terminal as stdout): a bar; TTY_INTERACTIVE=0: none
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        monkeypatch.setenv("TERM", "xterm")
        flag, bar = _bar([], tmp_path)
        assert flag and isinstance(bar, RichProgressBar) and bar.refresh_rate == 4
        monkeypatch.setenv("TTY_INTERACTIVE", "0")
        assert _bar([], tmp_path) == (False, None)
    os.close(master)


@pytest.mark.parametrize("override", ["terminal.progress_refresh_rate=0",
                                      "terminal.layer_table_max_rows=-1",
                                      "terminal.progress_leave=maybe"])
def test_bad_terminal_values_fail_early(override, tmp_path):
    from qtrain.config_schema import check

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        check(compose_cfg([override], tmp_path))


# ------------------------------------------------------------- logger out of run names

def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _value(v) -> str:
    return "false" if isinstance(v, bool) else "[x]" if isinstance(v, list) else "x"


@pytest.mark.parametrize("group", ["many", "wandb_offline"])
def test_every_logger_key_stays_out_of_run_names(group):
    """A job dir / wandb run name (Hydra's override_dirname) leaves out the logger choice and
    every key of its nodes: overriding all of them at once leaves only quant.bits."""
    node = OmegaConf.to_container(_compose([f"logger={group}"]).logger)
    ov = [f"logger.{name}.{k}={_value(v)}" for name, sub in node.items() for k, v in sub.items()
          if k != "_target_"]
    assert len(ov) >= 6, ov
    full = _compose([f"logger={group}", "quant.bits=3", *ov])
    assert full.hydra.job.override_dirname == "quant.bits-3", ov


# ------------------------------------------------------------ a real terminal, end to end

@pytest.mark.slow
def test_real_terminal_run_has_bar_and_rich_tables(tmp_path):
    """python train.py debug=smoke with a pseudo-terminal as stdout/stderr: the Rich
    progress bar draws, and the summary is a rich table with summary.json's numbers."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in RICH_ENV}
    env.update(TERM="xterm", COLUMNS="160", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    p = subprocess.Popen([sys.executable, "train.py", "debug=smoke",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=slave, stderr=slave,
                         stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=600) == 0
    os.close(master)
    raw = b"".join(chunks).decode("utf-8", "replace")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "\x1b[" in raw and re.search(r"Epoch 1/1 .*━", ANSI.sub("", raw))  # the bar drew
    text = ANSI.sub("", raw)
    line = next(ln for ln in text.splitlines() if "│ quantized acc (test) " in ln)
    assert f"{s['quant_metric']:.4f}" in line
    assert "┃ layer" in text
