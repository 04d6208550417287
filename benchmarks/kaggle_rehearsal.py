"""Kaggle rehearsal: the real notebooks, stage by stage, on a model of a real shape, with each stage's measured peak
host memory next to its memory plan (issue 32).

The hub and a GPU are out of reach here, model shapes are not: `shape:qwen2.5-3b` is Qwen2.5-3B's config with
seeded random weights (`pruning_utils/model/shapes.py`). Every stage runs through `run_all.sh`'s runner (papermill,
the notebook as a user runs it) in a fresh process, with a Kaggle profile's settings and its token counts cut down
(`CUTS`: fewer windows, steps, prompts and repeats; the window lengths, batches, criteria that set the peak, Gram
mode and recovery settings stay the profile's), into scratch results / models folders. Under `PRUNING_MEMORY_LOG`
the stage's first cell (`memory_plan.choose`) records the plan it runs with and the kernel's resident memory, and
the kernel's peak resident memory is sampled until it exits (`pruning_utils/pipeline/stage_memory.py`); the row
compares what the stage added (peak - start) with the plan of the same device and dtype without its reserve, and
names the plan of the same model and stage on a Kaggle T4 in fp16 with the profile's real settings beside it.

Writes results/benchmarks/kaggle_rehearsal.csv, one row per (model, dtype, stage), merged with the rows of other
models. Usage:
    python3 -m benchmarks.kaggle_rehearsal --model shape:qwen2.5-1.5b [--dtype bfloat16] [--stages 00,02,03,04,05,06]
    python3 -m benchmarks.kaggle_rehearsal --model shape:qwen2.5-3b --profile kaggle-qwen2.5-3b
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pruning_utils.measure import metrics
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.pipeline import memory_plan, results, stage_memory
from pruning_utils.pipeline.profiles import PROFILES
from pruning_utils.pipeline.stages import STAGES as RUNNER_STAGES

OUT = PROJECT_ROOT / "results" / "benchmarks" / "kaggle_rehearsal.csv"
STAGES = ("00", "02", "03", "04", "05", "06")
# what the rehearsal changes of the profile: token counts and repeats (time), the text (the hub's is out of reach;
# the embedded text alone: self-generated text from random weights would only cost time), the criteria cut to those
# that set stage 00's peak or that later stages read (`criteria`: every other one adds sweep variants, hours at 3B
# on a CPU, with the same peak), notebook 03's extra screen rows, 03b's variants and the hub's zero-shot tasks left
# out. Window lengths, batches, Gram mode, LoRA settings and the rates stay the profile's: they set the peaks.
CUTS = dict(TEXT_SOURCE="embedded", N_CALIB=4, REFIT_CALIB=4, FIDELITY_TOKENS=512, HELDOUT_TOKENS=512,
            LATENCY_REPEATS=1, DECODE_TOKENS=4, PEAK_MEMORY=False, SEMANTIC_MAX_WINDOWS=1, RECOVERY_STEPS=2,
            N_PROMPTS=2, MAX_NEW_TOKENS=4, ZERO_SHOT=False, EXTRA_VARIANTS="", GGUF_EXPORT="", MLP_PRUNING_LAST="",
            LM_HEAD_RATE="", ADAPTIVE_N_PROMPTS=5, ADAPTIVE_NEW_TOKENS=4, ADAPTIVE_EPOCHS=2, ADAPTIVE_DQN_EPOCHS=2,
            ADAPTIVE_LIVE_EVAL=False, TFIDF_TOPICS=2)
# gradient criteria set their own peak (a backward pass) and stay when the profile has them
PEAK_CRITERIA = ("fluctuation", "taylor", "mix")
KEY = ["model", "dtype", "stage"]
COLUMNS = ["model", "profile", "stage", "dtype", "measured_gb", "plan_gb", "ratio", "plan_reserve_gb",
           "plan_peak_operation", "grams", "offload", "start_gb", "peak_gb", "t4_plan_gb", "t4_fits", "minutes",
           "load_avg", "device", "torch", "commit"]


def cuts(profile: dict) -> dict:
    """Return the parameter overrides of a rehearsal of `profile`: `CUTS`, evaluation token counts of one
    perplexity batch of the profile's EVAL_SEQ_LEN windows (one window for the sweeps), and of the profile's
    criteria those in `PEAK_CRITERIA` and those its later stages read (main head / MLP criteria, the adaptive
    runtime's)."""
    eval_len = int(profile["EVAL_SEQ_LEN"])
    read = {profile[k] for k in ("MAIN_HEAD_CRITERION", "MAIN_MLP_CRITERION", "ADAPTIVE_CRITERION")}
    criteria = [c for c in str(profile["CRITERIA"]).split(",") if c in read or c in PEAK_CRITERIA]
    # one full perplexity batch of windows: fewer would never reach the logits peak the plan sizes for a batch
    batch = int(memory_plan.PARAMS["eval_batch"])
    return dict(CUTS, EVAL_MAX_TOKENS=batch * eval_len, SWEEP_EVAL_MAX_TOKENS=eval_len, CRITERIA=",".join(criteria))


def stage_command(profile: str, stage: str, model: str, dtype: str, overrides: dict) -> list[str]:
    """Return the runner's command line of one stage of the rehearsal."""
    cmd = [sys.executable, "-m", "pruning_utils.pipeline.stages", "--profile", profile, "--only", stage, "--force",
           "-p", "MODEL", model, "-p", "DEVICE", "cpu", "-p", "DTYPE", dtype]
    for name, value in overrides.items():
        text = "None" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        cmd += ["-p", name, text]
    return cmd


def row_of(record: dict, model: str, profile: str, dtype: str, minutes: float, t4: dict | None) -> dict:
    """Return the CSV row of one stage from its memory record (`stage_memory.snapshot`)."""
    planned = record["plan_gb"] - record["plan_reserve_gb"]
    return dict(model=model, profile=profile, stage=record["stage"], dtype=dtype,
                measured_gb=round(record["measured_gb"], 3), plan_gb=round(planned, 3),
                ratio=round(record["measured_gb"] / planned, 3) if planned > 0 else float("nan"),
                plan_reserve_gb=round(record["plan_reserve_gb"], 3), plan_peak_operation=record["plan_peak_operation"],
                grams=record["grams"], offload=record["offload"], start_gb=round(record["start_gb"], 3),
                peak_gb=round(record["peak_gb"], 3),
                t4_plan_gb=round(t4["device_gb"], 2) if t4 else float("nan"),
                t4_fits=bool(t4["fits"]) if t4 else None, minutes=round(minutes, 2), load_avg=metrics.load_avg(),
                device=metrics.device_name("cpu"), torch=torch.__version__, commit=metrics.git_commit())


def peak_cell(notebook: Path, peak_at: float | None) -> str:
    """Return the first code line of the executed notebook's cell that ran when the peak was first seen (papermill
    stamps each cell's start and end), or '' where that cannot be told."""
    from datetime import datetime

    if peak_at is None or not notebook.is_file():
        return ""
    for cell in json.loads(notebook.read_text()).get("cells", []):
        times = cell.get("metadata", {}).get("papermill", {})
        if cell.get("cell_type") != "code" or not times.get("start_time") or not times.get("end_time"):
            continue
        start, end = (datetime.fromisoformat(times[k].replace("Z", "+00:00")).timestamp()
                      for k in ("start_time", "end_time"))
        if start <= peak_at <= end + stage_memory.INTERVAL_S:
            code = [line for line in "".join(cell.get("source", "")).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
            return code[0][:100] if code else ""
    return ""


def t4_plans(model: str, profile: str) -> dict[str, dict]:
    """Return, per stage, the plan of `model` on Kaggle's T4 (fp16) with `profile`'s real settings: `device_gb` and
    `fits`."""
    config = memory_plan.config_of(model)
    plans = {}
    for stage in STAGES:
        plan = memory_plan.choose(config, stage, dict(PROFILES[profile], _plan=dict(memory_plan.KAGGLE_T4,
                                                                                 rows_known=False))).plan
        plans[stage] = dict(device_gb=plan.total_gb, fits=plan.fits)
    return plans


def run_stage(stage: str, cmd: list[str], work: Path, log: Path) -> tuple[dict, float]:
    """Run one stage in a fresh process into `work`; return its memory record and wall minutes."""
    memory_log = work / "memory" / f"{stage}.json"
    memory_log.unlink(missing_ok=True)
    env = dict(os.environ, PRUNING_RESULTS_DIR=str(work / "results"), PRUNING_MODELS_DIR=str(work / "models"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{stage_memory.ENV: str(memory_log)})
    env.pop("PRUNING_RUN_STARTED", None)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - t0) / 60
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {done.returncode}); its log: {log} (the executed notebook is "
                         f"under {work / 'results' / 'notebooks'})")
    if not memory_log.is_file():
        raise SystemExit(f"stage {stage} ran but wrote no memory record ({memory_log}): its first cell must call "
                         "memory_plan.choose")
    return json.loads(memory_log.read_text()), minutes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model spec, e.g. shape:qwen2.5-1.5b (tests: tiny-llama)")
    ap.add_argument("--profile", default="kaggle-qwen2.5-3b", choices=[p for p in PROFILES],
                    help="profile whose settings are rehearsed")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order, of {', '.join(STAGES)}")
    ap.add_argument("--work", default=None, help="scratch folder of the run (default: a temporary one, removed)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="another parameter override on top of the cuts (repeatable)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    overrides = {**cuts(PROFILES[args.profile]), **dict(args.p)}
    t4 = t4_plans(args.model, args.profile)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kaggle-rehearsal-"))
    (work / "memory").mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for stage in stages:
            cmd = stage_command(args.profile, stage, args.model, args.dtype, overrides)
            print(f"stage {stage}: {' '.join(cmd[1:])}", flush=True)
            record, minutes = run_stage(stage, cmd, work, work / "memory" / f"{stage}.log")
            rows.append(row_of(record, args.model, args.profile, args.dtype, minutes, t4.get(stage)))
            executed = work / "results" / "notebooks" / next(x.notebook for x in RUNNER_STAGES if x.key == stage)
            print({**{k: rows[-1][k] for k in ("stage", "measured_gb", "plan_gb", "ratio", "minutes")},
                   "peak_cell": peak_cell(executed, record.get("peak_at"))}, flush=True)
            # after every stage: a stopped rehearsal keeps what it measured
            results.write_csv(results.merge_rows(pd.DataFrame(rows)[COLUMNS], args.out, KEY, dtype={"stage": str}),
                              args.out)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(pd.DataFrame(rows)[COLUMNS].to_markdown(index=False))


if __name__ == "__main__":
    main()
