"""A stage's peak host memory as the Kaggle rehearsal records it (pruning_utils/pipeline/stage_memory.py,
benchmarks/kaggle_rehearsal.py): the peak survives the per-block resets of `track_peak_memory`, `choose` records
only under PRUNING_MEMORY_LOG, and the rehearsal's rows and command lines say what was compared."""
import gc
import json

import pandas as pd
import pytest
import torch

from benchmarks import kaggle_rehearsal
from pruning_utils.measure import metrics
from pruning_utils.pipeline import memory_plan, results, stage_memory
from pruning_utils.pipeline.profiles import PROFILES

MB = 2 ** 20
SLACK = 8 * MB  # the kernel's RSS counters are per-CPU sums read without flushing: marks and RSS differ by pages
pytestmark = pytest.mark.skipif(metrics.rss_bytes() is None, reason="needs Linux /proc to read resident memory")


@pytest.fixture
def fresh_recorder(monkeypatch):
    monkeypatch.setattr(stage_memory, "_recording", {})
    monkeypatch.setattr(stage_memory, "INTERVAL_S", 0.05)
    yield


def _touch(n_bytes: int) -> torch.Tensor:
    t = torch.empty(n_bytes // 4, dtype=torch.float32)
    t.fill_(1.0)  # resident only once written
    return t


def test_process_peak_keeps_what_came_before_a_reset():
    before = metrics.process_peak_rss_bytes()
    big = _touch(256 * MB)
    held = metrics.rss_bytes()  # resident with the 256 MiB (other memory may come and go around it)
    del big
    with metrics.track_peak_memory("cpu"):  # resets VmHWM: the 256 MiB peak is no longer the kernel's mark
        pass
    assert metrics._peak_rss_bytes() < metrics.process_peak_rss_bytes()  # the reset took the kernel's mark down
    assert metrics.process_peak_rss_bytes() >= max(before, held - SLACK)


def test_choose_records_nothing_without_the_variable(tmp_path, monkeypatch, fresh_recorder):
    monkeypatch.delenv(stage_memory.ENV, raising=False)
    memory_plan.choose("tiny-llama", "00", dict(PROFILES["smoke"], DEVICE="cpu"))
    assert stage_memory._recording == {} and list(tmp_path.iterdir()) == []


def test_choose_records_the_plan_and_what_the_stage_adds(tmp_path, monkeypatch, fresh_recorder):
    log = tmp_path / "00.json"
    monkeypatch.setenv(stage_memory.ENV, str(log))
    gc.collect()  # garbage of earlier tests freed now, not between the start and the allocation below
    run = memory_plan.choose("tiny-llama", "00", dict(PROFILES["smoke"], DEVICE="cpu"))
    first = json.loads(log.read_text())
    assert first["stage"] == "00" and first["plan_gb"] == pytest.approx(run.plan.total_gb)
    assert first["plan_device"] == "cpu" and first["parts"] and first["measured_gb"] < 0.05
    held = _touch(300 * MB)
    resident = metrics.rss_bytes()  # with the 300 MiB held, just before the reset
    with metrics.track_peak_memory("cpu"):
        pass
    del held
    memory_plan.choose("tiny-llama", "02", dict(PROFILES["smoke"], DEVICE="cpu"))  # later calls do not restart it
    record = stage_memory.snapshot(stage_memory._recording["start"], stage_memory.plan_fields(run))
    # what was resident before the reset counts (other memory may have come and gone since the start: RSS, not the
    # size of the allocation, is the reference; a CI run saw garbage of earlier tests freed during the allocation)
    assert record["stage"] == "00" and record["peak_gb"] * 2 ** 30 >= resident - SLACK
    assert record["peak_gb"] == pytest.approx(record["start_gb"] + record["measured_gb"])


def test_rehearsal_cuts_keep_the_profile_shapes_and_the_criteria_that_set_peaks():
    profile = PROFILES["kaggle-qwen2.5-3b"]
    cut = kaggle_rehearsal.cuts(profile)
    assert cut["CRITERIA"] == "fluctuation"  # the main criteria; semantic's ablations only cost time
    assert "taylor" in kaggle_rehearsal.cuts(PROFILES["default"])["CRITERIA"].split(",")  # a backward's own peak
    # a full batch of evaluation windows: the perplexity peak the plan sizes
    assert cut["EVAL_MAX_TOKENS"] == memory_plan.PARAMS["eval_batch"] * profile["EVAL_SEQ_LEN"]
    assert cut["SWEEP_EVAL_MAX_TOKENS"] == profile["EVAL_SEQ_LEN"]
    assert not {"EVAL_SEQ_LEN", "CALIB_SEQ_LEN", "RECOVERY_BATCH", "RECOVERY_SEQ_LEN", "GRAMS", "LATENCY_SEQ_LEN",
                "GRAD_CHECKPOINTING", "HEAD_RATE", "MLP_RATE"} & set(cut)
    cmd = kaggle_rehearsal.stage_command("kaggle-qwen2.5-3b", "04", "shape:qwen2.5-3b", "bfloat16", cut)
    pairs = dict(zip(cmd[cmd.index("-p") + 1::3], cmd[cmd.index("-p") + 2::3]))
    assert pairs["MODEL"] == "shape:qwen2.5-3b" and pairs["DEVICE"] == "cpu" and pairs["DTYPE"] == "bfloat16"
    assert pairs["PEAK_MEMORY"] == "false" and pairs["ZERO_SHOT"] == "false"  # the runner's spelling of booleans
    assert cmd[cmd.index("--only") + 1] == "04" and "--force" in cmd


def test_rehearsal_row_compares_the_plan_without_its_reserve():
    record = dict(stage="04", plan_gb=11.0, plan_reserve_gb=1.0, plan_peak_operation="lora_step", grams="all",
                  offload=False, start_gb=0.5, peak_gb=10.9, measured_gb=10.4)
    row = kaggle_rehearsal.row_of(record, "shape:qwen2.5-3b", "kaggle-qwen2.5-3b", "bfloat16", 3.0,
                                  {"device_gb": 13.2, "fits": True})
    assert row["plan_gb"] == 10.0 and row["ratio"] == pytest.approx(1.04)
    assert row["t4_plan_gb"] == 13.2 and row["t4_fits"] is True and row["commit"] and row["device"]
    assert set(row) == set(kaggle_rehearsal.COLUMNS)


def test_shape_specs_plan_without_weights():
    config = memory_plan.config_of("shape:qwen2.5-3b")
    assert config["hidden_size"] == 2048 and config["num_hidden_layers"] == 36 and config["vocab_size"] == 151936
    with pytest.raises(ValueError, match="unknown shape"):
        memory_plan.config_of("shape:qwen9-1t")


def test_rehearsal_t4_plans_are_the_rehearsed_models():
    small, large = (kaggle_rehearsal.t4_plans(f"shape:qwen2.5-{n}", "kaggle-qwen2.5-3b") for n in ("1.5b", "3b"))
    assert set(small) == set(kaggle_rehearsal.STAGES)
    assert all(small[s]["device_gb"] < large[s]["device_gb"] for s in kaggle_rehearsal.STAGES)


def test_rehearsal_rows_of_stage_00_merge_by_their_key(tmp_path):
    out = tmp_path / "r.csv"
    for measured in (1.0, 2.0):  # the same stage measured twice: one row, the later one
        row = {c: "" for c in kaggle_rehearsal.COLUMNS} | dict(model="m", dtype="bfloat16", stage="00",
                                                              measured_gb=measured)
        merged = results.merge_rows(pd.DataFrame([row]), out, kaggle_rehearsal.KEY, dtype={"stage": str})
        results.write_csv(merged, out)
    back = pd.read_csv(out, dtype={"stage": str})
    assert back["stage"].tolist() == ["00"] and back["measured_gb"].tolist() == [2.0]


def test_the_peak_is_placed_in_the_cell_that_ran_when_it_was_first_seen(tmp_path):
    def cell(source, start, end):
        return {"cell_type": "code", "source": source,
                "metadata": {"papermill": {"start_time": start, "end_time": end}}}

    nb = tmp_path / "03.ipynb"
    nb.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": "# text", "metadata": {}},
        cell("# load\nmodel = load_model(MODEL)\n", "2026-12-05T10:00:00.000000Z", "2026-12-05T10:00:10.000000Z"),
        cell("row = measure_variant(model, chunks)", "2026-12-05T10:00:10.100000Z", "2026-12-05T10:01:00.000000Z"),
    ]}))
    at = pd.Timestamp("2026-12-05T10:00:30Z").timestamp()
    assert kaggle_rehearsal.peak_cell(nb, at) == "row = measure_variant(model, chunks)"
    assert kaggle_rehearsal.peak_cell(nb, at - 25) == "model = load_model(MODEL)"  # comments skipped
    assert kaggle_rehearsal.peak_cell(nb, at + 3600) == "" and kaggle_rehearsal.peak_cell(nb, None) == ""


def test_the_record_says_when_the_peak_was_first_seen(tmp_path, monkeypatch, fresh_recorder):
    log = tmp_path / "00.json"
    monkeypatch.setenv(stage_memory.ENV, str(log))
    memory_plan.choose("tiny-llama", "00", dict(PROFILES["smoke"], DEVICE="cpu"))
    first = json.loads(log.read_text())
    assert first["peak_at"] is not None and first["peak_at"] <= first["written_at"]
