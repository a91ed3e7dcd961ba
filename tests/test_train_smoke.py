"""Every recipe runs end to end in smoke mode (in-process, real Trainer/Hydra/loaders)."""

import json

import pytest

from tests.hydra_helpers import RECIPES, run


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe, tmp_path):
    s = run([f"recipe={recipe}", "debug=smoke"], tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["recipe"] == recipe
    assert s["quant_mb"] > 0 and s["fp32_mb"] > 0
    assert (tmp_path / "config_resolved.yaml").exists()
    assert not (tmp_path / "FAILED").exists()
