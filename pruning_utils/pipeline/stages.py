"""Run the numbered notebooks in order with papermill, one profile for all, skipping finished stages.

`python -m pruning_utils.pipeline.stages --profile default` is what `run_all.sh` calls. Every parameter is declared once
in `pruning_utils/pipeline/profiles.py`; each notebook receives only the ones it reads. A stage is skipped when its
stamp (a hash of its parameters, its notebook and the stamps of the stages before it) matches, the stages before it
have not run again since (the stamp records their digests as it found them) and all its outputs exist; `--force`
re-runs. Bad usage (unknown stage, parameter or profile; a value of the wrong type or out of its range in
`profiles.LIMITS`; `--only` naming a stage the profile leaves out) exits with code 2 before anything runs; a failed
stage stops the run with exit code 1, naming the stage and its executed notebook, and the half-written checkpoint
folders it left (`models/.tmp-*`) are removed (a checkpoint whose only complete copy is among them is put back
under its name first). Stamps and the other records of `results/stages/` are written atomically (`atomic.atomic_file`);
one that is unreadable all the same (cut short by an older version) counts as absent: its stage re-runs, with a warning.

Checkpoint disk budget (`KEEP_CHECKPOINTS='needed'`): the stage graph (`checkpoints_read` / `checkpoints_written`)
says which checkpoints under models/ each stage reads and writes; once a stage has finished, every checkpoint the
pipeline wrote that no later stage reads is deleted (atomically: renamed away, then removed) and recorded in
`results/stages/removed_checkpoints.json`. A removed checkpoint counts as present for skipping; a stage that must
re-run and reads one re-runs the stage that writes it first.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pruning_utils.pipeline.timing as timing
from pruning_utils.atomic import discard_folder, recover_folder, stray_owner, strays_of, write_text_atomic
from pruning_utils.pipeline.profiles import (
    DEMONSTRATIONS,
    LIMITS,
    NOTEBOOK_PARAMS,
    PARAMS,
    PROFILES,
    ParameterError,
    check_parameters,
    parse_value,
)
from pruning_utils.progress import LOOPS_ENV

LIVE_TABLE = "adaptive_runtime_live.csv"  # notebook 05's second evaluation, under the machine's live load


@dataclass(frozen=True)
class Stage:
    """A notebook and the files it must leave behind (paths relative to the project root)."""

    key: str
    notebook: str
    outputs: tuple[str, ...]
    encoder: bool = False  # an encoder-classifier stage: runs only when ENCODER_STAGE is on / only

    @property
    def params(self) -> tuple[str, ...]:
        """Return the names of the parameters this stage's notebook reads."""
        return NOTEBOOK_PARAMS[self.notebook]

    def expected(self, params: dict) -> tuple[str, ...]:
        """Return the outputs this stage writes with `params`: the live evaluation's table of notebook 05 only when
        it runs (ADAPTIVE_LIVE_EVAL under a simulated ADAPTIVE_LOAD, not 'live')."""
        live = params.get("ADAPTIVE_LIVE_EVAL", True) and params.get("ADAPTIVE_LOAD", "") != "live"
        return tuple(o for o in self.outputs if live or not o.endswith(LIVE_TABLE))


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
    Stage("03b", "03b_compression_methods.ipynb", (
        "results/ablation_studies/compression_methods.csv", "results/ablation_studies/compression_methods.png")),
    Stage("04", "04_recovery_lora.ipynb", ("results/ablation_studies/recovery.csv",)),
    Stage("05", "05_adaptive_runtime.ipynb", (
        "results/ablation_studies/adaptive_runtime.csv", "results/ablation_studies/adaptive_summary.csv",
        "results/ablation_studies/" + LIVE_TABLE,
        "results/ablation_studies/adaptive_levels.csv", "results/ablation_studies/inference_time_vs_complexity.png",
        "results/ablation_studies/quality_vs_complexity.png", "results/ablation_studies/adaptive_pareto.png")),
    Stage("06", "06_final_eval.ipynb", (
        "results/ablation_studies/final_eval.csv", "results/plots/pareto_params.png",
        "results/plots/pareto_latency.png", "results/plots/pareto_size.png", "results/plots/stage_bars.png")),
    Stage("07", "07_encoder_glue.ipynb", (
        "results/ablation_studies/encoder_glue.csv", "results/ablation_studies/encoder_glue.png"), encoder=True),
)


