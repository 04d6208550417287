"""Compare the quality columns of the result tables in the working tree with those committed at a git revision.

A change that should not move any figure (a refactor, a faster evaluation path) is checked by re-running the pipeline
and then: `python3 -m scripts.compare_results --rev HEAD` (exit 1 and a table of the columns that moved by more than
`--rtol` relative). Timing columns are not compared: they vary from run to run.
"""
from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# perplexities, fidelity, KL, semantic scores, retention, accuracy / F1, losses: what a refactor must not change
QUALITY = re.compile(r"(^|_)(ppl|kl|fidelity|semantic|retention|exact_match|first_sentence_match|accuracy|f1|"
                     r"task_metric|loss|damage_recovered)")


def quality_columns(df: pd.DataFrame) -> list[str]:
    """Return the numeric columns of a result table that hold quality figures."""
    return [c for c in df.columns if QUALITY.search(c) and pd.api.types.is_numeric_dtype(df[c])]


def compare_tables(old: pd.DataFrame, new: pd.DataFrame, rtol: float) -> list[dict]:
    """Return one record per quality column of `old`: the largest relative difference and whether it is within rtol.

    Rows are compared in order (each stage writes its rows in a fixed order); a table whose length changed gets one
    record saying so.
    """
    if len(old) != len(new):
        return [{"column": "<rows>", "max_rel_diff": float("inf"), "ok": False,
                 "note": f"{len(old)} rows committed, {len(new)} now"}]
    out = []
    for col in quality_columns(old):
        if col not in new.columns:
            out.append({"column": col, "max_rel_diff": float("inf"), "ok": False, "note": "column missing now"})
            continue
        a, b = old[col].to_numpy(float), pd.to_numeric(new[col], errors="coerce").to_numpy(float)
        both_nan = np.isnan(a) & np.isnan(b)
        rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-12)
        rel = np.where(both_nan, 0.0, rel)
        worst = float(np.nanmax(np.where(np.isnan(rel), np.inf, rel))) if len(rel) else 0.0
        out.append({"column": col, "max_rel_diff": worst, "ok": worst <= rtol, "note": ""})
    return out


def committed_csv(rev: str, rel: str) -> pd.DataFrame | None:
    """Return the CSV at `rel` as committed at `rev`, or None when it did not exist there."""
    res = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, text=True)
    return pd.read_csv(io.StringIO(res.stdout)) if res.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    """Print the comparison of every committed result CSV with the working tree's; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rev", default="HEAD", help="the git revision whose committed results are the reference")
    ap.add_argument("--rtol", type=float, default=1e-6, help="largest relative difference accepted")
    ap.add_argument("--folder", default="results", help="folder of result CSVs, relative to the repository root")
    args = ap.parse_args(argv)
    rows = []
    for path in sorted((ROOT / args.folder).rglob("*.csv")):
        rel = str(path.relative_to(ROOT))
        old = committed_csv(args.rev, rel)
        if old is None:
            continue
        for rec in compare_tables(old, pd.read_csv(path), args.rtol):
            rows.append({"file": rel, **rec})
    table = pd.DataFrame(rows, columns=["file", "column", "max_rel_diff", "ok", "note"])
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table.to_string(index=False))
    bad = table[~table["ok"]]
    print(f"\n{len(table) - len(bad)} of {len(table)} quality columns within rtol={args.rtol:g} of {args.rev}")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
