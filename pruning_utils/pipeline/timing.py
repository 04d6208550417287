"""Where a run's time goes and how long the next one will take (standard library only: run_all.sh imports it
before anything is installed).

- `stage_steps.csv`: one row per notebook cell (`kind` cell, named by the heading above it) and per progress-bar
  loop (`kind` loop, named by its bar, with the items it counted) of every stage that ran: the profile of a run.
  Loops nest inside cells (a perplexity bar inside the sweep's cell), so only the cells add up to the stage.
- The estimate: the minutes `run_time.csv` recorded per stage, scaled by this machine's speed against the speed
  recorded with them (`speed_s`: seconds of a fixed matrix-multiply workload, measured in a child process).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

from pruning_utils.atomic import write_text_atomic

STEPS_FILE = "stage_steps.csv"
STEP_COLUMNS = ["stage", "kind", "index", "step", "seconds", "items", "unit", "load_avg", "device", "commit"]

# fp32 matrix products shaped like a small decoder's MLP on 512 tokens: what the stages spend their time on
_SPEED_PROBE = """
import time, torch
a, b = torch.randn(512, 576), torch.randn(576, 1536)
for _ in range(20): a @ b
t = time.perf_counter()
for _ in range(400): a @ b
print(time.perf_counter() - t)
"""


def machine_speed_s(python: str = sys.executable, timeout: float = 60.0) -> float:
    """Return the seconds this machine takes for the fixed probe workload (NaN when it cannot be measured)."""
    try:
        out = subprocess.run([python, "-c", _SPEED_PROBE], capture_output=True, text=True, timeout=timeout)
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return float("nan")


def machine_name() -> str:
    """Return the machine a run is timed on, e.g. 'AMD EPYC (2 cores)' or 'Tesla T4 x2 (4 cores)' (GPUs: nvidia-smi)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.split("\n")
        gpus = [g.strip() for g in gpus if g.strip()]
    except (OSError, subprocess.SubprocessError):
        gpus = []
    where = f"{gpus[0]} x{len(gpus)}" if len(gpus) > 1 else gpus[0] if gpus else cpu
    return f"{where.replace(',', ' ')} ({os.cpu_count()} cores)"  # no comma: run_time.csv is plain comma-separated


def recorded_minutes(run_time_csv: Path) -> tuple[dict[str, float], float]:
    """Return `({stage: minutes}, speed_s)` of the run `run_time.csv` recorded ({} and NaN without one)."""
    if not run_time_csv.exists():
        return {}, float("nan")
    with run_time_csv.open(encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.DictReader(f) if r.get("stage") not in (None, "total", "install")]
    minutes = {r["stage"]: float(r["minutes"]) for r in rows if _number(r.get("minutes"))}
    speeds = [float(r["speed_s"]) for r in rows if _number(r.get("speed_s"))]
    return minutes, (speeds[0] if speeds else float("nan"))


def estimate(recorded: dict[str, float], recorded_speed: float, speed: float, stages: list[str]) -> dict[str, float]:
    """Return the expected minutes of each of `stages` (NaN where none was recorded), scaled by speed / recorded."""
    scale = speed / recorded_speed if _finite(speed) and _finite(recorded_speed) and recorded_speed > 0 else 1.0
    return {k: recorded.get(k, float("nan")) * scale for k in stages}


def estimate_text(planned: dict[str, float], speed: float, recorded_speed: float) -> str:
    """Return the lines run_all.sh prints before the first stage."""
    known = [m for m in planned.values() if _finite(m)]
    if not known:
        return "estimate: no recorded run yet (run_time.csv); this run records one"
    scale = (f"this machine's speed probe {speed:.2f} s vs {recorded_speed:.2f} s recorded"
             if _finite(speed) and _finite(recorded_speed) else
             "the recorded run has no speed probe: its minutes as they are" if _finite(speed) else
             "no speed probe here: the recorded minutes as they are")
    parts = ", ".join(f"{k} {m:.1f}" if _finite(m) else f"{k} ?" for k, m in planned.items())
    return f"estimate ({scale}): {parts} min; total about {sum(known):.0f} min"