def profile_skips(stage: Stage, params: dict) -> bool:
    """Return True when ENCODER_STAGE leaves this stage out (off: encoder stages; only: every other stage)."""
    mode = params.get("ENCODER_STAGE", "off")
    return (stage.encoder and mode == "off") or (not stage.encoder and mode == "only")


def checkpoints_read(key: str, params: dict) -> set[str]:
    """Return the checkpoints under models/ that stage `key` reads, given the run's parameters."""
    if key == "03":
        return {"head_pruned"}  # its plan and row (and the model itself with MIX_RESCORE)
    if key == "03b":  # the target's parameter count, and the checkpoints INT8 is stacked on
        return {params["COMPRESS_TARGET_FROM"]} | (set(as_list(params["COMPRESS_INT8_BASES"])) - {"baseline"})
    if key == "04":
        return set(as_list(params["RECOVERY_MODELS"]))
    if key == "05":
        # the full level (ADAPTIVE_MODEL; '': the unpruned model, nested in memory) and notebook 00's importance scores
        return {params["ADAPTIVE_MODEL"]} if params.get("ADAPTIVE_MODEL") else set()
    if key == "06":
        return set(as_list(params["VARIANTS"]) + as_list(params["EXTRA_VARIANTS"])) - {"baseline"}
    return set()


def checkpoints_written(key: str, params: dict) -> set[str]:
    """Return the checkpoints under models/ that stage `key` writes, given the run's parameters."""
    return {"02": {"head_pruned"}, "03": {"mlp_pruned", "mix_pruned"},
            "03b": {"depth_pruned", "lowrank_pruned", "hybrid_pruned"}
            | {f"{name}_int8" for name in as_list(params["COMPRESS_INT8_BASES"])},
            "04": {f"{name}_lora" for name in as_list(params["RECOVERY_MODELS"])}}.get(key, set())


def not_needed_after(key: str, params: dict) -> set[str]:
    """Return the checkpoints written by stage `key` or before it that no later stage reads."""
    keys = [s.key for s in STAGES]
    done, later = keys[:keys.index(key) + 1], keys[keys.index(key) + 1:]
    written = set().union(*(checkpoints_written(k, params) for k in done))
    return written - set().union(*(checkpoints_read(k, params) for k in later))


def _removed_path(results_dir: Path) -> Path:
    return results_dir / "stages" / "removed_checkpoints.json"


def read_record(path: Path, log=print) -> dict | None:
    """Return a JSON record of results/stages/ (a stage stamp, the removed checkpoints), or None when it is missing
    or unreadable: a record a crash or a full disk cut short counts as absent (the stage re-runs), with a warning."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        return record
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log(f"warning: {path} is unreadable ({err.__class__.__name__}: {err}), e.g. cut short by a full disk or a "
            "crash; it counts as absent, so its stage re-runs")
        return None


def _read_removed(results_dir: Path, log=print) -> dict[str, str]:
    return read_record(_removed_path(results_dir), log) or {}


def _write_removed(results_dir: Path, removed: dict[str, str]) -> None:
    write_text_atomic(_removed_path(results_dir), json.dumps(removed, indent=1, sort_keys=True))


def remove_checkpoint(models: Path, name: str) -> bool:
    """Delete checkpoint folder `models/name` atomically (renamed away first); returns whether it existed."""
    folder = models / name
    if not folder.exists():
        return False
    for stray in strays_of(folder):  # first: a copy an interrupted save left would be put back by the next reader
        discard_folder(stray)
    discard_folder(folder)
    return True


def remove_half_written(models: Path) -> list[str]:
    """Delete the temporary folders interrupted checkpoint writes or removals left under models/; returns their names.

    A checkpoint whose only complete copy is one of them (a save killed between its two renames) is first put back
    under its name (`atomic.recover_folder`), so the last complete copy is never deleted.
    """
    if not models.is_dir():
        return []
    prefixes = (".tmp-", ".old-", ".removed-")
    for owner in {stray_owner(p) for p in models.iterdir() if p.name.startswith(prefixes)} - {None}:
        recover_folder(models / owner)
    left = [p for p in models.iterdir() if p.is_dir() and p.name.startswith(prefixes)]
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in left)


def _producer(name: str, params: dict) -> str | None:
    return next((s.key for s in STAGES if name in checkpoints_written(s.key, params)), None)


def project_root() -> Path:
    """Return the checkout this package belongs to (where notebooks/ is)."""
    from pruning_utils.paths import PROJECT_ROOT  # lazily: the command line is checked before the install brings torch

    return PROJECT_ROOT


class StageFailed(RuntimeError):
    """Raised when a notebook fails; names the stage and its executed notebook."""


class UsageError(ValueError):
    """Bad command-line usage (unknown stage key, parameter or profile; a mistyped value): exit code 2."""


def resolve_parameters(profile: str, overrides: dict | None = None, environ=os.environ) -> dict:
    """Return the profile's parameters with `PRUNE_<NAME>` environment variables and explicit overrides applied.

    Names are case-insensitive; environment strings are parsed (JSON, else text) and every value is checked against
    its declared type. Raises ValueError (ParameterError for names and values) naming what was wrong.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; known: {', '.join(PROFILES)}")
    params = dict(PROFILES[profile])
    for var, text in environ.items():
        # PRUNE_PROFILE chooses the profile itself (the --profile default), it is no override
        if var.startswith("PRUNE_") and var != "PRUNE_PROFILE":
            name = var[len("PRUNE_"):].upper()
            try:
                params[name] = parse_value(name, text)
            except ParameterError as err:
                raise ParameterError(f"environment variable {var}: {err}") from None
    for key, value in (overrides or {}).items():
        name = key.upper()
        if name == "PROFILE":
            raise ParameterError("PROFILE is set by --profile, not as a parameter")
        params[name] = parse_value(name, value) if isinstance(value, str) else value
    return check_parameters(with_main_criteria(params))


