"""Progress bars: widgets in Jupyter, a few plain lines per loop in papermill runs (PRUNING_PROGRESS=log)."""
from __future__ import annotations

import os


def progress(iterable=None, total: int | None = None, desc: str = "", **kw):
    """Return a tqdm bar over `iterable`: tqdm.auto normally, a sparse plain-text bar when PRUNING_PROGRESS=log."""
    kw.setdefault("leave", False)
    if os.environ.get("PRUNING_PROGRESS") == "log":
        from tqdm.std import tqdm

        kw.setdefault("mininterval", 60.0)
        return tqdm(iterable, total=total, desc=desc, ncols=100, **kw)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, **kw)
