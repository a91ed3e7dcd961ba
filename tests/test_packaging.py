"""pyproject's explicit package list holds every package of the source tree (a package left
out works in an editable checkout and is missing from a wheel)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("qtrain", "hydra_plugins") for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add to [tool.setuptools] packages"