def with_main_criteria(params: dict) -> dict:
    """Return `params` with the saved recipe's criteria (MAIN_HEAD_CRITERION, MAIN_MLP_CRITERION) added to CRITERIA
    when missing, so one parameter chooses them (`-p MAIN_HEAD_CRITERION semantic_refit`): notebook 00 then computes
    them. `obs` is computed by notebooks 02 / 03 from their Grams and never added."""
    if "CRITERIA" not in params:
        return params
    crit = as_list(params["CRITERIA"])
    extra = [params.get(n) for n in ("MAIN_HEAD_CRITERION", "MAIN_MLP_CRITERION")]
    extra = [c for c in dict.fromkeys(extra) if isinstance(c, str) and c and c != "obs" and c not in crit]
    return dict(params, CRITERIA=",".join(crit + extra)) if extra else params


def parse_only(text: str | None, params: dict | None = None) -> list[str] | None:
    """Return the stage keys of `--only 02,03` (None: all); raises UsageError listing the known keys, or, given the
    run's `params`, naming a stage its ENCODER_STAGE leaves out and how to run it."""
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    known = [s.key for s in STAGES]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise UsageError(f"unknown stage key(s) {', '.join(repr(k) for k in unknown) or repr(text)} in --only; "
                         f"known: {', '.join(known)}")
    left_out = [s for s in STAGES if s.key in keys and params is not None and profile_skips(s, params)]
    if left_out:
        mode, profile = params.get("ENCODER_STAGE", "off"), params.get("PROFILE", "default")
        names = ", ".join(s.key for s in left_out)
        how = ("run the encoder stage with `-p ENCODER_STAGE on` (after the decoder stages) or alone with "
               "`--profile encoder`" if mode == "off" else
               "run the decoder stages too with `-p ENCODER_STAGE on`, or choose a decoder profile (e.g. --profile "
               "default)")
        raise UsageError(f"--only {text}: stage(s) {names} would not run, because ENCODER_STAGE is '{mode}' in this "
                         f"run (profile {profile}): {how}")
    return keys


def _stamp_path(results_dir: Path, stage: Stage) -> Path:
    return results_dir / "stages" / f"{stage.key}.json"


