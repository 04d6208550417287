"""How results are written: atomic CSV/JSON, compact shapes, PNG plots (folders live in `paths`).

Every write goes through `atomic.atomic_file` (a temporary file in the destination folder, flushed to disk and
renamed into place), so an interrupted notebook or a full disk never leaves a half-written table for the next stage
to read.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from pruning_utils.atomic import atomic_file, write_text_atomic

# every row says where it was measured: the repository's commit and the device (rows that were timed: load_avg too)
STAMP_COLUMNS = ("commit", "device")
# a short hash such as "0479e15" or "1234567" is a number to pandas: stamps are read as text
STAMP_DTYPE = {"commit": str, "git_commit": str}


def _frame(df_or_rows) -> pd.DataFrame:
    return df_or_rows if isinstance(df_or_rows, pd.DataFrame) else pd.DataFrame(list(df_or_rows))


def stamped(df_or_rows: pd.DataFrame | Iterable[dict], device: str | None = None) -> pd.DataFrame:
    """Return the rows with a `commit` column (this checkout's) and a `device` column (`device`, else the device
    torch computes on here by default) added where the rows do not carry them; columns they carry are kept as they
    are, so rows merged from an earlier run keep the commit they were measured at."""
    from pruning_utils.measure.metrics import device_name, git_commit

    frame = _frame(df_or_rows).copy()
    if "commit" not in frame.columns:
        frame["commit"] = git_commit()
    if "device" not in frame.columns:
        if device is None:
            import torch

            device = device_name("cuda" if torch.cuda.is_available() else "cpu")
        frame["device"] = device
    return frame


def write_csv(df_or_rows: pd.DataFrame | Iterable[dict], path: str | Path, device: str | None = None,
              stamp: bool = True) -> Path:
    """Write a DataFrame or a list of row dicts to CSV atomically, `stamped` with commit and device unless
    `stamp` is False, and return the path."""
    frame = stamped(df_or_rows, device) if stamp else _frame(df_or_rows)
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def unique_rows(df_or_rows: pd.DataFrame | Iterable[dict], key: Iterable[str]) -> pd.DataFrame:
    """Return the rows without those repeating an earlier row's `key` (the first is kept), naming what was dropped:
    e.g. a reconstruction sweep's 'none' row is the criteria sweep's row of the same criterion and rate."""
    frame = _frame(df_or_rows)
    key = list(key)
    repeated = frame[key].astype(str).duplicated()
    if repeated.any():
        names = frame.loc[repeated, "variant"].tolist() if "variant" in frame.columns else repeated[repeated].index
        print(f"dropped {int(repeated.sum())} row(s) measured twice under the same {', '.join(key)}: "
              f"{', '.join(map(str, names))}")
    return frame[~repeated].reset_index(drop=True)


def _key_text(value) -> str:
    """Return a key cell as text that matches across a CSV round trip: empty for a missing value (NaN never equals
    NaN), a number as its float (an int column with an empty cell comes back from the CSV as float: 448 is 448.0)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


def _key_texts(df: pd.DataFrame, key: list[str]) -> list[tuple[str, ...]]:
    return [tuple(_key_text(v) for v in row) for row in df[key].itertuples(index=False, name=None)]


def merge_rows(new: pd.DataFrame, path: str | Path, key: list[str], dtype: dict | None = None) -> pd.DataFrame:
    """Return the new rows, `stamped` (this checkout's commit and device where they carry none), plus the rows of the
    CSV at `path` whose `key` the new rows do not hold, sorted by `key` (a benchmark re-run of some configurations
    keeps the rows of the others, older rows without a key column too, each with the stamp it was written with).
    `dtype` reads columns of the CSV as given (e.g. {"stage": str}: "00" must not come back as 0 and miss its key)."""
    path = Path(path)
    new = stamped(new)  # after the merge the stamp columns exist, and `write_csv` would leave the new rows' empty
    if not path.exists():
        return new
    old = pd.read_csv(path, dtype={**STAMP_DTYPE, **(dtype or {})})
    absent = set(key) - set(old.columns)
    for col in absent:  # rows written before a key column existed: kept, never matched (not even an empty cell)
        old[col] = pd.NA
    measured = set(_key_texts(new, key))
    kept = old if absent else old[[k not in measured for k in _key_texts(old, key)]]
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


# ---------------------------------------------------------------------------------------------- table schemas


@dataclass
class TableSchema:
    """What a result table promises: `columns` name -> type ('text' | 'int' | 'float' | 'bool'; a trailing '?' lets
    it be empty), the `key` unique per row, the `timed` columns (a row holding one also holds `load_avg`), whether
    the table `merges_runs` (rows of several commits), and whether its rows are `variants` (params and provenance
    checked against the model each was derived from)."""

    columns: dict[str, str]
    key: tuple[str, ...]
    timed: tuple[str, ...] = ()
    merges_runs: bool = False
    variants: bool = False


