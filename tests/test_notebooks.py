"""The committed notebooks are what scripts/build_notebooks.py makes of notebooks/src and
pruning_utils/pipeline/profiles.py (no drift of code or defaults), and their code stays a report: short, no functions,
linted."""
import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from pruning_utils.pipeline.profiles import DEFAULTS, NOTEBOOK_PARAMS, PARAMS
from pruning_utils.pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "notebooks" / "src"
NOTEBOOKS = sorted(NOTEBOOK_PARAMS)
MAX_OWN_LINES = 60  # STYLE.md habit 7: parameters, calls, tables and plots only


def _build_module():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "scripts" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged `parameters` (papermill injects after it)"
    return tagged[0]


def _own_code_lines(name: str) -> list[str]:
    """Return the code lines of a notebook's own source (not blank, not comments): what its src file adds to the
    generated parameters cell and the shared cells."""
    cells = jupytext.read(SRC / name.replace(".ipynb", ".py"), fmt="py:percent").cells
    return [line for c in cells if c.cell_type == "code" for line in c.source.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_every_stage_notebook_is_declared_and_committed():
    assert sorted(s.notebook for s in STAGES) == NOTEBOOKS
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    build = _build_module()
    assert sorted(f"{p.stem}.ipynb" for p in SRC.glob("*.py") if not p.name.startswith("shared_")) == NOTEBOOKS
    used = {f"shared_{shared}.py" for names in build.SHARED.values() for shared in names}
    assert sorted(p.name for p in SRC.glob("shared_*.py")) == sorted(used), "a shared cell file no notebook uses"
    for names in NOTEBOOK_PARAMS.values():
        assert set(names) <= set(PARAMS) and len(set(names)) == len(names)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_is_the_default_profile(name):
    nb = _read(name)
    cell = _parameters_cell(nb)
    assert cell is [c for c in nb.cells if c.cell_type == "code"][0], "the parameters cell must be the first code cell"
    values = {}
    for stmt in ast.parse(cell.source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{name}: the parameters cell holds only `NAME = literal` lines, got {ast.unparse(stmt)!r}")
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    assert list(values) == list(NOTEBOOK_PARAMS[name]), f"{name}: parameter names differ from profiles.NOTEBOOK_PARAMS"
    for key, value in values.items():
        assert value == DEFAULTS[key] and type(value) is type(DEFAULTS[key]), (
            f"{name}: {key} = {value!r}, the default profile says {DEFAULTS[key]!r}; rebuild the notebooks")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_declared_parameters_are_the_ones_the_code_reads(name):
    nb = _read(name)
    params_cell = _parameters_cell(nb)
    read = {n.id for c in nb.cells if c.cell_type == "code" and c is not params_cell
            for n in ast.walk(ast.parse(c.source)) if isinstance(n, ast.Name)}
    declared = set(NOTEBOOK_PARAMS[name]) - {"PROFILE"}  # PROFILE only labels the executed notebook
    assert read & set(PARAMS) == declared, f"{name}: reads {sorted(read & set(PARAMS))}, declares {sorted(declared)}"


def test_committed_notebooks_are_what_the_build_script_writes(tmp_path):
    for path in _build_module().write_notebooks(tmp_path):
        built, committed = nbformat.read(path, as_version=4), _read(path.name)
        fix = f"notebooks/{path.name} differs from what scripts/build_notebooks.py writes; run it and commit the result"
        assert len(built.cells) == len(committed.cells), fix
        for new, old in zip(built.cells, committed.cells):
            assert (new.id, new.cell_type, new.metadata, new.source) == (old.id, old.cell_type, old.metadata,
                                                                         old.source), f"{fix} (cell {old.id})"
        assert built.metadata == committed.metadata, fix
        assert path.read_bytes() == (ROOT / "notebooks" / path.name).read_bytes(), fix


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_short_and_define_no_functions(name):
    own = _own_code_lines(name)
    assert len(own) <= MAX_OWN_LINES, (
        f"notebooks/src/{name[:-6]}.py holds {len(own)} code lines (at most {MAX_OWN_LINES}): move logic into "
        "pruning_utils as a tested function and call it")
    for cell in (c for c in _read(name).cells if c.cell_type == "code"):
        for node in ast.walk(ast.parse(cell.source)):
            defines = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or (
                isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda))
            assert not defines, (f"{name} (cell {cell.id}) defines {ast.unparse(node)[:60]!r}: notebooks define no "
                                 "functions or classes; put it in pruning_utils with a test")


def test_ruff_passes_on_the_notebook_sources_and_the_assembled_notebooks():
    pytest.importorskip("ruff")
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--quiet"]
    sources = subprocess.run(ruff + ["notebooks/src", "scripts/build_notebooks.py"], cwd=ROOT, capture_output=True,
                             text=True)
    assert sources.returncode == 0, sources.stdout + sources.stderr
    # the sources may read names defined elsewhere (F821 is off there); every assembled notebook defines what it reads
    notebooks = subprocess.run(ruff + ["--select", "F"] + [f"notebooks/{n}" for n in NOTEBOOKS], cwd=ROOT,
                               capture_output=True, text=True)
    assert notebooks.returncode == 0, notebooks.stdout + notebooks.stderr


def test_notebooks_import_the_installed_package():
    sources = [(ROOT / "scripts" / "build_notebooks.py").read_text()]
    sources += [c.source for name in NOTEBOOKS for c in _read(name).cells if c.cell_type == "code"]
    edits = re.compile(r"sys\.path|PYTHONPATH")  # spelled as a pattern, so the repository-wide grep stays empty
    assert not any(edits.search(s) for s in sources), "notebooks and scripts must import the installed package"


def test_bootstrap_cell_does_nothing_when_the_package_imports(monkeypatch):
    bootstrap = _read(NOTEBOOKS[0]).cells[2]
    assert "find_spec(\"pruning_utils\")" in bootstrap.source
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"bootstrap ran {a}"))
    namespace: dict = {}
    exec(bootstrap.source, namespace)  # pruning_utils is importable here, as under run_all.sh
    assert namespace["REPO_URL"].endswith(".git")
    assert all(c.cells[2].source == bootstrap.source for c in map(_read, NOTEBOOKS))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_declared_parameter(name):
    from papermill.inspection import _infer_parameters  # what papermill checks passed names against
    from papermill.iorw import load_notebook_node

    inferred = [p.name for p in _infer_parameters(load_notebook_node(str(ROOT / "notebooks" / name)))]
    assert inferred == list(NOTEBOOK_PARAMS[name]), f"{name}: papermill cannot parse some parameter lines"
