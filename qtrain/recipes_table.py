"""Build recipes/README.md's table from the recipe headers (the single source of truth).

    python -m qtrain.recipes_table            # rewrite the table in recipes/README.md
    python -m qtrain.recipes_table --check    # exit 1 if the table is stale (used by tests)

Per recipe: name, method (the header's first description line), dataset and model (from its
``override /data`` and ``/model`` entries), the paper's result (``# Paper:`` paragraph) and
ours (``# Measured:`` paragraph).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- recipes-table:begin -->", "<!-- recipes-table:end -->"


KEY = re.compile(r"^(Paper|Measured|Schedule|Simplified)\b[^:]{0,120}?:")


def _paragraph(lines: list[str], key: str) -> str:
    """The header paragraph that starts with ``key`` (e.g. ``Paper (...): text``)."""
    out, on = [], False
    for ln in lines:
        m = KEY.match(ln)
        if m and m.group(1) == key:
            on, ln = True, ln if "(" in ln[: m.end()] else ln[m.end():]
        elif on and (m or not ln):
            break
        if on:
            out.append(ln.strip())
    return " ".join(out).strip()


def parse(path: Path) -> dict:
    text = path.read_text()
    head = [ln[1:].strip() if ln.startswith("#") else "" for ln in text.split("defaults:")[0].splitlines()]
    head = [ln for ln in head if not ln.startswith("@package")]
    desc = [ln for ln in head if ln and not ln.startswith("python ")]
    pick = {g: (re.search(rf"override /{g}: (\S+)", text) or [None, "-"])[1] for g in ("data", "model")}
    return {
        "name": path.stem,
        "method": desc[0] if desc else "",
        "data": pick["data"], "model": pick["model"],
        "paper": _paragraph(head, "Paper"),
        "measured": _paragraph(head, "Measured"),
    }


def table() -> str:
    rows = ["| recipe | method | data / model | paper's result | measured (ours) |",
            "|---|---|---|---|---|"]
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        r = parse(p)
        cells = [f"`{r['name']}`", r["method"], f"{r['data']} / {r['model']}", r["paper"], r["measured"]]
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


def render(readme: str) -> str:
    a, b = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:a] + "\n" + table() + "\n" + readme[b:]


def main(argv: list[str]) -> int:
    path = ROOT / "recipes" / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print("recipes/README.md is stale: run python -m qtrain.recipes_table", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
