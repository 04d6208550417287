"""Progress bars: widgets in Jupyter, a few plain lines per loop in papermill runs (`PRUNING_PROGRESS=log`).

The stage runner sets `PRUNING_PROGRESS=log` for its kernels: a widget or a bar redrawn ten times a second would
otherwise be stored, frame by frame, in every executed notebook.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

LOG_INTERVAL_S = 60.0  # log mode: at most one line a minute per bar, plus its first and last


def log_mode() -> bool:
    """Return True when bars should be plain, rarely refreshed stderr lines (`PRUNING_PROGRESS=log`)."""
    return os.environ.get("PRUNING_PROGRESS", "").strip().lower() == "log"


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw):
    """Return a tqdm bar over `iterable` (or a manual one of `total` steps) suited to where the code runs."""
    if log_mode():
        from tqdm.std import tqdm

        interval = float(os.environ.get("PRUNING_PROGRESS_INTERVAL", LOG_INTERVAL_S))
        kw.setdefault("file", sys.stderr)
        kw.setdefault("mininterval", interval)
        kw.setdefault("maxinterval", max(interval, 10.0))  # tqdm's default (10 s) would undercut a long mininterval
        kw.setdefault("ncols", 100)
        kw.setdefault("ascii", True)
        kw["leave"] = True  # leave=False erases the final line with a run of spaces: keep the summary instead
        return tqdm(iterable, total=total, desc=desc, **kw)
    from tqdm.auto import tqdm  # widgets in Jupyter when ipywidgets is installed, text in a terminal

    return tqdm(iterable, total=total, desc=desc, **kw)
