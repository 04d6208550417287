"""A notebook stage's measured peak host memory next to its memory plan (for `benchmarks/kaggle_rehearsal.py`).

When the environment variable `PRUNING_MEMORY_LOG` names a file, the first `memory_plan.choose` of a process (every
stage's first cell) calls `record`: it writes the kernel's resident memory at that moment (imports done, no model
loaded yet) and the plan the stage runs with, then rewrites the file every `INTERVAL_S` seconds and at exit with the
process's peak resident memory since that moment (`metrics.process_peak_rss_bytes`: VmHWM, reset when recording
starts and kept across the resets of `metrics.track_peak_memory`) and `peak_at`, the time of the first sample that
saw it (within `INTERVAL_S`: which cell set the peak). `measured_gb` = peak - start: what the stage
added, the figure its plan estimates (the plan counts weights, statistics, activations and optimizer states, not
the interpreter and its imports). Without the variable nothing is recorded and nothing runs in the background.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path

from pruning_utils.atomic import write_text_atomic

ENV = "PRUNING_MEMORY_LOG"
INTERVAL_S = 1.0
GB = 2 ** 30
_recording: dict = {}  # the file this process records into, once started


def plan_fields(settings) -> dict:
    """Return what the record keeps of a stage's `StageSettings`: its plan's totals, parts and settings."""
    plan = settings.plan
    return dict(stage=settings.stage, plan_device=plan.device, plan_dtype=plan.dtype, plan_gb=plan.total_gb,
                plan_reserve_gb=plan.reserve_gb, plan_host_gb=plan.host_gb, plan_peak_operation=plan.peak_operation,
                plan_fits=plan.fits, offload=settings.offload, grams=settings.grams, build=settings.build,
                parts=plan.parts)


def snapshot(start_bytes: int, fields: dict) -> dict:
    """Return the record now: `fields`, the start and the peak resident memory in GiB and what the stage added."""
    from pruning_utils.measure.metrics import process_peak_rss_bytes, rss_bytes

    peak = max(process_peak_rss_bytes() or 0, rss_bytes() or 0, start_bytes)
    return dict(fields, start_gb=start_bytes / GB, peak_gb=peak / GB, measured_gb=(peak - start_bytes) / GB,
                pid=os.getpid(), written_at=time.time())


def record(settings, path: str | os.PathLike | None = None) -> Path | None:
    """Start recording this process's peak memory against `settings`' plan into `path` (default: $PRUNING_MEMORY_LOG);
    return the path, or None when no file is named. Only the first call of a process records (its start is the
    stage's start); later calls return the same path."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    if _recording:
        return _recording["path"]
    from pruning_utils.measure.metrics import restart_process_peak, rss_bytes

    restart_process_peak()  # what the interpreter's start and its imports peaked at is not the stage's
    start = rss_bytes()
    if start is None:
        raise RuntimeError(f"{ENV} is set, but this system has no /proc/self/statm to read the resident memory from: "
                           "the rehearsal measures memory on Linux only; unset it")
    path = Path(path)
    fields = plan_fields(settings)
    _recording.update(path=path, start=start)

    seen = {"peak_gb": 0.0, "peak_at": None}

    def write() -> None:
        now = snapshot(start, fields)
        if now["peak_gb"] > seen["peak_gb"] + 1 / 1024:  # the peak rose since the last sample (by > 1 MiB)
            seen.update(peak_gb=now["peak_gb"], peak_at=now["written_at"])
        write_text_atomic(path, json.dumps(dict(now, peak_at=seen["peak_at"]), indent=1, default=str))

    def loop(stop: threading.Event) -> None:
        while not stop.wait(INTERVAL_S):
            write()

    write()
    stop = threading.Event()
    threading.Thread(target=loop, args=(stop,), daemon=True, name="stage-memory").start()
    atexit.register(lambda: (stop.set(), write()))
    return path