def _digest(params: dict, upstream: list[str]) -> str:
    text = json.dumps({"params": params, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def upstream_stages(stage: Stage) -> list[Stage]:
    """The stages `stage` builds on: every decoder stage before it (an encoder stage builds on none)."""
    if stage.encoder:
        return []
    return [s for s in STAGES[:STAGES.index(stage)] if not s.encoder]


def stage_digests(params: dict, root: Path) -> Iterator[str]:
    """Yield each stage's digest: its own parameters, its notebook's bytes and the digests of the stages before it."""
    digests: dict[str, str] = {}
    for stage in STAGES:  # lazily: a run that stops at stage 00 never reads the later notebooks
        notebook_hash = hashlib.sha256((root / "notebooks" / stage.notebook).read_bytes()).hexdigest()[:16]
        # upstream digests: a stage re-runs when anything it builds on changed, even a parameter it does not read
        upstream = [digests[s.key] for s in upstream_stages(stage)]
        digests[stage.key] = _digest({n: params[n] for n in stage.params}, upstream + [notebook_hash])
        yield digests[stage.key]


def output_dirs(root: Path) -> dict[str, Path]:
    """Return where `results/` and `models/` live for a run in `root` (PRUNING_*_DIR when already set, as on Kaggle)."""
    return {"results": Path(os.environ.get("PRUNING_RESULTS_DIR") or root / "results"),
            "models": Path(os.environ.get("PRUNING_MODELS_DIR") or root / "models")}


def demonstration_dirs(root: Path, profile: str) -> dict[str, Path]:
    """Point this process's outputs at results/<profile>/ and models/<profile>/ (unless PRUNING_*_DIR are set) and
    label them: a demonstration profile's numbers never land beside the reference results."""
    os.environ.setdefault("PRUNING_RESULTS_DIR", str(root / "results" / profile))
    os.environ.setdefault("PRUNING_MODELS_DIR", str(root / "models" / profile))
    dirs = output_dirs(root)
    write_text_atomic(dirs["results"] / "DEMONSTRATION.md",
                      f"# Results of the `{profile}` profile: a demonstration\n\nFewer windows, prompts, criteria and "
                      "variants than the default profile (pruning_utils/pipeline/profiles.py): these numbers show the "
                      "chain working, they are not the reference results (results/ablation_studies/).\n")
    print(f"{profile} profile: a demonstration, not the reference numbers; results in {dirs['results']}, "
          f"checkpoints in {dirs['models']}")
    return dirs


def _resolve(output: str, dirs: dict[str, Path]) -> Path:
    top, _, rest = output.partition("/")
    return dirs[top] / rest


@contextlib.contextmanager
def _kernel_env(values: dict[str, str]):
    """Set environment variables for the kernels started inside, restoring the caller's afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


KERNEL_NAME = "semantic-llm-pruning"  # scripts/install.sh registers the same name for notebooks opened by hand


@contextlib.contextmanager
def private_kernel(python: str = sys.executable) -> Iterator[str]:
    """Yield the name of a kernel spec that runs `python`, seen only by the kernels started inside (JUPYTER_PATH).

    papermill starts a notebook's kernel by name; a name looked up among the user's kernel specs (`python3`) may
    point at another environment's interpreter, so every stage would run with whichever environment registered it
    last. The spec lives in a temporary folder: nothing of the user's is read or changed.
    """
    with tempfile.TemporaryDirectory(prefix="pruning-kernel-") as folder:
        spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"Python ({KERNEL_NAME})", "language": "python"}
        write_text_atomic(Path(folder) / "kernels" / KERNEL_NAME / "kernel.json", json.dumps(spec, indent=1))
        path = os.pathsep.join(p for p in (folder, os.environ.get("JUPYTER_PATH", "")) if p)
        with _kernel_env({"JUPYTER_PATH": path}):
            yield KERNEL_NAME


def kernel_environment(root: Path) -> dict[str, str]:
    """Return the variables the notebook kernels get: where the project and its outputs are, log-style progress."""
    dirs = output_dirs(root)
    return {"PRUNING_PROJECT_ROOT": str(root), "PRUNING_RESULTS_DIR": str(dirs["results"]),
            "PRUNING_MODELS_DIR": str(dirs["models"]),
            # bars as a few stderr lines: widgets or 10 Hz redraws would be stored in every executed notebook
            "PRUNING_PROGRESS": os.environ.get("PRUNING_PROGRESS", "log")}


def check_kernel_can_import(root: Path) -> None:
    """Raise UsageError when a Python started in `root`/notebooks (as the kernel is) cannot import pruning_utils."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pruning_utils') is None)"
    ok = subprocess.run([sys.executable, "-c", probe], cwd=root / "notebooks").returncode == 0
    if not ok:
        raise UsageError(f"the notebooks' kernel cannot import pruning_utils: install the project first with "
                         f"`pip install -e {root}` (bash scripts/install.sh does it; run_all.sh runs that unless "
                         f"SKIP_INSTALL=1)")


def memory_preflight(params: dict, stages: list[str], log=print) -> None:
    """Raise StageFailed, before any stage runs, when one of `stages` does not fit this machine by the memory plan
    its first cell will choose (`memory_plan.preflight`): a run that cannot finish says so at its start, not hours
    in. With a GPU visible the plans are made in a child process (the free GPU memory needs a CUDA context, which
    would otherwise stay in this process for the whole run). A plan that cannot be made (e.g. a hub model's config
    out of reach) is logged and skipped: each stage's first cell prints its plan all the same."""
    import torch

    from pruning_utils.pipeline import memory_plan

    try:
        if torch.cuda.is_available():
            done = subprocess.run([sys.executable, "-m", "pruning_utils.pipeline.memory_plan", "--preflight",
                                   ",".join(stages)], input=json.dumps(params, default=str), capture_output=True,
                                  text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-300:])
            rows = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            rows = memory_plan.preflight(params, stages)
    except Exception as err:  # noqa: BLE001 - a check that cannot be made must not stop the run
        log(f"memory check skipped ({err.__class__.__name__}: {str(err)[:300]}); each stage's first cell still "
            "prints its plan")
        return
    unfit = [r for r in rows if not r["fits"]]
    if unfit:
        needs = "; ".join(f"{r['stage']}: ~{r['need_gb']:.1f} GiB on {r['device']} ({r['available_gb']:.1f} free)"
                          + (f", ~{r['host_gb']:.1f} GiB on the host ({r['host_available_gb']:.1f} free)"
                             if r["device"] != "cpu" else "") for r in unfit)
        fitting = [r["stage"] for r in rows if r["fits"]]
        raise StageFailed(
            f"by their memory plans, stage{'s' * (len(unfit) > 1)} {', '.join(r['stage'] for r in unfit)} of this "
            f"run do{'es' * (len(unfit) == 1)} not fit this machine ({needs}). Stage {unfit[0]['stage']}: "
            f"{unfit[0]['why']}\nNothing was run. "
            + (f"Run the stages that fit with --only {','.join(fitting)}, c" if fitting else "C")
            + "hange the settings named above, or pass --ignore-memory-plan to run anyway (the plans include a "
            f"{memory_plan.PARAMS['reserve']:.0%} reserve).")
    log("memory check: " + ", ".join(f"{r['stage']} {r['need_gb']:.1f}/{r['available_gb']:.0f} GiB" for r in rows)
        + f" on {rows[0]['device']}" if rows else "memory check: no pipeline stage selected")


def run(params: dict, root: Path | None = None, only: list[str] | None = None, force: bool = False,
        log=print, check_memory: bool = True) -> list[dict]:
    """Execute the stages in order in `root` (default: this checkout); returns one record per stage.
    `check_memory`: refuse, before anything runs, selected stages whose memory plans do not fit (`memory_preflight`).
    """
    import papermill as pm

    root = Path(root or project_root())
    params = check_parameters(params)
    missing = sorted({n for s in STAGES for n in s.params} - set(params))
    if missing:
        raise ParameterError(f"parameters {missing} are missing; start from resolve_parameters(profile)")
    if only is not None:
        parse_only(",".join(only), params)  # a stage the profile leaves out: refused before anything is written
    dirs = output_dirs(root)
    out_dir = dirs["results"] / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = params.get("KEEP_CHECKPOINTS", "all")
    removed = _read_removed(dirs["results"], log)

    def present(output: str) -> bool:  # a checkpoint removed by KEEP_CHECKPOINTS='needed' counts as written
        top, _, rest = output.partition("/")
        return _resolve(output, dirs).exists() or (top == "models" and rest.split("/")[0] in removed)

    def stamp_of(stage: Stage) -> dict:  # read once per stage (an unreadable one warns once), then kept current
        return stamps.setdefault(stage.key, read_record(_stamp_path(dirs["results"], stage), log) or {})

    def seen(stage: Stage) -> dict[str, str | None]:
        """The digests the stages before `stage` have on disk now: what a run of `stage` would build on."""
        return {s.key: stamp_of(s).get("digest") for s in upstream_stages(stage)}

    def finished(stage: Stage, digest: str) -> bool:
        record = stamp_of(stage)
        # a stage whose upstream stages ran (or were re-run) after it is not finished, even when the digests the
        # parameters call for match: `--only 02,06` then `--only 03b,06` must re-run 06 on the new 03b
        built_on = record.get("upstream_seen")  # absent in stamps of older versions: they count as current
        return (record.get("digest") == digest and (built_on is None or built_on == seen(stage))
                and all(present(o) for o in stage.expected(params)))

    stamps: dict[str, dict] = {}

    def wanted(stage: Stage, done: bool) -> bool:
        return (only is None or stage.key in only) and (force or not done) and not profile_skips(stage, params)

    # digests stay lazy (a run that stops at stage 00 never reads the later notebooks) unless checkpoints were
    # removed: then a stage that runs and reads one needs its writer to run first, decided before anything runs
    digests = stage_digests(params, root)
    pulled: set[str] = set()
    if removed:
        digests = list(digests)
        pulled = {s.key for s, d in zip(STAGES, digests) if wanted(s, finished(s, d))}
        grew = True
        while grew:
            needed = {_producer(c, params) for k in pulled for c in checkpoints_read(k, params) if c in removed}
            grew = bool(needed - pulled - {None})
            pulled |= needed - {None}
    records = []
    selected = [s.key for s in STAGES if (only is None or s.key in only) and not profile_skips(s, params)]
    speed, machine = timing.machine_speed_s(), timing.machine_name()
    recorded, recorded_speed = timing.recorded_minutes(dirs["results"] / "ablation_studies" / run_time_file(params))
    planned = timing.estimate(recorded, recorded_speed, speed, selected)
    log(timing.estimate_text(planned, speed, recorded_speed) + " (stages finished with the same parameters are "
        "skipped and take no time)")
    if check_memory:
        memory_preflight(params, selected, log)
    with _kernel_env(kernel_environment(root)), private_kernel() as kernel_name:
        for stage, digest in zip(STAGES, digests):
            stage_params = {n: params[n] for n in stage.params}
            stamp = _stamp_path(dirs["results"], stage)
            done = finished(stage, digest)
            if not (wanted(stage, done) or stage.key in pulled):
                why = ("finished, same parameters" if done else
                       f"ENCODER_STAGE={params.get('ENCODER_STAGE', 'off')}" if profile_skips(stage, params) else
                       "not selected")
                log(f"[{stage.key}] skipped ({why})")
                records.append({"stage": stage.key, "status": "skipped", "seconds": 0.0})
                continue
            executed = out_dir / stage.notebook
            if not wanted(stage, done):
                log(f"[{stage.key}] re-running: a later stage reads checkpoints it wrote that KEEP_CHECKPOINTS removed")
            log(f"[{stage.key}] running {stage.notebook} -> {executed}")
            t0 = time.time()
            stamp.unlink(missing_ok=True)
            stamps[stage.key] = {}
            loops = dirs["results"] / "stages" / f"{stage.key}.loops.jsonl"
            loops.parent.mkdir(parents=True, exist_ok=True)
            loops.unlink(missing_ok=True)
            try:
                with _kernel_env({LOOPS_ENV: str(loops)}):
                    pm.execute_notebook(str(root / "notebooks" / stage.notebook), str(executed),
                                        parameters=stage_params, cwd=str(root / "notebooks"), kernel_name=kernel_name,
                                        progress_bar=False, log_output=False)
            except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
                left = remove_half_written(dirs["models"])  # the kernel is gone: nothing else is writing these
                raise StageFailed(
                    f"stage {stage.key} ({stage.notebook}) failed: {err.__class__.__name__}: "
                    f"{str(err).strip()[-600:]}\nsee the executed notebook {executed}"
                    + (f"\nremoved half-written checkpoint folders: {', '.join(left)}" if left else "")
                ) from err
            if checkpoints_written(stage.key, params) & set(removed):
                for name in checkpoints_written(stage.key, params):
                    removed.pop(name, None)  # written again
                _write_removed(dirs["results"], removed)
            absent = [o for o in stage.expected(params) if not _resolve(o, dirs).exists()]
            if absent:
                raise StageFailed(f"stage {stage.key} finished but did not write {absent}; see {executed}")
            seconds = time.time() - t0
            commit = _git_commit(root)
            load = timing.load_avg()
            stamps[stage.key] = {"digest": digest, "upstream_seen": seen(stage), "seconds": round(seconds, 1),
                                 "speed_s": speed, "load_avg": load, "params": stage_params, "commit": commit}
            write_text_atomic(stamp, json.dumps(stamps[stage.key], default=str))
            timing.write_stage_steps(dirs["results"] / "ablation_studies" / timing.STEPS_FILE, stage.key,
                                     timing.step_rows(stage.key, executed, loops, commit, load, machine))
            loops.unlink(missing_ok=True)
            records.append({"stage": stage.key, "status": "ran", "seconds": seconds})
            log(f"[{stage.key}] done in {seconds / 60:.1f} min; "
                + timing.remaining_text(planned, [r["stage"] for r in records]))
            if keep == "needed":
                gone = sorted(n for n in not_needed_after(stage.key, params) if remove_checkpoint(dirs["models"], n))
                removed.update({n: _producer(n, params) for n in gone})
                _write_removed(dirs["results"], removed)
                if gone:
                    log(f"[{stage.key}] KEEP_CHECKPOINTS=needed: removed {', '.join(gone)} (no later stage reads them)")
    if any(r["status"] == "ran" for r in records):
        log(timing.summary_text(planned, records))
    return records


def _parameter_table() -> str:
    users = {n: [nb[:2] for nb, names in NOTEBOOK_PARAMS.items() if n in names] for n in PARAMS}
    return "\n".join(f"  {n:<22} {p.type_name():<12} default {p.default!r:<14} "
                     f"[{','.join(users[n]) or 'runner'}] {p.help}"
                     + (f"; takes {LIMITS[n].describe()}" if n in LIMITS else "")
                     for n, p in PARAMS.items())


EPILOG = """\
stages: {stages}
profiles: {profiles}
  default: embedded SmolLM2-135M on CPU; smoke: tiny random model (minutes); kaggle-*: hub Qwen models, fp16 GPU

examples:
  bash run_all.sh --profile smoke
  bash run_all.sh --only 02,03 -p HEAD_RATE 0.3 -p CRITERIA magnitude,semantic
  PRUNE_MODEL=Qwen/Qwen2.5-0.5B bash run_all.sh --force
  bash run_all.sh --list-params        # every parameter: type, default, notebooks that read it

-p values and PRUNE_<NAME> variables are parsed as JSON, else taken as text (0.2 -> float, null -> None,
true -> bool, a,b -> the comma-list string), then checked against the declared type.
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="run_all.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(stages=", ".join(f"{s.key} ({s.notebook})" for s in STAGES), profiles=", ".join(PROFILES)))
    ap.add_argument("--profile", default=os.environ.get("PRUNE_PROFILE", "default"), choices=list(PROFILES),
                    help="parameter set (default: $PRUNE_PROFILE or 'default')")
    ap.add_argument("--only", default=None, metavar="KEYS",
                    help="comma-separated stage keys to run, e.g. 02,03 (the others are skipped, not re-checked); "
                         "07 runs only with the encoder stage on (-p ENCODER_STAGE on, or --profile encoder)")
    ap.add_argument("--force", action="store_true", help="re-run the selected stages even when finished")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter, e.g. -p MODEL Qwen/Qwen2.5-0.5B (repeatable; beats PRUNE_<NAME>)")
    ap.add_argument("--list-params", action="store_true", help="print every parameter and exit")
    ap.add_argument("--ignore-memory-plan", action="store_true",
                    help="run even the selected stages whose memory plans do not fit this machine")
    ap.add_argument("--check", action="store_true",
                    help="only check the command line and PRUNE_* variables (run_all.sh does, before installing)")
    return ap


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """Command line of run_all.sh; returns the process exit code (2: bad usage, 1: a stage failed)."""
    ap = _parser()
    args = ap.parse_args(argv)  # unknown options / profiles exit 2 with argparse's message
    if args.list_params:
        print(_parameter_table())
        return 0
    try:  # everything the user typed is checked before any stage starts or any folder is created
        parse_only(args.only)  # an unknown key first, whatever the parameters
        params = resolve_parameters(args.profile, dict(args.p))
        only = parse_only(args.only, params)
        if args.check:
            return 0
        root = Path(root or project_root())
        check_kernel_can_import(root)
        if args.profile in DEMONSTRATIONS:
            demonstration_dirs(root, args.profile)
    except ValueError as err:
        print(f"run_all.sh: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    t0 = time.time()
    try:
        records = run(params, root=root, only=only, force=args.force, check_memory=not args.ignore_memory_plan)
    except StageFailed as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    total = time.time() - t0
    summary = {"profile": args.profile, "minutes": round(total / 60, 2), "stages": records}
    write_text_atomic(output_dirs(root)["results"] / "stages" / "last_run.json", json.dumps(summary, indent=1))
    write_run_time(root, args.profile, t0, params)
    print(f"all stages finished in {total / 60:.1f} min ({args.profile} profile)")
    return 0


RUN_TIME_FILE = "run_time.csv"
ENCODER_RUN_TIME_FILE = "run_time_encoder.csv"  # an encoder-only run (ENCODER_STAGE only) times itself apart


def _git_commit(root: Path) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_time_file(params: dict) -> str:
    """Return the run-time table of a run with these parameters (an encoder-only run keeps its own)."""
    return ENCODER_RUN_TIME_FILE if params.get("ENCODER_STAGE") == "only" else RUN_TIME_FILE


def write_run_time(root: Path, profile: str, started: float, params: dict | None = None) -> Path:
    """Write `results/ablation_studies/run_time.csv`: the install and each stage's last measured minutes.

    Stages measured in this checkout (their stamps) carry this commit; a stage this checkout never ran (an `--only`
    run, a fresh clone) keeps its row from the existing table with the commit it was measured at, so a partial run
    never erases the other stages' times. Only the stages the run's `params` select count (the decoder pipeline by
    default); an encoder-only run (ENCODER_STAGE only) writes `run_time_encoder.csv`, so its time never joins the
    default run's total.
    """
    import csv

    params = params or {}
    dirs = output_dirs(root)
    path = dirs["results"] / "ablation_studies" / run_time_file(params)
    previous = {}
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as f:  # a row cut short (no minutes) is dropped
            previous = {r["stage"]: r for r in csv.DictReader(f)
                        if r.get("stage") not in ("total", None) and _is_number(r.get("minutes"))}
    commit, machine = _git_commit(root), timing.machine_name()
    rows = []  # (stage, notebook, minutes, profile, commit, speed_s, load_avg, device)
    shell_start = os.environ.get("PRUNING_RUN_STARTED")
    if shell_start:  # set by run_all.sh before scripts/install.sh: what preceded the stages is the install
        rows.append(("install", "scripts/install.sh", max(0.0, started - float(shell_start)) / 60, profile, commit, "",
                     _speed(timing.load_avg()), machine))
    elif "install" in previous:
        rows.append(_kept_row("install", previous["install"]["notebook"], previous["install"], profile))
    for stage in STAGES:
        if profile_skips(stage, params):
            continue
        info = read_record(_stamp_path(dirs["results"], stage))
        if info is not None:  # measured by this checkout's runs, on this machine
            rows.append((stage.key, stage.notebook, info.get("seconds", float("nan")) / 60, profile,
                         info.get("commit", commit), _speed(info.get("speed_s")), _speed(info.get("load_avg")),
                         machine))
        elif stage.key in previous:
            rows.append(_kept_row(stage.key, stage.notebook, previous[stage.key], profile))
    lines = ["stage,notebook,minutes,profile,commit,speed_s,load_avg,device"] + [
        f"{k},{nb},{m:.2f},{pr},{c},{sp},{ld},{dev}" for k, nb, m, pr, c, sp, ld, dev in rows]
    lines.append(f"total,,{sum(r[2] for r in rows):.2f},{profile},{commit},,{_speed(timing.load_avg())},{machine}")
    return write_text_atomic(path, "\n".join(lines) + "\n")  # atomic: a reader never sees half a table


def _kept_row(key: str, notebook: str, r: dict, profile: str) -> tuple:
    """Return a row of an earlier run_time.csv as it was measured (its commit, machine and load)."""
    return (key, notebook, float(r["minutes"]), r.get("profile") or profile, r.get("commit") or "unknown",
            _speed(r.get("speed_s")), _speed(r.get("load_avg")), r.get("device") or "unknown")


def _speed(value) -> str:
    return f"{float(value):.3f}" if _is_number(value) and float(value) == float(value) else ""


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def as_list(value, cast=str) -> list:
    """Return a notebook list parameter as a list: 'a,b' strings (what env vars and -p give) or real lists."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    return [cast(v.strip()) if isinstance(v, str) else cast(v) for v in items]


if __name__ == "__main__":
    sys.exit(main())
