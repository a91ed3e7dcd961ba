"""Every config group option and every recipe composes; recipes carry their header."""

import re

import pytest
from omegaconf import OmegaConf

from tests.hydra_helpers import CONF, RECIPES, ROOT, compose_cfg

GROUPS = ["data", "model", "task", "optimizer", "scheduler", "trainer", "logger", "callbacks",
          "quant", "debug"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    if group == "debug":  # a global package: it sets keys of other groups
        assert cfg.data.fake is True and cfg.model.tiny is True
    else:
        assert cfg[group] is not None


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_resolves(recipe, tmp_path):
    cfg = compose_cfg([f"recipe={recipe}", "debug=smoke"], tmp_path)
    # every interpolation resolves except the run-time dataset info
    OmegaConf.to_container(cfg.trainer, resolve=True)
    assert cfg.recipe_name == recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header(recipe):
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    head = text.split("defaults:")[0]
    assert re.search(rf"python train\.py .*recipe={recipe}\b", head), "header lacks its command"
    assert "Paper" in head and "Measured" in head


def test_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg(["hydra/launcher=slurm"], tmp_path)
    assert cfg.seed == 0


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(Exception, match="nonexistent_key"):
        compose_cfg(["nonexistent_key.sub=1"], tmp_path)
