"""Compose the real Hydra config in-process and run it through qtrain.run.train."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def compose_cfg(overrides: list[str], output_dir: str | Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(full):
        full.hydra.runtime.output_dir = str(output_dir)
        full.hydra.job.override_dirname = "test"
    HydraConfig.instance().set_config(full)
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    with open_dict(cfg):
        cfg.recipe_name = full.hydra.runtime.choices.get("recipe")
    return cfg


def run(overrides: list[str], output_dir: str | Path) -> dict:
    from qtrain.run import train

    return train(compose_cfg(overrides, output_dir))