# the token count a change's reference must have been measured on: like compared with like
_REFERENCE_TOKENS = {"ppl": "eval_tokens", "fidelity": "fidelity_tokens", "heldout": "heldout_tokens"}
_TYPES = ("text", "int", "float", "bool")


def _empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or (
        isinstance(value, str) and value.strip() == "")


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _type_ok(value, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str) or _number(value) is not None
    if kind == "bool":
        return isinstance(value, bool) or str(value) in ("True", "False")
    number = _number(value)
    if number is None or math.isnan(number):
        return False
    return kind == "float" or number == int(number)


def check_columns(df: pd.DataFrame, schema: TableSchema) -> list[str]:
    """Return the problems of `df`'s columns against `schema`: missing or undeclared columns, wrong types, empty
    cells where the column may not be empty."""
    bad = [f"unknown type '{t}' of column '{c}'; known: {', '.join(_TYPES)}" for c, t in schema.columns.items()
           if t.rstrip("?") not in _TYPES]
    missing = [c for c in schema.columns if c not in df.columns]
    extra = [c for c in df.columns if c not in schema.columns]
    bad += [f"missing column(s) {missing}"] if missing else []
    bad += [f"undeclared column(s) {extra}"] if extra else []
    for col, kind in schema.columns.items():
        if col not in df.columns or kind.rstrip("?") not in _TYPES:
            continue
        values = df[col].tolist()
        empty = [i for i, v in enumerate(values) if _empty(v)]
        if empty and not kind.endswith("?"):
            bad.append(f"column '{col}' is empty in row(s) {empty[:5]}")
        wrong = [i for i, v in enumerate(values) if not _empty(v) and not _type_ok(v, kind.rstrip("?"))]
        if wrong:
            bad.append(f"column '{col}' is not {kind.rstrip('?')} in row(s) {wrong[:5]} ({values[wrong[0]]!r})")
    return bad


def check_key(df: pd.DataFrame, key: Iterable[str]) -> list[str]:
    """Return a problem per `key` value held by more than one row."""
    key = [k for k in key if k in df.columns]
    dup = df[df[key].astype(str).duplicated(keep=False)]
    return [f"rows {list(g.index)} share the key {dict(zip(key, k if isinstance(k, tuple) else (k,)))}"
            for k, g in dup.groupby(key, dropna=False)] if len(dup) else []


def check_change_references(df: pd.DataFrame) -> list[str]:
    """Return the problems of every `<x>_change_pct` column: no `<x>_reference` column beside it, a change without
    its reference, or a reference '<row>@<tokens>' measured on another token count than the row."""
    bad = []
    for col in [c for c in df.columns if c.endswith("_change_pct")]:
        prefix = col[: -len("_change_pct")]
        ref = f"{prefix}_reference"
        if ref not in df.columns:
            bad.append(f"'{col}' does not say what it is relative to: no '{ref}' column")
            continue
        tokens = _REFERENCE_TOKENS.get(prefix)
        for i, (change, named) in enumerate(zip(df[col], df[ref])):
            if _empty(change):
                continue
            if _empty(named):
                bad.append(f"row {i}: '{col}' is {change} with no '{ref}'")
            elif tokens in df.columns and "@" in str(named):
                n = str(named).rsplit("@", 1)[1]
                if _number(n) != _number(df[tokens].iloc[i]):
                    bad.append(f"row {i}: '{col}' is against {named}, measured on {n} tokens, not this row's "
                               f"{df[tokens].iloc[i]} ({tokens})")
    return bad


