"""Where the project keeps its checkpoints and results (one place, overridable by environment variables), and the
one way a folder there is replaced (`atomic_folder`).

`PRUNING_PROJECT_ROOT`, `PRUNING_MODELS_DIR` and `PRUNING_RESULTS_DIR` are read once, at import. Code that
needs a folder calls `models_dir()` / `results_dir()` at call time (not the constants at import time), so a
test that points `paths.MODELS_DIR` elsewhere redirects every reader at once.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    A reader never sees a half-written folder under the name: the new folder is complete before it is renamed
    into place, and the previous one (if any) is moved aside first and deleted only after the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
