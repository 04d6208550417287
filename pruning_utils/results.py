"""Where results go and how they are written: atomic CSV/JSON, keyed upserts, compact shapes, PNG plots.

Every write goes to a temporary file in the destination folder and is renamed into place, so an interrupted
notebook never leaves a half-written table for the next stage to read.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from .loading import PROJECT_ROOT

RESULTS_DIR = Path(os.environ.get("PRUNING_RESULTS_DIR", PROJECT_ROOT / "results"))


def ablation_dir() -> Path:
    """Return (and create) the folder of ablation-study results, `results/ablation_studies`."""
    folder = RESULTS_DIR / "ablation_studies"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)  # same folder, same filesystem: the rename is atomic
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _frame(df_or_rows) -> pd.DataFrame:
    return df_or_rows if isinstance(df_or_rows, pd.DataFrame) else pd.DataFrame(list(df_or_rows))


def write_csv(df_or_rows: pd.DataFrame | Iterable[dict], path: str | Path) -> Path:
    """Write a DataFrame or a list of row dicts to CSV atomically and return the path."""
    with _atomic_path(path) as tmp:
        _frame(df_or_rows).to_csv(tmp, index=False)
    return Path(path)


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays (a 0-d tolist() is a plain number)
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; convert it to a number, string, list or dict")


def write_json(obj, path: str | Path) -> Path:
    """Write an object as indented JSON atomically (numpy/torch scalars, sets and paths converted) and return the path."""
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return Path(path)


def _key_part(value) -> str:
    # A CSV round trip turns 3 into 3.0 (a column with gaps becomes float) and strings stay strings:
    # compare keys as normalised text so a re-run finds the rows it wrote earlier.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two notebooks upserting the same table at once would otherwise both read the old file and one
    # would lose the other's rows.
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; single writer assumed
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_rows(path: str | Path, rows: pd.DataFrame | Iterable[dict], key_cols: list[str]) -> pd.DataFrame:
    """Upsert rows into a CSV keyed by `key_cols` (rows with an existing key replace it) and return the whole table."""
    path = Path(path)
    new = _frame(rows)
    missing = [c for c in key_cols if c not in new.columns]
    if missing:
        raise KeyError(f"rows lack key column(s) {missing}; every row needs {list(key_cols)}")
    with _locked(path):
        if path.exists() and path.stat().st_size > 0:
            old = pd.read_csv(path)
            absent = [c for c in key_cols if c not in old.columns]
            if absent:
                raise KeyError(f"{path} has no column(s) {absent}; pick key_cols among {list(old.columns)} "
                               "or write to a new file")
            new_keys = {tuple(_key_part(v) for v in r) for r in new[key_cols].itertuples(index=False)}
            keep = [tuple(_key_part(v) for v in r) not in new_keys for r in old[key_cols].itertuples(index=False)]
            old = old[keep]
            table = pd.concat([old, new], ignore_index=True) if len(old) else new.reset_index(drop=True)
        else:
            table = new.reset_index(drop=True)
        write_csv(table, path)
    return table


def compact_shape(values: list[int]) -> str:
    """Return a run-length text of per-layer sizes: '9x30' when all 30 are 9, else e.g. '9x10,6x20'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ",".join(f"{v}x{n}" for v, n in runs)


def save_plot(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically, close it, and return the path."""
    import matplotlib.pyplot as plt

    # savefig renders PNG through Agg whatever backend the notebook runs, so no global backend switch is needed
    # (switching would break inline display in notebooks).
    try:
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
