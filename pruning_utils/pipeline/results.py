"""How results are written: atomic CSV/JSON, compact shapes, PNG plots (folders live in `paths`).

Every write goes through `atomic.atomic_file` (a temporary file in the destination folder, flushed to disk and
renamed into place), so an interrupted notebook or a full disk never leaves a half-written table for the next stage
to read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from pruning_utils.atomic import atomic_file, write_text_atomic


def _frame(df_or_rows) -> pd.DataFrame:
    return df_or_rows if isinstance(df_or_rows, pd.DataFrame) else pd.DataFrame(list(df_or_rows))


def write_csv(df_or_rows: pd.DataFrame | Iterable[dict], path: str | Path) -> Path:
    """Write a DataFrame or a list of row dicts to CSV atomically and return the path."""
    with atomic_file(path) as tmp:
        _frame(df_or_rows).to_csv(tmp, index=False)
    return Path(path)


def merge_rows(new: pd.DataFrame, path: str | Path, key: list[str]) -> pd.DataFrame:
    """Return the new rows plus the rows of the CSV at `path` whose `key` the new rows do not hold, sorted by `key`
    (a benchmark re-run of some configurations keeps the rows of the others, older rows without a key column too)."""
    path = Path(path)
    if not path.exists():
        return new
    old = pd.read_csv(path)
    for col in set(key) - set(old.columns):  # rows written before a key column existed: kept, never matched
        old[col] = pd.NA
    measured = set(map(tuple, new[key].astype(str).values))
    kept = old[[tuple(k) not in measured for k in old[key].astype(str).values]]
    return pd.concat([kept, new], ignore_index=True).sort_values(key, kind="stable", ignore_index=True)


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays (a 0-d tolist() is a plain number)
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON; convert it to a number, string, list or dict")


def write_json(obj, path: str | Path) -> Path:
    """Write an object as indented JSON atomically (numpy/torch scalars, sets and paths converted)
    and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def save_plot(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically, close it, and return the path."""
    import matplotlib.pyplot as plt

    # savefig renders PNG through Agg whatever backend the notebook runs, so no global backend switch is needed
    # (switching would break inline display in notebooks).
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
