"""Run the numbered notebooks in order with papermill, one parameter set for all, skipping finished stages.

`python -m pruning_utils.stages --profile default` is what `run_all.sh` calls. A stage is skipped when its
stamp (a hash of the parameters and of the stamps of the stages before it) matches and all its outputs
exist; `--force` re-runs. A failed stage stops the run with exit code 1, naming the stage and its
executed notebook.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .loading import PROJECT_ROOT


@dataclass(frozen=True)
class Stage:
    """A notebook and the files it must leave behind (paths relative to the project root)."""

    key: str
    notebook: str
    outputs: tuple[str, ...]


STAGES = (
    Stage("00", "00-setup-01-baseline-and-importance.ipynb", (
        "results/ablation_studies/baseline.csv", "results/ablation_studies/perplexity_baseline.json",
        "results/ablation_studies/latency_baseline.json", "results/importance/importance.safetensors",
        "results/importance/importance_summary.csv")),
    Stage("02", "02_head_pruning.ipynb", (
        "results/ablation_studies/head_pruning.csv", "models/head_pruned/pruning_plan.json")),
    Stage("03", "03_mlp_pruning.ipynb", (
        "results/ablation_studies/mlp_pruning.csv", "models/mlp_pruned/pruning_plan.json",
        "models/mix_pruned/pruning_plan.json")),
    Stage("04", "04_recovery_lora.ipynb", ("results/ablation_studies/recovery.csv",)),
    Stage("06", "06_final_eval.ipynb", (
        "results/ablation_studies/final_eval.csv", "results/plots/pareto_params.png",
        "results/plots/pareto_latency.png", "results/plots/stage_bars.png")),
)

_COMMON = dict(
    TEXT_SOURCE="embedded", DEVICE="auto", DTYPE="auto", SEED=0,
    HEAD_RATE=0.2, MLP_RATE=0.25, RECON_SEQUENTIAL=False, MIX_RESCORE=False, MAIN_HEAD_CRITERION="fluctuation",
    MAIN_MLP_CRITERION="fluctuation",
    ALLOCATION="uniform", RECONSTRUCTION="lstsq", LATENCY_BATCH=1,
)

PROFILES: dict[str, dict] = {
    # embedded SmolLM2-135M on a 2-core CPU
    "default": dict(_COMMON, MODEL="smollm2-135m", N_CALIB=64, CALIB_SEQ_LEN=256, EVAL_SEQ_LEN=512,
                    EVAL_MAX_TOKENS=32768, SWEEP_EVAL_MAX_TOKENS=4096,
                    CRITERIA="random,magnitude,activation,fluctuation,taylor,tfidf,tfidf_topic,semantic,mix",
                    HEAD_SWEEP="0.2,0.5", MLP_SWEEP="0.25,0.5", SEMANTIC_MAX_WINDOWS=2, SEMANTIC_SEQ_LEN=128,
                    LATENCY_SEQ_LEN=512, LATENCY_REPEATS=3, DECODE_TOKENS=32,
                    # 16 steps at 2e-3 bring S3 to <= 16 PPL (benchmarks/recovery_budget.py)
                    RECOVERY_STEPS=16, LORA_LR=2e-3, RECOVERY_MODELS="head_pruned,mix_pruned",
                    RECOVERY_LOSS="distill", N_PROMPTS=30, ZERO_SHOT=False),
    # tiny random model: exercises every stage in a few minutes (used by the tests)
    "smoke": dict(_COMMON, MODEL="tiny-llama", N_CALIB=8, CALIB_SEQ_LEN=32, EVAL_SEQ_LEN=64, EVAL_MAX_TOKENS=1024,
                  SWEEP_EVAL_MAX_TOKENS=512, CRITERIA="random,magnitude,activation,fluctuation,taylor,tfidf,semantic,mix",
                  HEAD_RATE=0.25, HEAD_SWEEP="0.25,0.5", MLP_SWEEP="0.25,0.5", SEMANTIC_MAX_WINDOWS=2, SEMANTIC_SEQ_LEN=16,
                  LATENCY_SEQ_LEN=32, LATENCY_REPEATS=2, DECODE_TOKENS=4, RECOVERY_STEPS=4,
                  RECOVERY_MODELS="head_pruned,mix_pruned", RECOVERY_LOSS="distill", N_PROMPTS=4, ZERO_SHOT=False),
    # Kaggle/Colab T4 or P100 (fp16), hub models, WikiText-2
    "kaggle-qwen2.5-0.5b": dict(_COMMON, MODEL="Qwen/Qwen2.5-0.5B", TEXT_SOURCE="wikitext2", N_CALIB=128,
                                CALIB_SEQ_LEN=512, EVAL_SEQ_LEN=1024, EVAL_MAX_TOKENS=None, SWEEP_EVAL_MAX_TOKENS=65536,
                                CRITERIA="random,magnitude,activation,fluctuation,taylor,tfidf,semantic,mix",
                                HEAD_RATE=0.2, HEAD_SWEEP="0.2,0.4", MLP_SWEEP="0.125,0.25,0.5", SEMANTIC_MAX_WINDOWS=16,
                                LATENCY_SEQ_LEN=1024, LATENCY_REPEATS=10, DECODE_TOKENS=64, RECOVERY_STEPS=300,
                                RECOVERY_MODELS="head_pruned,mix_pruned", RECOVERY_LOSS="distill", N_PROMPTS=30,
                                ZERO_SHOT=True),
    "kaggle-qwen2.5-3b": dict(_COMMON, MODEL="Qwen/Qwen2.5-3B-Instruct", TEXT_SOURCE="wikitext2", N_CALIB=64,
                              CALIB_SEQ_LEN=512, EVAL_SEQ_LEN=1024, EVAL_MAX_TOKENS=131072, SWEEP_EVAL_MAX_TOKENS=32768,
                              CRITERIA="random,magnitude,activation,fluctuation,taylor,semantic,mix",
                              HEAD_RATE=0.25, HEAD_SWEEP="0.25", MLP_SWEEP="0.25", SEMANTIC_MAX_WINDOWS=8,
                              LATENCY_SEQ_LEN=1024, LATENCY_REPEATS=5, DECODE_TOKENS=64, RECOVERY_STEPS=200,
                              RECOVERY_MODELS="head_pruned,mix_pruned", RECOVERY_LOSS="lm", N_PROMPTS=30, ZERO_SHOT=True),
}


class StageFailed(RuntimeError):
    """Raised when a notebook fails; names the stage and its executed notebook."""


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def resolve_parameters(profile: str, overrides: dict | None = None, environ=os.environ) -> dict:
    """Return the profile's parameters with `PRUNE_<NAME>` environment variables and explicit overrides applied."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; known: {', '.join(PROFILES)}")
    params = dict(PROFILES[profile], PROFILE=profile)
    for key in list(params):
        if f"PRUNE_{key}" in environ:
            params[key] = _parse(environ[f"PRUNE_{key}"])
    for key, value in (overrides or {}).items():
        params[key.upper()] = value
    return params