def source_of(row: dict) -> str | None:
    """Return the name of the variant a row was derived from: its `base`, the name without an `_int8` / `_lora`
    suffix, else 'baseline' (None for the baseline itself)."""
    if not _empty(row.get("base")):
        return str(row["base"])
    name = str(row.get("variant", ""))
    for suffix in ("_int8", "_lora"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None if name == "baseline" else "baseline"


def _derived(row: dict) -> bool:
    return str(row.get("variant", "")).endswith(("_int8", "_lora")) or (
        not _empty(row.get("base")) and row.get("base") != "baseline")


def _sources(df: pd.DataFrame, sources: dict[str, dict] | None) -> dict[str, dict]:
    own = {} if "variant" not in df.columns else {
        r["variant"]: r for r in df.to_dict("records") if "base" not in df.columns or r.get("saved") is not False}
    return {**(sources or {}), **own}


def check_params(df: pd.DataFrame, sources: dict[str, dict] | None = None) -> list[str]:
    """Return the rows counting params_total below params_non_embedding, or above the model they were derived from
    (`source_of`, looked up in this table then in `sources`: name -> row; the non-zero count where the table
    records one), and INT8 rows that do not count what their source does."""
    bad, known = [], _sources(df, sources)
    for i, row in enumerate(df.to_dict("records")):
        total, non_emb = _number(row.get("params_total")), _number(row.get("params_non_embedding"))
        if total is None or non_emb is None or math.isnan(total):
            continue
        if total < non_emb:
            bad.append(f"row {i} ({row.get('variant')}): params_total {total:.0f} < params_non_embedding {non_emb:.0f}")
        src = known.get(source_of(row))
        if src is None or _number(src.get("params_total")) is None:
            continue
        nonzero = _number(row.get("nonzero_params_non_embedding"))
        stored = total - non_emb + nonzero if nonzero is not None and not math.isnan(nonzero) else total
        untied = _number(row.get("lm_head_rate_requested"))
        if untied is not None and untied > 0:  # a pruned LM head of a tied model is stored beside the full input
            if non_emb > _number(src["params_non_embedding"]):  # embedding: only the non-embedding count is bounded
                bad.append(f"row {i} ({row.get('variant')}): {non_emb:.0f} non-embedding parameters, more than its "
                           f"source {source_of(row)} ({_number(src['params_non_embedding']):.0f})")
        elif stored > _number(src["params_total"]):
            bad.append(f"row {i} ({row.get('variant')}): {stored:.0f} parameters, more than its source "
                       f"{source_of(row)} ({_number(src['params_total']):.0f})")
        if str(row.get("variant", "")).endswith("_int8") and total != _number(src["params_total"]):
            bad.append(f"row {i} ({row.get('variant')}): INT8 counts {total:.0f} parameters, its fp32 source "
                       f"{source_of(row)} {_number(src['params_total']):.0f}")
    return bad


def check_provenance(df: pd.DataFrame, sources: dict[str, dict] | None = None) -> list[str]:
    """Return the rows removing heads (MLP channels) with no rate requested, and derived rows (INT8, LoRA, built on
    a saved variant) whose requested rates are not their source's."""
    bad, known = [], _sources(df, sources)
    for i, row in enumerate(df.to_dict("records")):
        for part in ("head", "mlp"):
            removed, asked = _number(row.get(f"{part}_frac_removed")), _number(row.get(f"{part}_rate_requested"))
            if removed is not None and removed > 1e-9 and not (asked is not None and asked > 0):
                bad.append(f"row {i} ({row.get('variant')}): {part}_frac_removed {removed:.3f} with "
                           f"{part}_rate_requested {row.get(f'{part}_rate_requested')}")
            src = known.get(source_of(row))
            if _derived(row) and src is not None and _number(src.get(f"{part}_rate_requested")) != asked:
                bad.append(f"row {i} ({row.get('variant')}): {part}_rate_requested {asked} is not its source "
                           f"{source_of(row)}'s {src.get(f'{part}_rate_requested')}")
    return bad


def check_stamps(df: pd.DataFrame, timed: Iterable[str] = ()) -> list[str]:
    """Return the rows without a commit or a device, and the timed rows (a value in a `timed` column) without
    load_avg."""
    bad = [f"no '{c}' column: rows do not say where they were measured" for c in STAMP_COLUMNS if c not in df.columns]
    for col in [c for c in STAMP_COLUMNS if c in df.columns]:
        empty = [i for i, v in enumerate(df[col]) if _empty(v) or str(v) == "unknown"]
        bad += [f"'{col}' is empty in row(s) {empty[:5]}"] if empty else []
    timed = [c for c in timed if c in df.columns]
    if timed:
        rows = [i for i, r in enumerate(df[timed].to_dict("records")) if not all(_empty(v) for v in r.values())]
        if "load_avg" not in df.columns:
            bad += [f"timed rows {rows[:5]} ({', '.join(timed)}) without a 'load_avg' column"] if rows else []
        else:
            unloaded = [i for i in rows if _empty(df["load_avg"].iloc[i])]
            bad += [f"timed row(s) {unloaded[:5]} without load_avg"] if unloaded else []
    return bad


def check_one_commit(df: pd.DataFrame, merges_runs: bool = False) -> list[str]:
    """Return a problem when the rows come from several commits and the table does not declare it merges runs."""
    if merges_runs or "commit" not in df.columns:
        return []
    commits = sorted({str(c) for c in df["commit"] if not _empty(c)})
    return [f"rows from {len(commits)} commits {commits} in a table that does not merge runs"] if len(commits) > 1 \
        else []


def check_table(df: pd.DataFrame, schema: TableSchema, sources: dict[str, dict] | None = None) -> list[str]:
    """Return every problem of a result table (freshly written rows or a CSV read back) against its `schema`; empty
    when it keeps its promises. `sources` (name -> row, e.g. baseline.csv's) are the models variants may derive from."""
    bad = check_columns(df, schema) + check_key(df, schema.key) + check_change_references(df)
    if schema.variants:
        bad += check_params(df, sources) + check_provenance(df, sources)
    return bad + check_stamps(df, schema.timed) + check_one_commit(df, schema.merges_runs)
