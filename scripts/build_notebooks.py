"""Writes notebooks/*.ipynb from their sources in notebooks/src/ (run after editing; the notebooks are committed).

A notebook's source is `notebooks/src/<stem>.py` in jupytext's percent format (`# %%` code cells, `# %% [markdown]`
cells): real Python that ruff lints. After its first cell (the title) this script splices in the `parameters` cell,
generated from `pruning_utils/pipeline/profiles.py` (the default profile, only the names the notebook reads, so a
notebook opened by hand runs the default recipe: edit defaults there, never here), then the shared cells that `SHARED`
names, each from `notebooks/src/shared_<name>.py`.
Usage: python3 scripts/build_notebooks.py [--out DIR]   (needs the project installed: pip install -e .)
"""
import argparse
from pathlib import Path

import jupytext
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

try:
    from pruning_utils.pipeline.profiles import NOTEBOOK_PARAMS, PARAMS
except ModuleNotFoundError as err:  # scripts leave the import path alone: the package is installed editable
    raise SystemExit(f"{err}: install the project first (pip install -e . or bash scripts/install.sh)") from err

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "notebooks" / "src"

# Papermill injects its parameters right after the cell tagged `parameters`, wherever that cell is; the parameters
# cell stays the first code cell (a notebook reads as recipe first) and the bootstrap, which reads no parameter, comes
# next, so it runs after the injected values and before any import of pruning_utils. The memory plan reads a
# decoder's config (MODEL): the encoder notebook has none. SHARED: the shared cells of each notebook, in order,
# between its parameters cell and its own cells (set-up: seed, OUT; settings: PLOTS, MEMORY, LATENCY, SELFGEN).
_DECODER = ("bootstrap", "memory_plan", "setup", "settings")
SHARED = {
    "00-setup-01-baseline-and-importance": _DECODER,
    "02_head_pruning": _DECODER + ("sweep_setup",),
    "03_mlp_pruning": _DECODER + ("sweep_setup",),
    "03b_compression_methods": _DECODER,
    "04_recovery_lora": _DECODER,
    "05_adaptive_runtime": ("bootstrap", "memory_plan", "setup"),
    "06_final_eval": _DECODER,
    "07_encoder_glue": ("bootstrap",),
}
# The memory plan's stage is the notebook's first two characters (03b plans as 03); these are the memory parameters
# its call names, so the notebook visibly reads them (profiles.NOTEBOOK_PARAMS lists them too).
MEMORY_NAMES = {"00": ("DEVICE", "DTYPE", "OFFLOAD"), "02": ("DEVICE", "DTYPE", "OFFLOAD", "GRAMS", "VARIANT_BUILD"),
                "03": ("DEVICE", "DTYPE", "OFFLOAD", "GRAMS", "VARIANT_BUILD"), "04": ("DEVICE", "DTYPE", "OFFLOAD"),
                "06": ("DEVICE", "DTYPE", "OFFLOAD")}
STAGE_PLACEHOLDER = '"STAGE", globals()'  # in shared_memory_plan.py


def source_cells(path: Path) -> list[nbformat.NotebookNode]:
    """Return the cells of a percent-format source file."""
    return jupytext.read(path, fmt="py:percent").cells


def parameters_source(names: tuple[str, ...]) -> str:
    """Return a parameters cell: one `NAME = default  # meaning` line per name, from profiles.PARAMS."""
    lines = ["# generated from pruning_utils/pipeline/profiles.py (default profile); "
             "run_all.sh --profile/-p inject others"]
    for name in names:
        assign = f"{name} = {PARAMS[name].default!r}"
        lines.append(f"{assign:<31}  # {PARAMS[name].help}")
    return "\n".join(lines)


def shared_cells(stem: str, name: str) -> list[nbformat.NotebookNode]:
    """Return the cells of notebooks/src/shared_<name>.py; the memory plan gets the stage key of notebook `stem`."""
    cells = source_cells(SRC / f"shared_{name}.py")
    if name == "memory_plan":
        (cell,) = cells
        if STAGE_PLACEHOLDER not in cell.source:
            raise ValueError(f"notebooks/src/shared_memory_plan.py must call memory_plan.choose(MODEL, "
                             f"{STAGE_PLACEHOLDER}): the stage key replaces the placeholder")
        names = "".join(f", {n}={n}" for n in MEMORY_NAMES.get(stem[:2], ()))
        cell.source = cell.source.replace(STAGE_PLACEHOLDER, f'"{stem[:2]}", globals(){names}')
    return cells


def notebook(name: str) -> nbformat.NotebookNode:
    """Return the notebook `name`: title, generated parameters cell, shared cells, then the rest of its source."""
    stem = name.removesuffix(".ipynb")
    title, *own = source_cells(SRC / f"{stem}.py")
    assert title.cell_type == "markdown", f"notebooks/src/{stem}.py must begin with its title (a markdown cell)"
    parameters = new_code_cell(parameters_source(NOTEBOOK_PARAMS[name]))
    parameters.metadata["tags"] = ["parameters"]
    cells = [title, parameters] + [c for shared in SHARED[stem] for c in shared_cells(stem, shared)] + own
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(cells):
        new = cell if cell is parameters else (
            new_markdown_cell(cell.source) if cell.cell_type == "markdown" else new_code_cell(cell.source))
        new.id = f"cell-{i:02d}"  # stable ids: a rebuild without edits leaves the files (and stage stamps) unchanged
        nb.cells.append(new)
    return nb


def write_notebooks(out_dir: Path) -> list[Path]:
    """Write every notebook into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NOTEBOOK_PARAMS:
        nbformat.write(notebook(name), out_dir / name)
        paths.append(out_dir / name)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "notebooks", help="folder to write into (default: notebooks/)")
    for path in write_notebooks(ap.parse_args().out):
        print("wrote", path)