def _stamp_path(root: Path, stage: Stage) -> Path:
    return root / "results" / "stages" / f"{stage.key}.json"


def _digest(params: dict, upstream: list[str]) -> str:
    text = json.dumps({"params": params, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(params: dict, root: Path = PROJECT_ROOT, only: list[str] | None = None, force: bool = False,
        log=print) -> list[dict]:
    """Execute the stages in order; returns one record per stage (ran / skipped, seconds)."""
    import papermill as pm

    # the kernel runs in notebooks/: make the package importable there
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
    out_dir = root / "results" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    records, upstream = [], []
    for stage in STAGES:
        notebook_hash = hashlib.sha256((root / "notebooks" / stage.notebook).read_bytes()).hexdigest()[:16]
        digest = _digest(params, upstream + [notebook_hash])  # an edited notebook re-runs too
        stamp = _stamp_path(root, stage)
        selected = only is None or stage.key in only
        done = (stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest
                and all((root / o).exists() for o in stage.outputs))
        if not selected or (done and not force):
            log(f"[{stage.key}] skipped ({'finished, same parameters' if done else 'not selected'})")
            records.append({"stage": stage.key, "status": "skipped", "seconds": 0.0})
            upstream.append(digest)
            continue
        executed = out_dir / stage.notebook
        log(f"[{stage.key}] running {stage.notebook} -> {executed.relative_to(root)}")
        t0 = time.time()
        stamp.unlink(missing_ok=True)
        try:
            pm.execute_notebook(str(root / "notebooks" / stage.notebook), str(executed), parameters=params,
                                cwd=str(root / "notebooks"), kernel_name="python3", progress_bar=False,
                                log_output=False)
        except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
            raise StageFailed(
                f"stage {stage.key} ({stage.notebook}) failed: {err.__class__.__name__}: {str(err).strip()[-600:]}\n"
                f"see the executed notebook {executed}"
            ) from err
        missing = [o for o in stage.outputs if not (root / o).exists()]
        if missing:
            raise StageFailed(f"stage {stage.key} finished but did not write {missing}; see {executed}")
        seconds = time.time() - t0
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"digest": digest, "seconds": round(seconds, 1), "params": params}, default=str))
        log(f"[{stage.key}] done in {seconds / 60:.1f} min")
        records.append({"stage": stage.key, "status": "ran", "seconds": seconds})
        upstream.append(digest)
    return records


def main(argv: list[str] | None = None) -> int:
    """Command line of run_all.sh; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=os.environ.get("PRUNE_PROFILE", "default"), choices=list(PROFILES))
    ap.add_argument("--only", default=None, help="comma-separated stage keys to run, e.g. 02,03")
    ap.add_argument("--force", action="store_true", help="re-run stages even when finished")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter, e.g. -p MODEL Qwen/Qwen2.5-0.5B")
    args = ap.parse_args(argv)
    params = resolve_parameters(args.profile, {k: _parse(v) for k, v in args.p})
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    t0 = time.time()
    try:
        records = run(params, only=args.only.split(",") if args.only else None, force=args.force)
    except StageFailed as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    total = time.time() - t0
    summary = {"profile": args.profile, "minutes": round(total / 60, 2), "stages": records}
    (PROJECT_ROOT / "results" / "stages").mkdir(parents=True, exist_ok=True)
    (PROJECT_ROOT / "results" / "stages" / "last_run.json").write_text(json.dumps(summary, indent=1))
    print(f"all stages finished in {total / 60:.1f} min ({args.profile} profile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def as_list(value, cast=str) -> list:
    """Return a notebook list parameter as a list: 'a,b' strings (what env vars and -p give) or real lists."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    return [cast(v.strip()) if isinstance(v, str) else cast(v) for v in items]