def remaining_text(planned: dict[str, float], done: list[str]) -> str:
    """Return 'about N min left' from the planned minutes of the stages not yet done."""
    if not any(_finite(m) for m in planned.values()):
        return "no estimate of the rest (no recorded run)"
    left = [m for k, m in planned.items() if k not in done and _finite(m)]
    return f"about {sum(left):.1f} min left" if left else "last stage done"


def summary_text(planned: dict[str, float], records: list[dict]) -> str:
    """Return the planned-vs-actual table printed at the end of a run."""
    lines = ["stage    planned  actual  (minutes)"]
    for r in records:
        if r["status"] != "ran":
            continue
        p = planned.get(r["stage"], float("nan"))
        lines.append(f"{r['stage']:<8} {p:7.1f} {r['seconds'] / 60:7.1f}" if _finite(p)
                     else f"{r['stage']:<8} {'?':>7} {r['seconds'] / 60:7.1f}")
    ran = [r for r in records if r["status"] == "ran"]
    p_total = sum(planned.get(r["stage"], 0.0) for r in ran if _finite(planned.get(r["stage"], float("nan"))))
    lines.append(f"{'total':<8} {p_total:7.1f} {sum(r['seconds'] for r in ran) / 60:7.1f}")
    return "\n".join(lines)


def load_avg() -> float:
    """Return the 5-minute load average (NaN where the platform has none): how busy the machine was over a stage."""
    try:
        return round(os.getloadavg()[1], 2)
    except (AttributeError, OSError):
        return float("nan")


def step_rows(stage: str, executed_notebook: Path, loops_file: Path | None, commit: str,
              load: float = float("nan"), device: str = "") -> list[dict]:
    """Return the profile rows of one stage: its executed notebook's cell durations (papermill's metadata) and the
    progress-bar loops its kernel recorded in `loops_file`, stamped with the stage's `load` and `device`."""
    stamp = dict(load_avg=load, device=device, commit=commit)
    rows = []
    nb = json.loads(executed_notebook.read_text(encoding="utf-8")) if executed_notebook.exists() else {}
    heading, index = "", 0
    for cell in nb.get("cells", []):
        source = "".join(cell.get("source", ""))
        if cell.get("cell_type") == "markdown":
            titles = [line.lstrip("#").strip() for line in source.splitlines() if line.startswith("#")]
            heading = titles[0] if titles else heading
            continue
        if cell.get("cell_type") != "code" or "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        seconds = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
        if seconds is None:
            continue
        index += 1
        first = next((ln.strip() for ln in source.splitlines() if ln.strip() and not ln.startswith("#")), "")
        rows.append(dict(stage=stage, kind="cell", index=index, step=heading or first[:60], seconds=round(seconds, 2),
                         items="", unit="", **stamp))
    if loops_file is not None and loops_file.exists():
        for i, line in enumerate(loops_file.read_text(encoding="utf-8").splitlines(), 1):
            try:
                loop = json.loads(line)
            except json.JSONDecodeError:  # a kernel killed mid-line: the rest of the profile still counts
                continue
            rows.append(dict(stage=stage, kind="loop", index=i, step=loop.get("desc", ""),
                             seconds=round(float(loop.get("seconds", 0.0)), 2), items=loop.get("n", ""),
                             unit=loop.get("unit", ""), **stamp))
    return rows


def write_stage_steps(path: Path, stage: str, rows: list[dict]) -> Path:
    """Write `rows` as stage `stage`'s profile in `path`, keeping the other stages' rows (stage order kept)."""
    kept = []
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as f:
            kept = [r for r in csv.DictReader(f) if r.get("stage") != stage]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=STEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: r.get(c, "") for c in STEP_COLUMNS} for r in kept + rows])
    return write_text_atomic(path, out.getvalue())


def _number(text) -> bool:
    try:
        return _finite(float(text))
    except (TypeError, ValueError):
        return False


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
