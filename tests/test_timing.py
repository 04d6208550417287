"""A run's profile (stage_steps.csv), the estimate before it and the planned-vs-actual summary after it."""
import csv
import io
import json
import math

from pruning_utils import progress
from pruning_utils.pipeline import timing


def _notebook(path, cells):
    path.write_text(json.dumps({"cells": cells}))
    return path


def test_step_rows_name_cells_by_their_heading_and_keep_the_loops(tmp_path, monkeypatch):
    nb = _notebook(tmp_path / "02.ipynb", [
        {"cell_type": "code", "source": "HEAD_RATE = 0.2", "metadata": {"tags": ["parameters"],
                                                                       "papermill": {"duration": 0.1}}},
        {"cell_type": "markdown", "source": "## Criteria side by side\ntext", "metadata": {}},
        {"cell_type": "code", "source": "# a comment\nrows = sweep()", "metadata": {"papermill": {"duration": 12.5}}},
        {"cell_type": "code", "source": "table", "metadata": {"papermill": {"duration": 0.25}}},
    ])
    loops = tmp_path / "02.loops.jsonl"
    monkeypatch.setenv(progress.LOOPS_ENV, str(loops))
    quiet = io.StringIO()
    for _ in progress.progress(range(3), desc="heads sweep", file=quiet):
        pass
    for _ in progress.progress(range(3), desc="hidden", disable=True):  # no count, no time: not recorded
        pass
    bar = progress.progress(total=2, desc="manual", file=quiet)
    bar.update(2)
    bar.close()
    bar.close()  # closed twice: recorded once
    rows = timing.step_rows("02", nb, loops, "abc1234")
    cells = [r for r in rows if r["kind"] == "cell"]
    assert [(r["step"], r["seconds"]) for r in cells] == [("Criteria side by side", 12.5),
                                                         ("Criteria side by side", 0.25)]
    assert [(r["step"], r["items"]) for r in rows if r["kind"] == "loop"] == [("heads sweep", 3), ("manual", 2)]
    assert all(r["commit"] == "abc1234" for r in rows)


def test_no_profile_file_no_recording(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.LOOPS_ENV, raising=False)
    for _ in progress.progress(range(2), file=io.StringIO()):
        pass
    assert not list(tmp_path.iterdir())


def test_stage_steps_replace_one_stage_and_keep_the_others(tmp_path):
    path = tmp_path / "stage_steps.csv"
    row = dict(kind="cell", index=1, step="s", seconds=1.0, items="", unit="", commit="c")
    timing.write_stage_steps(path, "00", [dict(row, stage="00")])
    timing.write_stage_steps(path, "02", [dict(row, stage="02")])
    timing.write_stage_steps(path, "00", [dict(row, stage="00", seconds=2.0), dict(row, stage="00", index=2)])
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["seconds"]) for r in rows] == [("02", "1.0"), ("00", "2.0"), ("00", "1.0")]
    assert list(rows[0]) == timing.STEP_COLUMNS


def test_estimate_scales_the_recorded_run_by_the_machine_speed(tmp_path):
    table = tmp_path / "run_time.csv"
    table.write_text("stage,notebook,minutes,profile,commit,speed_s\ninstall,x,0.2,default,c,\n"
                     "00,a,10.0,default,c,0.500\n02,b,4.0,default,c,0.500\ntotal,,14.2,default,,\n")
    recorded, speed = timing.recorded_minutes(table)
    assert recorded == {"00": 10.0, "02": 4.0} and speed == 0.5
    planned = timing.estimate(recorded, speed, 1.0, ["00", "02", "03"])  # this machine is twice as slow
    assert planned["00"] == 20.0 and planned["02"] == 8.0 and math.isnan(planned["03"])
    assert "total about 28 min" in timing.estimate_text(planned, 1.0, speed)
    assert timing.estimate(recorded, float("nan"), 1.0, ["00"]) == {"00": 10.0}  # no probe: as recorded
    assert timing.remaining_text(planned, ["00"]) == "about 8.0 min left"
    summary = timing.summary_text(planned, [{"stage": "00", "status": "ran", "seconds": 1260.0},
                                            {"stage": "02", "status": "skipped", "seconds": 0.0}])
    assert summary.splitlines()[1].split() == ["00", "20.0", "21.0"]
    assert summary.splitlines()[-1].split() == ["total", "20.0", "21.0"]
    assert "no recorded run" in timing.estimate_text({"00": float("nan")}, 1.0, 1.0)


def test_speed_probe_measures_a_positive_time_or_says_nan():
    speed = timing.machine_speed_s()
    assert speed > 0
    assert math.isnan(timing.machine_speed_s(python="/nonexistent/python"))
