"""logger=wandb_offline writes real wandb run files without an account or network."""

import os

import pytest

from tests.hydra_helpers import run


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(["debug=smoke", "logger=wandb_offline", "logger.wandb.name=test"], tmp_path)
    import wandb

    wandb.finish()
    runs = [d for d in (tmp_path / "wandb").iterdir() if d.name.startswith("offline-run-")]
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(f.endswith(".wandb") for f in files), files
    assert os.path.getsize(next(runs[0].glob("*.wandb"))) > 0
