"""Progress bars: widgets in Jupyter, a few plain lines per loop in papermill runs (`PRUNING_PROGRESS=log`).

The stage runner sets `PRUNING_PROGRESS=log` for its kernels: a widget or a bar redrawn ten times a second would
otherwise be stored, frame by frame, in every executed notebook.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

LOOPS_ENV = "PRUNING_STEPS_FILE"  # the stage runner's profile: one JSON line per finished bar is appended here
LOG_INTERVAL_S = 60.0  # log mode: at most one line a minute per bar, plus its first and last


def log_mode() -> bool:
    """Return True when bars should be plain, rarely refreshed stderr lines (`PRUNING_PROGRESS=log`)."""
    return os.environ.get("PRUNING_PROGRESS", "").strip().lower() == "log"


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw):
    """Return a tqdm bar over `iterable` (or a manual one of `total` steps) suited to where the code runs; when the
    stage runner asks for a profile (`PRUNING_STEPS_FILE`), the bar's count and seconds are recorded as it closes."""
    return _recorded(_bar(iterable, total, desc, **kw))


def _recorded(bar):
    if not os.environ.get(LOOPS_ENV) or bar.disable:  # a disabled bar keeps no count or time
        return bar
    close = bar.close

    def close_and_record() -> None:  # tqdm closes a bar once its loop ends (or on an explicit close)
        if not getattr(bar, "_pruning_recorded", False):
            bar._pruning_recorded = True
            record_loop(bar.desc, bar.n, bar.unit, bar.format_dict.get("elapsed", 0.0))
        close()

    bar.close = close_and_record
    return bar


def _bar(iterable, total, desc, **kw):
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


def record_loop(desc: str, n: int, unit: str, seconds: float) -> None:
    """Append one finished loop (its bar's name, count, unit and seconds) to `PRUNING_STEPS_FILE`, when set."""
    target = os.environ.get(LOOPS_ENV)
    if not target:
        return
    line = json.dumps({"desc": str(desc or "").rstrip(": "), "n": int(n), "unit": unit, "seconds": seconds})
    with open(target, "a", encoding="utf-8") as f:  # one short line per append: whole lines on every platform
        f.write(line + "\n")
