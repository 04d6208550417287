"""The package's architecture as a test: which wing may import which, no import cycle, no borrowed private names,
and module paths spelled in the adapters only."""
import ast
import re
from pathlib import Path

import pytest

import pruning_utils

PACKAGE = Path(pruning_utils.__file__).resolve().parent
ROOT = PACKAGE.parent
LEAVES = ("atomic", "paths", "progress", "serialization")  # top-level modules importing nothing of the package

# wing -> the wings it may import (leaves are allowed everywhere); a wing may always import its own modules.
# Read from the bottom up: model and data are the base, prune builds on them, measure on prune, the add-on wings on
# those, and pipeline (the papermill runner, memory plans, result tables) on everything.
LAYERS: dict[str, set[str]] = {
    "model": set(),
    "data": set(),
    "prune": {"model", "data"},
    "measure": {"prune", "model", "data"},
    "recovery": {"measure", "prune", "model", "data"},
    "compress": {"measure", "prune", "model", "data"},
    "adaptive": {"compress", "measure", "prune", "model", "data"},
    "encoder": {"compress", "measure", "prune", "model", "data"},
    "pipeline": {"adaptive", "encoder", "recovery", "compress", "measure", "prune", "model", "data"},
}
# pipeline/ runs before anything is installed (run_all.sh checks the command line first): these stay stdlib-only
STDLIB_ONLY = ("pipeline/__init__.py", "pipeline/profiles.py", "pipeline/stages.py", "pipeline/timing.py", "paths.py",
               "atomic.py", "progress.py")
STDLIB_PACKAGE_MODULES = ("pruning_utils.pipeline.profiles", "pruning_utils.pipeline.timing", "pruning_utils.paths",
                          "pruning_utils.atomic", "pruning_utils.progress")


def module_name(path: Path) -> str:
    """Return the dotted name of a file of the package, e.g. `model.arch` (a leaf: `paths`)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, importer: str) -> str | None:
    """Return the absolute module an ImportFrom names, relative to the package, or None for outside modules."""
    if node.level:
        base = importer.split(".")[: -node.level] if node.level else []
        return ".".join([*base, *([node.module] if node.module else [])])
    if node.module and node.module.split(".")[0] == "pruning_utils":
        return node.module.partition(".")[2]
    return None


def imports_of(path: Path, importer: str = "") -> list[tuple[str, list[str]]]:
    """Return (package module, imported names) for every import of the package in a file, inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(node, importer)
            if mod is not None:
                out.append((mod, [a.name for a in node.names]))
            elif node.module and node.module.split(".")[0] in ("benchmarks", "scripts"):
                out.append(("!" + node.module, []))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pruning_utils":
                    out.append((a.name.partition(".")[2], []))
                elif a.name.split(".")[0] in ("benchmarks", "scripts"):
                    out.append(("!" + a.name, []))
    return out


def package_files() -> dict[str, Path]:
    """Return dotted module name -> file for every module of the package."""
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Return module -> modules of the package it imports (`from pruning_utils.x import y`: y when y is a module)."""
    files = files if files is not None else package_files()
    graph = {}
    for mod, path in files.items():
        targets = set()
        for target, names in imports_of(path, mod):
            if target.startswith("!"):
                continue
            subs = {f"{target}.{n}" if target else n for n in names} & files.keys()
            targets |= subs or ({target} & files.keys())
        graph[mod] = targets - {mod}
    return graph


def wing(module: str) -> str:
    """Return the wing of a dotted module name (a leaf is its own wing)."""
    return module.split(".")[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Return 'a -> b' for every import that the layer table does not allow."""
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            ws, wd = wing(src), wing(dst)
            if ws == wd or wd in LEAVES or wd == "":
                continue
            if ws in LEAVES or ws == "" or wd not in LAYERS.get(ws, set()):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def private_imports(files: dict[str, Path]) -> list[str]:
    """Return 'importer: module.name' for every underscore name imported from another module."""
    return sorted(f"{mod}: {target}.{n}" for mod, path in files.items()
                  for target, names in imports_of(path, mod) for n in names
                  if n.startswith("_") and n != "__version__")


def test_the_rules_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_violations({"model.arch": {"prune.obs"}, "prune.obs": {"model.arch", "paths"}}) == [
        "model.arch -> prune.obs"]
    assert layer_violations({"paths": {"model.arch"}}) == ["paths -> model.arch"]
    f = tmp_path / "m.py"
    f.write_text("from .x import y\ndef f():\n    from pruning_utils.model import arch, _z\n"
                 "    import pruning_utils.v\n"
                 "from pruning_utils.u.w import _t\nimport os\nfrom benchmarks.quality import PEERS\n")
    found = imports_of(f, "prune.m")
    assert ("prune.x", ["y"]) in found and ("model", ["arch", "_z"]) in found and ("v", []) in found
    assert ("!benchmarks.quality", []) in found
    assert private_imports({"prune.m": f}) == ["prune.m: model._z", "prune.m: u.w._t"]


def test_the_tree_shows_the_wings():
    files = package_files()
    assert {wing(m) for m in files if "." in m} == set(LAYERS), "every wing is a folder, every folder a wing"
    top = sorted(m for m, p in files.items() if "." not in m and p.name != "__init__.py")
    assert top == sorted(LEAVES), f"only the leaves stay at the top of pruning_utils/: {top}"


def test_wings_import_only_what_the_layer_table_allows():
    graph = import_graph()
    assert "model.checkpoint" in graph["model.loading"]  # the graph is really read
    bad = layer_violations(graph)
    assert not bad, f"imports against the layer table in tests/test_imports.py: {bad}"


def test_checkpoint_imports_no_compression_algorithm():
    graph = import_graph()
    for mod in ("model.checkpoint", "encoder.checkpoint"):
        assert not {t for t in graph[mod] if wing(t) == "compress"}, mod


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle {' -> '.join(cycle)}: move the shared piece into a module both can import"


def test_no_private_name_is_imported_from_another_module():
    files = package_files()
    extra = {f"{d}:{p.stem}": p for d in ("tests", "benchmarks", "scripts") for p in (ROOT / d).glob("*.py")}
    bad = private_imports(files | extra)
    assert not bad, f"underscore names imported across modules (make them public or move them to their user): {bad}"


def test_the_package_imports_no_repository_script_folder():
    bad = [f"{mod}: {t[1:]}" for mod, path in package_files().items() for t, _ in imports_of(path, mod)
           if t.startswith("!")]
    assert not bad, f"the installed package must not import benchmarks/ or scripts/: {bad}"


@pytest.mark.parametrize("rel", STDLIB_ONLY)
def test_the_command_line_check_needs_only_the_standard_library(rel):
    import sys

    third_party = []
    for node in ast.parse((PACKAGE / rel).read_text()).body:  # module level: a function may import lazily
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
        for n in names:
            top = n.split(".")[0]
            if top != "pruning_utils" and top not in sys.stdlib_module_names and top != "__future__":
                third_party.append(n)
            if top == "pruning_utils" and n not in STDLIB_PACKAGE_MODULES:
                third_party.append(n)
    assert not third_party, f"{rel} imports {third_party}: run_all.sh reads it before anything is installed"


def test_module_paths_are_spelled_in_the_adapters_only():
    # every module reaches projections through arch.proj / attention / mlp, so a new family is a table row
    spelled = re.compile(r"\.self_attn\b|\.mlp\.\w+_proj|\.(input|post_attention)_layernorm\b")
    files = [p for d in ("pruning_utils", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.name != "arch.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert not offenders, f"module paths outside the adapters (model/arch.py, encoder/arch.py): {offenders}"
