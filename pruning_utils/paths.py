"""Where the project keeps its checkpoints and results: one place, overridable by environment variables.

`PRUNING_PROJECT_ROOT`, `PRUNING_MODELS_DIR` and `PRUNING_RESULTS_DIR` are read once, at import. Code that
needs a folder calls `models_dir()` / `results_dir()` at call time (not the constants at import time), so a
test that points `paths.MODELS_DIR` elsewhere redirects every reader at once.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(os.environ.get("PRUNING_PROJECT_ROOT") or Path(__file__).resolve().parent.parent)
MODELS_DIR = Path(os.environ.get("PRUNING_MODELS_DIR") or PROJECT_ROOT / "models")
RESULTS_DIR = Path(os.environ.get("PRUNING_RESULTS_DIR") or PROJECT_ROOT / "results")


def models_dir() -> Path:
    """Return the folder of checkpoints passed between stages (`models/`, or `PRUNING_MODELS_DIR`)."""
    return MODELS_DIR


def results_dir() -> Path:
    """Return the folder of result tables and plots (`results/`, or `PRUNING_RESULTS_DIR`)."""
    return RESULTS_DIR


def ablation_dir() -> Path:
    """Return (and create) the folder of ablation-study results, `results/ablation_studies`."""
    folder = results_dir() / "ablation_studies"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
