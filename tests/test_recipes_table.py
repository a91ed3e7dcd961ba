"""recipes/README.md's table is generated from the recipe headers and must be current."""

from qtrain.recipes_table import ROOT, main, parse


def test_table_is_current():
    assert main(["--check"]) == 0, "run: python -m qtrain.recipes_table"


def test_every_recipe_states_paper_and_measured():
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        r = parse(p)
        assert r["paper"] and r["measured"] and r["method"], p.name
