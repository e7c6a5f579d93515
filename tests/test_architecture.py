"""docs/ARCHITECTURE.md and the tree agree: every module of nas/ has its row, every import obeys
the page's layer table (and every allowance there is used), and the page's import graph is the
one the code has."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE = ROOT / "nas"
HEAVY = {"torch": "torch", "lightning": "Lightning", "optuna": "Optuna"}
COMMANDS = {"nas.cli", "nas.confirm", "nas", "nas.__main__"}
SUBPACKAGES = ("model", "training", "hf", "search", "reading")


def layer_of(module: str) -> str:
    """The layer of a dotted module name under nas (the table's `where` column, as code)."""
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    return parts[1] if parts[1] in SUBPACKAGES else "core"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for each import of a file; `from nas.x import y`
    counts as nas.x.y where that is a module, else nas.x."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    # an `if TYPE_CHECKING:` block runs never: annotations only
    checking = {id(n) for node in tree.body if isinstance(node, ast.If)
                and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    known = modules()
    found = []
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; nas imports are absolute"
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def layer_table() -> dict[str, dict[str, set[str]]]:
    """The page's layer table: layer -> {top, inside, never} (sets of names)."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("layer", "---"):
            continue
        names = [{w.strip() for w in cell.split(",") if w.strip() not in ("", "-")}
                 for cell in cells[2:]]
        table[cells[0]] = {"top": names[0], "inside": names[1], "never": names[2]}
    return table


def actual_edges() -> tuple[dict[tuple[str, str], bool], dict[str, set[tuple[str, bool]]]]:
    """(layer, layer) -> whether some import of it is at module level; and per layer the
    heavy packages it imports with the level."""
    edges: dict[tuple[str, str], bool] = {}
    heavy: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for module, path in modules().items():
        src = layer_of(module)
        for name, at_top in imports(path):
            root = name.split(".")[0]
            if root == "nas" and name != "nas":
                dst = layer_of(name)
                if dst != src:
                    edges[(src, dst)] = edges.get((src, dst), False) or at_top
            elif root in HEAVY:
                heavy[src].add((HEAVY[root], at_top))
    return edges, heavy


def graph() -> str:
    """The import graph as the page shows it, one line per layer."""
    edges, _ = actual_edges()
    lines = []
    for layer in layer_table():
        top = sorted(dst for (src, dst), at_top in edges.items() if src == layer and at_top)
        inside = sorted(dst for (src, dst), at_top in edges.items()
                        if src == layer and not at_top)
        line = f"{layer:<9} -> {', '.join(top) or 'nothing in nas'}"
        lines.append(line + (f"   (inside functions: {', '.join(inside)})" if inside else ""))
    return "\n".join(lines)


def test_every_module_has_its_row_and_every_row_a_module():
    text = PAGE.read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(nas/[\w/]+\.py)` \|", text, flags=re.M))
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
             if not p.name.startswith("__")}
    assert not files - rows, f"modules without a row in {PAGE.name}: {sorted(files - rows)}"
    assert not rows - files, f"rows for modules that do not exist: {sorted(rows - files)}"


def test_the_layers_are_the_tree():
    table = layer_table()
    assert set(table) == {"core", "commands", *SUBPACKAGES}
    for package in SUBPACKAGES:
        assert (PACKAGE / package / "__init__.py").is_file()


def test_every_import_is_one_the_layer_table_allows():
    table, (edges, heavy) = layer_table(), actual_edges()
    wrong = [f"{src} imports {dst}" + ("" if at_top else " inside a function")
             for (src, dst), at_top in edges.items()
             if dst not in table[src]["top"] | (set() if at_top else table[src]["inside"])]
    assert not wrong, wrong
    for layer, packages in heavy.items():
        for package, at_top in packages:
            never = table[layer]["never"]
            assert package not in never, f"{layer} imports {package}"
            assert not (at_top and f"{package} at module level" in never), (
                f"{layer} imports {package} at module level")


def test_every_allowance_of_the_layer_table_is_used():
    # a stale allowance is a false statement about the tree
    table, (edges, _) = layer_table(), actual_edges()
    for layer, allowed in table.items():
        for dst in allowed["top"]:
            assert edges.get((layer, dst)), f"{layer} may import {dst} but none does"
        for dst in allowed["inside"]:
            assert (layer, dst) in edges, f"{layer} may import {dst} inside a function, none does"


def test_the_page_shows_the_import_graph_the_code_has():
    text = PAGE.read_text(encoding="utf-8")
    block = re.search(r"```text\n(.*?)\n```", text.split("## Layers", 1)[1], flags=re.S)
    assert block, "no ```text block of the import graph under ## Layers"
    assert block.group(1) == graph(), f"the page's graph is stale; it is now:\n{graph()}"


@pytest.mark.parametrize("side", ["search", "reading", "core"])
def test_a_side_without_torch_loads_without_it(side):
    """What the table says, run: importing every module of the side loads no torch."""
    import subprocess
    import sys

    names = sorted(m for m in modules() if layer_of(m) == side)
    code = (f"import sys, importlib\nfor m in {names!r}: importlib.import_module(m)\n"
            "heavy = [k for k in ('torch', 'lightning') if k in sys.modules]\n"
            "sys.exit(f'{heavy} loaded' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
