"""Every recipe runs end to end in smoke mode (in-process, real Trainer/Hydra/loaders)."""

import json

import pytest

from tests.hydra_helpers import RECIPES, run

# Drawing the per-layer report's PNGs (matplotlib: layer_report*.png, weight_histograms*.png)
# is about half of a smoke run's CPU on the bigger models (ResNet-50: 10.4 s vs 5.7 s CPU with
# png=false). Each quantization method's PNGs are drawn in the smoke run of one of its recipes
# (the cheapest); the recipes below reuse a method drawn there and run with
# callbacks.layer_report.png=false -- their report is still built (rows, CSV, histogram
# samples, logger calls), only not rasterized. recipe -> the recipe that draws that method.
PNG_DRAWN_BY = {
    "abc_resnet20_cifar10": "abc_m3n3_digits",
    "apprentice_resnet18_imagenet": "qat_int4_digits",
    "apprentice_resnet20_cifar10": "qat_int4_digits",
    "deep_compression_lenet5_mnist": "deep_compression_lenet300_mnist",
    "hawq_v2_resnet50_imagenet": "hawq_resnet20_cifar10",
    "inq_resnet18_imagenet": "inq_resnet20_cifar10",
    "ipq_resnet50_imagenet": "ipq_roberta",
    "merolla_distortions_lenet300_mnist": "merolla_distortions_digits",
    "qat_int4_resnet18_imagenet": "qat_int4_digits",
    "qat_int8_resnet20_cifar10": "intqat_int8_digits",
    "qbert_minilm_sst2": "qbert_sst2",
    "quant_noise_int8_lm_wikitext103": "quant_noise_int4_roberta",
    "quant_noise_ipq_minilm_sst2": "quant_noise_ipq_lm_ptb",
    "quant_noise_lm_wikitext103": "quant_noise_ipq_lm_ptb",
    "quant_noise_roberta": "quant_noise_ipq_lm_ptb",
    "s2fp8_training_resnet20_cifar10": "s2fp8_training_digits",
    "stochastic_rounding_fixed16_resnet20_cifar10": "gupta_fixed16_mnist_fc",
    "twn_resnet20_cifar10": "twn_lenet5_mnist",
    "xnor_resnet20_cifar10": "bwn_lenet5_mnist",
}


def test_png_drawing_recipes_exist():
    assert set(PNG_DRAWN_BY) <= set(RECIPES)
    assert set(PNG_DRAWN_BY.values()) <= set(RECIPES) - set(PNG_DRAWN_BY)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe, tmp_path):
    png = [] if recipe not in PNG_DRAWN_BY else ["callbacks.layer_report.png=false"]
    s = run([f"recipe={recipe}", "debug=smoke", *png], tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["recipe"] == recipe
    assert s["quant_mb"] > 0 and s["fp32_mb"] > 0
    assert (tmp_path / "config_resolved.yaml").exists()
    assert not (tmp_path / "FAILED").exists()
    if recipe in PNG_DRAWN_BY:  # the report is built, only not drawn
        assert (tmp_path / "layer_report.csv").exists()
        assert not (tmp_path / "layer_report.png").exists()
    elif recipe in PNG_DRAWN_BY.values():  # drawn here for the recipes that skip it
        assert (tmp_path / "layer_report.png").exists()
        assert (tmp_path / "weight_histograms.png").exists()
