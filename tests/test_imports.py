"""The package's import graph has no cycle, and module paths are spelled in the adapter only."""
import ast
import re
from pathlib import Path

import pruning_utils

PACKAGE = Path(pruning_utils.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    """Return the pruning_utils modules a file imports anywhere in its body (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.x` or `from . import x`
                base = node.module
            elif node.module and node.module.split(".")[0] == "pruning_utils":
                base = node.module.split(".", 1)[1] if "." in node.module else None
            else:
                continue
            if base:
                out.add(base.split(".")[0])
            else:  # `from . import a, b` / `from pruning_utils import a`: the names are modules
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pruning_utils."))
    return out


def import_graph() -> dict[str, set[str]]:
    """Return module -> modules of pruning_utils it imports."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: _imported_modules(PACKAGE / f"{m}.py") & modules - {m} for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
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


def test_cycle_finder_sees_function_level_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    f = tmp_path / "m.py"
    f.write_text("from .x import y\ndef f():\n    from . import z, w\n    import pruning_utils.v\n"
                 "from pruning_utils.u import t\nimport os\n")
    assert _imported_modules(f) == {"x", "z", "w", "v", "u"}


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert graph["loading"] >= {"checkpoint", "paths"}  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle {' -> '.join(cycle)}: move the shared piece into a module both can import"


def test_module_paths_are_spelled_in_the_adapter_only():
    # every module reaches projections through arch.proj / arch.attention / arch.mlp, so a new family is a table row
    spelled = re.compile(r"\.self_attn\b|\.mlp\.\w+_proj|\.(input|post_attention)_layernorm\b")
    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("pruning_utils", "benchmarks", "scripts") for p in (root / d).rglob("*.py")]
    offenders = [f"{p.relative_to(root)}:{i}" for p in files if p.name != "arch.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert not offenders, f"module paths outside pruning_utils/arch.py: {offenders}"
