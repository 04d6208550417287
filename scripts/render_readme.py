"""README.md, docs/RESULTS.md and docs/BENCHMARKS.md, rendered from the committed CSVs/JSONs: one function per table
or generated sentence, one place that fills them in.

Each file holds its generated parts between `<!-- table:NAME -->` / `<!-- /table:NAME -->` (a table) or
`<!-- text:NAME -->` / `<!-- /text:NAME -->` (prose whose figures come from a result file); `render_text` replaces what
is between the markers with `TABLES[NAME]()` or `TEXTS[NAME]()`. Under every benchmark table a `stamp-NAME` table says
which commit, device and versions the result file records, and flags it stale when the benchmark's own module (or a
`pruning_utils` module it imports) changed in a later commit. `tests/test_readme.py` fails when a committed file and
its rendering disagree; `tests/test_prose_numbers.py` fails on a figure in the prose that no result file holds.
Run from the repository root after `bash run_all.sh`: `python3 -m scripts.render_readme` rewrites the three files
(`--check`: exit 1 and name the files that disagree, changing nothing). A missing result file renders as a note.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from benchmarks.local_refit import S1_PREFIX as S1_BUILT  # an S1 built by a criterion: model 'S1:<criterion>'
from benchmarks.semantic_refit import EARLIER_RECIPE
from pruning_utils.paths import PROJECT_ROOT, ablation_dir, results_dir
from pruning_utils.pipeline.profiles import DEFAULTS, PROFILES
from pruning_utils.pipeline.results import STAMP_DTYPE
from pruning_utils.pipeline.stages import STAGES

MARKER = re.compile(r"(?P<open><!-- (?P<kind>table|text):(?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                    r"(?P<close><!-- /(?P=kind):(?P=name) -->)", re.S)
DOCS = ("README.md", "docs/RESULTS.md", "docs/BENCHMARKS.md")


def _shown(path: Path) -> str:
    """Return `path` relative to the project root when it lies inside it (the rendering must not name a checkout)."""
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return path.name


def _csv(name: str) -> pd.DataFrame:
    path = ablation_dir() / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(f"`{_shown(path)}` is missing: run `bash run_all.sh` (or the benchmark that writes it)")
    return pd.read_csv(path, dtype=STAMP_DTYPE)


def _json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"`{_shown(path)}` is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def _md(df: pd.DataFrame, digits: int = 2) -> str:
    # empty cells stay empty instead of printing 'nan'
    return df.round(digits).to_markdown(index=False).replace(" nan ", "     ") + "\n"


def _present(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Return the columns of `cols` a CSV has: results written before a column existed still render. A ridge ratio
    is written as typed (1e-4 would round to 0 with the table's digits)."""
    out = df[[c for c in cols if c in df.columns]].copy()
    if "ridge_ratio" in out:
        out["ridge_ratio"] = out["ridge_ratio"].map(lambda v: "" if pd.isna(v) else f"{v:g}")
    return out


def _sweep(name: str, rate: str, frac: str) -> str:
    df = _csv(name)
    sweep = df[df["variant"].str.count("-").eq(2)]  # criteria-sweep rows are named kind-criterion-rate
    removed = sweep.groupby(rate)[frac].first()
    pivot = sweep.pivot_table(index="criterion", columns=rate, values="ppl")
    pivot = pivot.sort_values(pivot.columns[0])
    pivot.columns = [f"PPL @ {rate.split('_')[0]} rate {r} (−{100 * removed[r]:.0f}%)" for r in pivot.columns]
    return _md(pivot.reset_index(), 1)


def baseline() -> str:
    """Return the baseline row: size, cost and quality (its speed and memory are in `final_cost`)."""
    cols = ["variant", "params_total", "params_non_embedding", "flops_per_token", "size_mb", "ppl", "eval_tokens",
            "fidelity_ppl", "fidelity_tokens", "heldout_ppl", "heldout_tokens"]
    return _md(_present(_csv("baseline"), cols))


def head_sweep() -> str:
    """Return screen perplexity per head criterion and rate (plain removal)."""
    return _sweep("head_pruning", "head_rate_requested", "head_frac_removed")


def mlp_sweep() -> str:
    """Return screen perplexity per MLP criterion and rate (plain removal)."""
    return _sweep("mlp_pruning", "mlp_rate_requested", "mlp_frac_removed")


def _saved(name: str) -> str:
    df = _csv(name)
    cols = ["variant", "criterion", "reconstruction", "query_heads", "intermediate", "reduction_pct",
            "flops_reduction_pct", "ppl", "ppl_change_pct", "eval_tokens", "fidelity_ppl", "heldout_ppl",
            "kl_to_baseline"]
    return _md(_present(df[df["variant"].str.count("-").ne(2) & ~_neuronrank_rows(df)], cols), 3)


def _neuronrank_rows(df: pd.DataFrame) -> pd.Series:
    """Return the rows of NeuronRank's removal options (pruning_last, LM-head rows): criterion_options says."""
    if "criterion_options" not in df:
        return pd.Series(False, index=df.index)
    return df["criterion_options"].fillna("").str.contains(r"(?:^|,)(?:last|lm_head)=")


def neuronrank() -> str:
    """Return notebook 03's NeuronRank rows: the TF-IDF criteria with their exponents, pruning_last and the LM head
    (screen text, plain removal), beside the main criterion's row at the same rate."""
    df = _csv("mlp_pruning")
    sweep = df["variant"].str.count("-").eq(2) & df["criterion"].isin(["tfidf", "tfidf_topic"])
    options = _neuronrank_rows(df)
    rates = set(df.loc[options, "mlp_rate_requested"])
    main = df["variant"].str.count("-").eq(2) & df["criterion"].isin(set(df.loc[options, "criterion"])) & df[
        "mlp_rate_requested"].isin(rates)
    cols = ["variant", "criterion", "criterion_options", "intermediate", "params_total", "params_non_embedding",
            "flops_reduction_pct", "ppl", "heldout_ppl", "lm_head_unreachable_pct", "vocab_kept", "decode_tok_s",
            "reference_decode_tok_s", "decode_change_pct"]
    return _md(_present(df[sweep | options | main], cols), 3)


def head_pruning() -> str:
    """Return notebook 02's reconstruction options (screen) and its saved model (full evaluation)."""
    return _saved("head_pruning")


def mlp_pruning() -> str:
    """Return notebook 03's reconstruction options (screen) and its saved models (full evaluation)."""
    return _saved("mlp_pruning")


def recovery() -> str:
    """Return the LoRA recovery rows: held-out loss and perplexity before / after (its timings stay in the CSV)."""
    cols = ["model", "steps", "tokens_seen", "loss", "data", "heldout_loss_before", "heldout_loss_after", "ppl_before",
            "ppl_after", "damage_recovered_pct", "fidelity_before", "fidelity_after", "heldout_ppl_before",
            "heldout_ppl_after", "semantic_before",
            "semantic_after", "rouge_l_f1_before", "rouge_l_f1_after", "bertscore_f1_minilm_l6_before",
            "bertscore_f1_minilm_l6_after"]
    return _md(_present(_csv("recovery"), cols), 3)


def final_eval() -> str:
    """Return the final table: every variant measured the same way."""
    cols = ["variant", "params_non_embedding", "reduction_pct", "head_frac_removed", "mlp_frac_removed",
            "flops_reduction_pct", "size_mb", "ppl", "ppl_change_pct", "fidelity_ppl", "heldout_ppl", "kl_to_baseline",
            "semantic_cosine", "semantic_ci_low", "semantic_ci_high", "first_sentence_match", "rouge_l_f1",
            "bertscore_f1_minilm_l6"]
    return _md(_present(_csv("final_eval"), cols), 3)


def final_cost() -> str:
    """Return the final table's speed and memory columns (timing columns: they vary from run to run)."""
    cols = ["variant", "prefill_ms", "prefill_ms_iqr", "decode_tok_s", "latency_noisy", "peak_memory_mb"]
    return _md(_present(_csv("final_eval"), cols), 1)


def calibration_sources() -> str:
    """Return `benchmarks/calibration_sources.py`: per calibration source and shape, in-domain / fidelity PPL, KL."""
    df = _csv("calibration_sources")
    df["calibration_source"] = df["calibration_source"].fillna("").replace("", "(unpruned)")
    metrics = [m for m in ("ppl", "fidelity_ppl", "heldout_ppl", "kl_to_baseline") if m in df]
    table = df.pivot_table(index="calibration_source", columns="shape", values=metrics, sort=False)
    table.columns = [f"{shape} {metric}" for metric, shape in table.columns]
    order = [f"{s} {m}" for s in ("baseline", "S1", "S2", "S3") for m in metrics]
    return _md(table[[c for c in order if c in table.columns]].reset_index(), 3)


_NO_SEMANTIC_REFIT = "_No `semantic_refit.csv` yet: `python3 -m benchmarks.semantic_refit` writes it._\n"


def semantic_refit() -> str:
    """Return `benchmarks/semantic_refit.py`: per head (S1: neuron) criterion, calibration source and shape,
    in-domain / fidelity / held-out English perplexity after the default refit."""
    if not (ablation_dir() / "semantic_refit.csv").exists():
        return _NO_SEMANTIC_REFIT
    df = _csv("semantic_refit")
    df = df[df["shape"] != "baseline"]
    table = df.pivot_table(index=["criterion", "calibration_source", "n_calib", "ridge_ratio"], columns="shape",
                           values=["ppl", "fidelity_ppl", "heldout_ppl"], sort=False)
    table.columns = [f"{shape} {metric}" for metric, shape in table.columns]
    order = [f"{s} {m}" for s in ("S1", "S2", "S3") for m in ("ppl", "fidelity_ppl", "heldout_ppl")]
    return _md(table[[c for c in order if c in table.columns]].reset_index(), 3)


def recovery_sources() -> str:
    """Return `benchmarks/recovery_sources.py`: each recovery (loss on data) by perplexity, fidelity and retention."""
    if not (ablation_dir() / "recovery_sources.csv").exists():
        return "_No `recovery_sources.csv` yet: `python3 -m benchmarks.recovery_sources` writes it._\n"
    cols = ["model", "loss", "data", "ppl", "fidelity_ppl", "heldout_ppl", "kl_to_baseline", "semantic_cosine",
            "semantic_ci_low", "semantic_ci_high", "first_sentence_match", "tokens_seen"]
    return _md(_present(_csv("recovery_sources"), cols), 3)


def run_time() -> str:
    """Return the measured minutes of the install and of each stage."""
    return _md(_present(_csv("run_time"), ["stage", "notebook", "minutes"]), 1)


def stage_steps() -> str:
    """Return the profile of the recorded run: each stage's costliest notebook cells and the loops inside them
    (stage_steps.csv; loops nest inside cells, so only the cells add up to a stage)."""
    df = _csv("stage_steps")
    cells = df[df["kind"] == "cell"].sort_values("seconds", ascending=False).groupby("stage", sort=False).head(3)
    loops = df[df["kind"] == "loop"].sort_values("seconds", ascending=False).groupby("stage", sort=False).head(3)
    shown = pd.concat([cells, loops]).sort_values(["stage", "kind", "seconds"], ascending=[True, True, False])
    shown = shown.assign(minutes=shown["seconds"] / 60)
    return _md(_present(shown, ["stage", "kind", "step", "minutes", "items", "unit"]), 2)


def quality_benchmark() -> str:
    """Return the full-evaluation rows of `benchmarks/quality.py` with each shape's target and best peer."""
    from benchmarks.quality import PEERS, TARGETS

    q = _csv("quality_benchmark")
    full = q[~q["screen"]].sort_values(["shape", "ppl"]).copy()
    full["target"] = full["shape"].map(TARGETS)
    full["best peer"] = full["shape"].map(lambda s: ", ".join(f"{k} {v}" for k, v in PEERS.get(s, {}).items()))
    cols = ["shape", "criterion", "reconstruction", "allocation", "order", "ridge_ratio", "role",
            "params_non_embedding", "reduction_pct", "ppl", "fidelity_ppl", "kl_heldout", "prefill_ms",
            "decode_tokens_per_s", "target", "best peer"]
    return _md(_present(full, cols), 3)


def recovery_budget() -> str:
    """Return `benchmarks/recovery_budget.py`'s curve: quality against training steps (timings stay in the CSV)."""
    df = _csv("recovery_budget")
    other = df["model"].astype(str).str.contains(":", regex=False)  # another profile's checkpoint ('profile:name')
    df = df.assign(_other=other).sort_values(["_other", "model", "steps"], kind="stable")  # the default's rows first
    cols = ["model", "data", "lr", "temperature", "steps", "tokens_seen", "ppl", "fidelity_ppl", "heldout_ppl",
            "kl_to_baseline", "semantic_cosine", "rouge_l_f1", "bertscore_f1_minilm_l6"]
    return _md(_present(df, cols), 3)


def local_refit() -> str:
    """Return `benchmarks/local_refit.py`'s sweep: an S1 model's quality per local refit step budget."""
    df = _csv("local_refit").sort_values(["model", "lr", "steps"])
    return _md(_present(df, ["model", "steps", "lr", "ppl", "fidelity_ppl", "heldout_ppl", "kl_to_baseline",
                             "layers_refit", "layers_kept", "error_before", "error_after", "refit_minutes",
                             "commit"]), 4)


def _memory_json() -> dict:
    return _json(results_dir() / "benchmarks" / "memory_scale.json")


def memory_scale() -> str:
    """Return the measured peak MiB (and measured / planned) per model size and operation, CPU fp32."""
    rows = pd.DataFrame(_memory_json()["rows"])
    rows["cell"] = [f"{m:.0f} ({r:.2f})" if m == m else "" for m, r in zip(rows["peak_mb"], rows["measured_over_plan"])]
    table = rows.pivot_table(index=["size", "params"], columns="stage", values="cell", aggfunc="first", sort=False)
    return table.reset_index().fillna("").to_markdown(index=False) + "\n"


def memory_extrapolation() -> str:
    """Return the fp16 extrapolation of each operation to Qwen2.5-3B and Llama-3.1-8B on a 16 GB T4 (GiB)."""
    fits = _memory_json()["fits"]
    out = []
    for stage, f in fits.items():
        row = {"operation": stage, "bytes/param (fit)": f["bytes_per_param"]}
        for model, e in f["extrapolation"].items():
            row[f"{model} fit"] = e["fit_fp16_gb"]
            row[f"{model} plan"] = e["plan_fp16_gb"]
        out.append(row)
    return _md(pd.DataFrame(out), 1)


def compression_methods() -> str:
    """Return the compression methods side by side (notebook 03b), or a note when its CSV does not exist yet."""
    if not (ablation_dir() / "compression_methods.csv").exists():
        return "_No `compression_methods.csv` yet: the next `bash run_all.sh` (stage 03b) writes it._\n"
    df = _csv("compression_methods")
    cols = ["variant", "method", "base", "form", "saved", "params_non_embedding", "nonzero_params_non_embedding",
            "size_mb", "ppl", "eval_tokens", "prefill_ms", "decode_tok_s", "peak_memory_mb", "applicable"]
    return _md(_present(df, cols), 2)


def _optional(name: str, stage: str, cols: list[str], digits: int = 3) -> str:
    """Return the `cols` a stage's CSV has, or a note when the stage has not written it yet."""
    if not (ablation_dir() / f"{name}.csv").exists():  # an encoder stage runs only with its profile (or switch)
        how = "--profile encoder" if any(s.key == stage and s.encoder for s in STAGES) else f"--only {stage}"
        return f"_No `{name}.csv` yet: `bash run_all.sh {how}` writes it._\n"
    return _md(_present(_csv(name), cols), digits)


def adaptive_summary() -> str:
    """Return the adaptive-runtime controllers on the held-out prompts (notebook 05)."""
    return _optional("adaptive_summary", "05", [
        "controller", "simulated_load", "load", "n_prompts", "reward", "reward_ppl_only", "tokens_per_s", "speedup_pct",
        "latency_s", "retention",
        "retention_pct",
        "ppl", "switch_ms_max", "overhead_ms", "level_counts", "beats_fixed_on_reward"])


def adaptive_levels() -> str:
    """Return every level of notebook 05 on the training prompts: speed, quality, cache, switch time, memory."""
    return _optional("adaptive_levels", "05", [
        "level", "int8", "refit", "active_layers", "kv_window", "tokens_per_s", "answer_ppl", "retention", "chunk_ppl",
        "cache_bytes_max", "switch_ms_median", "memory_overhead_ratio"])


def calibration_size() -> str:
    """Return `benchmarks/calibration_size.py`: quality per shape, criterion, calibration token count and ridge, with
    the costs."""
    df = _csv("calibration_size").sort_values(["shape", "criterion", "calib_tokens", "ridge_ratio", "order"],
                                              ascending=[True, False, True, False, True], kind="stable")
    return _md(_present(df, ["shape", "criterion", "calib_tokens", "ridge_ratio", "order", "fisher_windows",
                             "fisher_source", "ppl", "fidelity_ppl", "gram_s_cumulative", "fisher_s", "obs_s",
                             "refit_s", "commit"]), 4)


def search_heldout() -> str:
    """Return `benchmarks/search_heldout.py`: budget searches per shape, KL windows and refit order, with their
    uniform starts (in-domain and fidelity perplexity, the heads / neurons removed in all)."""
    def total(counts) -> int | None:  # "0 1 2 ..." per layer -> their sum (older rows recorded none)
        return sum(map(int, counts.split())) if isinstance(counts, str) and counts.strip() else None

    df = _csv("search_heldout").copy()
    df["head_rounds_removed"] = df["heads_removed_per_group"].map(total)
    df["neurons_removed_total"] = df["neurons_removed"].map(total)
    df = df.sort_values(["shape", "calib_tokens", "n_kl_windows", "kl_windows", "trade", "allocation", "order"],
                        ascending=[True, True, True, True, False, False, True], kind="stable")
    return _md(_present(df, ["shape", "calibration_source", "calib_tokens", "ridge_ratio", "allocation", "kl_windows",
                             "n_kl_windows",
                             "trade", "order", "kl_heldout",
                             "ppl", "fidelity_ppl", "head_rounds_removed", "neurons_removed_total", "search_s",
                             "commit"]), 3)


def thorough_profile() -> str:
    """Return the saved models of notebooks 02/03 under the default and the `thorough` profile (obs + search)."""
    df = _csv("thorough_profile")
    return _md(_present(df, ["profile", "variant", "criterion", "allocation", "calib_tokens", "ridge_ratio",
                             "params_non_embedding", "ppl", "fidelity_ppl", "kl_to_baseline", "stage_minutes",
                             "commit"]), 3)


def int8_smoothing() -> str:
    """Return `benchmarks/int8_smoothing.py`: torchao INT8 of the embedded model, weight-only and dynamic (plain /
    smoothed / down_proj fp32)."""
    df = _csv("int8_smoothing")
    return _md(_present(df, ["option", "ppl", "ppl_change_pct", "decode_tok_s", "speedup", "size_mb", "build_s"]), 2)


def encoder_glue() -> str:
    """Return the encoder classifier variants (notebook 07)."""
    return _optional("encoder_glue", "07", [
        "variant", "task", "accuracy", "f1", "params", "params_non_embedding", "reduction_pct", "size_mb",
        "ms_per_batch", "samples_per_s"])


def final_short() -> str:
    """Return the README's final table: each variant's size, speed and quality, as `final_eval.csv` has them."""
    df = _present(_csv("final_eval"), ["variant", "reduction_pct", "size_mb", "decode_tok_s", "prefill_ms", "ppl",
                                       "fidelity_ppl", "heldout_ppl", "semantic_cosine"])
    return _md(df.round({"reduction_pct": 1, "size_mb": 1, "decode_tok_s": 1, "prefill_ms": 1}), 2)


def profiles() -> str:
    """Return the runner's profiles: model, text source, encoder stage and how many parameters each overrides."""
    def changed(values: dict) -> str:
        names = [k for k in values if k != "PROFILE" and values[k] != DEFAULTS.get(k)]
        return ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "") or "—"

    rows = [{"profile": name, "MODEL": values["MODEL"], "TEXT_SOURCE": values["TEXT_SOURCE"],
             "ENCODER_STAGE": values.get("ENCODER_STAGE", ""), "parameters changed from default": changed(values)}
            for name, values in PROFILES.items()]
    return pd.DataFrame(rows).to_markdown(index=False) + "\n"


def kaggle_plans() -> str:
    """Return the memory plan per stage of each kaggle-* profile on Kaggle's T4 machine (GiB on the GPU / the host,
    `memory_plan.profile_plan_table` from the committed shape configs; 'no': it does not fit; 'host reference': the
    unpruned model stays on the host, its outputs walked layer by layer on the GPU)."""
    from pruning_utils.pipeline.memory_plan import profile_plan_table

    columns = {}
    for name in (n for n in PROFILES if n.startswith("kaggle-")):
        table = profile_plan_table(name)
        columns[name] = [f"{r.device_gb:.1f} / {r.host_gb:.1f}" + ("" if r.fits else " (no)")
                         + (" offload" if r.offload else " host reference" if r.reference_host else "")
                         for r in table.itertuples()]
    frame = pd.DataFrame(columns, index=pd.Index(list(table["stage"]), name="stage"))
    return frame.to_markdown() + "\n"


def _scalars(path: Path) -> str:
    """Return a JSON result's top-level numbers and strings as a two-column table (its `env` stamp is shown apart)."""
    data = _json(path)
    rows = [{"key": k, "value": f"{v:.4g}" if isinstance(v, float) else str(v)} for k, v in data.items()
            if isinstance(v, (int, float, str)) and k != "env"]
    return pd.DataFrame(rows).to_markdown(index=False) + "\n"


def prefill_speedup() -> str:
    """Return `benchmarks/prefill_speedup.py`'s figures (prefill time vs FLOP reduction of the S3 shape)."""
    return _scalars(results_dir() / "benchmarks" / "prefill_speedup.json")


def importance_cost() -> str:
    """Return `benchmarks/importance_cost.py`'s figures (criterion pass cost relative to a plain forward pass)."""
    return _scalars(results_dir() / "benchmarks" / "importance_cost.json")


def encoder_int8_speed() -> str:
    """Return `benchmarks/encoder_int8_speed.py`'s figures (dynamic INT8 of the encoder classifier)."""
    return _scalars(results_dir() / "benchmarks" / "encoder_int8_speed.json")


def llamacpp_speed() -> str:
    """Return `benchmarks/llamacpp_speed.py`'s table: each variant's GGUF in llama.cpp (agreement, speed, limit)."""
    path = results_dir() / "benchmarks" / "llamacpp_speed.csv"
    if not path.exists():
        return "_No `llamacpp_speed.csv` yet: `python3 -m benchmarks.llamacpp_speed` writes it._\n"
    cols = ["variant", "type", "params_non_embedding", "file_mb", "logit_max_abs_diff", "agree_prompts",
            "agree_prefix", "pp_tok_s", "tg_tok_s", "tg_speedup_x", "limit_x", "of_limit"]
    return _md(_present(pd.read_csv(path), cols), 3)


def kaggle_plan_settings() -> str:
    """Return, per kaggle-* profile and stage, the settings `memory_plan.choose` runs it with on Kaggle's T4 machine
    (offload mode, where the Grams live, how variants are built), its peak operation and GiB on the GPU / the host."""
    from pruning_utils.pipeline.memory_plan import profile_plan_table

    rows = []
    for name in (n for n in PROFILES if n.startswith("kaggle-")):
        for r in profile_plan_table(name).itertuples():
            rows.append({"profile": name, "stage": r.stage, "offload": "yes" if r.offload else "no",
                         "reference on the host": "yes" if r.reference_host else "", "Grams": r.grams,
                         "variants": r.build, "peak": r.peak, "GiB on the T4": r.device_gb,
                         "GiB on the host": r.host_gb,
                         "fits": "yes" if r.fits else "no" + (f" ({r.blocked})" if r.blocked else "")})
    return _md(pd.DataFrame(rows), 1)


def kaggle_rehearsal() -> str:
    """Return `benchmarks/kaggle_rehearsal.py`'s table: per shape model and stage, the peak host memory the stage
    added on this CPU next to its plan for the same dtype, and the plan of the same stage on a T4 in fp16."""
    path = results_dir() / "benchmarks" / "kaggle_rehearsal.csv"
    if not path.exists():
        return ("_No `kaggle_rehearsal.csv` yet: `python3 -m benchmarks.kaggle_rehearsal --model shape:qwen2.5-3b` "
                "writes it._\n")
    df = pd.read_csv(path, dtype={"stage": str, **STAMP_DTYPE})  # "00", not 0
    df = df.sort_values(["model", "stage"], kind="stable")
    cols = ["model", "profile", "stage", "dtype", "measured_gb", "plan_gb", "ratio", "plan_peak_operation",
            "t4_plan_gb", "t4_fits", "minutes"]
    return _md(_present(df, cols), 2)


# ---- benchmark stamps: what a result file says about where it was measured, and whether its code moved on since

# benchmark module (benchmarks/NAME.py) -> the result files it writes, relative to results/
BENCHMARK_FILES: dict[str, tuple[str, ...]] = {
    "quality": ("ablation_studies/quality_benchmark.csv", "ablation_studies/quality_benchmark.json"),
    "search_heldout": ("ablation_studies/search_heldout.csv",),
    "thorough_profile": ("ablation_studies/thorough_profile.csv",),
    "int8_smoothing": ("ablation_studies/int8_smoothing.csv",),
    "calibration_size": ("ablation_studies/calibration_size.csv",),
    "calibration_sources": ("ablation_studies/calibration_sources.csv",),
    "recovery_sources": ("ablation_studies/recovery_sources.csv",),
    "recovery_budget": ("ablation_studies/recovery_budget.csv",),
    "local_refit": ("ablation_studies/local_refit.csv",),
    "semantic_refit": ("ablation_studies/semantic_refit.csv",),
    "prefill_speedup": ("benchmarks/prefill_speedup.json",),
    "importance_cost": ("benchmarks/importance_cost.json",),
    "encoder_int8_speed": ("benchmarks/encoder_int8_speed.json",),
    "memory_scale": ("benchmarks/memory_scale.json",),
    "llamacpp_speed": ("benchmarks/llamacpp_speed.csv",),
    "kaggle_rehearsal": ("benchmarks/kaggle_rehearsal.csv",),
}
VERSION_KEYS = ("torch", "transformers", "peft", "python")


@dataclass
class Stamp:
    """What one result file records about its measurement: commits, device and library versions (empty: not
    recorded)."""

    file: str
    commits: list[str]
    device: str
    versions: str
    missing: bool = False


def _distinct(values) -> list[str]:
    return sorted({str(v) for v in values if isinstance(v, str) or (v == v and v is not None)})


def read_stamp(rel: str) -> Stamp:
    """Return the stamp a result file (path relative to results/) carries: a CSV's `commit` / `device*` / version
    columns, a JSON's `env` (or top-level) keys."""
    path = results_dir() / rel
    if not path.exists():
        return Stamp(rel, [], "", "", missing=True)
    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype=STAMP_DTYPE)
        col = lambda *names: next((_distinct(df[n]) for n in names if n in df.columns), [])  # noqa: E731
        versions = [f"{k} {', '.join(col(k))}" for k in VERSION_KEYS if col(k)]
        return Stamp(rel, col("commit", "git_commit"), ", ".join(col("device_name", "device")), "; ".join(versions))
    data = json.loads(path.read_text())
    env = {**{k: v for k, v in data.items() if not isinstance(v, (dict, list))}, **(data.get("env") or {})}
    commits = [str(env[k]) for k in ("git_commit", "commit") if env.get(k)][:1]
    device = " ".join(str(env[k]) for k in ("device_name", "device") if env.get(k))
    return Stamp(rel, commits, device, "; ".join(f"{k} {env[k]}" for k in VERSION_KEYS if env.get(k)))


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return None


def last_commit(paths: list[str]) -> str | None:
    """Return the full hash of the last commit touching any of `paths` (None: no git history here)."""
    out = _git("log", "-1", "--format=%H", "--", *paths)
    return out.stdout.strip() or None if out is not None and out.returncode == 0 else None


def is_ancestor(older: str, newer: str) -> bool | None:
    """Return whether commit `older` is contained in `newer` (None: git does not know one of them)."""
    out = _git("merge-base", "--is-ancestor", older, newer)
    return None if out is None or out.returncode not in (0, 1) else out.returncode == 0


def commit_date(commit: str) -> str:
    """Return a commit's date (YYYY-MM-DD) or 'unknown to git'."""
    out = _git("show", "-s", "--format=%cs", commit)
    return out.stdout.strip() if out is not None and out.returncode == 0 and out.stdout.strip() else "unknown to git"


def benchmark_sources(name: str) -> list[str]:
    """Return `benchmarks/NAME.py` and the repository modules it imports (pruning_utils, benchmarks), as paths."""
    own = f"benchmarks/{name}.py"
    tree = ast.parse((PROJECT_ROOT / own).read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.update(f"{node.module}.{a.name}" for a in node.names)
            modules.add(node.module)
    paths = {own}
    for m in modules:
        if not m.startswith(("pruning_utils", "benchmarks")):
            continue
        base = PROJECT_ROOT / m.replace(".", "/")
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists() and m not in ("pruning_utils", "benchmarks"):
                paths.add(_shown(candidate))
    return sorted(paths)


def staleness(commits: list[str], code_commit: str | None,
              ancestor: Callable[[str, str], bool | None] = is_ancestor) -> str:
    """Return a result's status: 'not stamped', 'stale: ...' when the code's last commit `code_commit` is not
    contained in every stamped commit, else 'current (...)'."""
    if not commits:
        return "not stamped"
    if code_commit is None:
        return "unknown: no git history here"
    unknown = [c for c in commits if ancestor(code_commit, c) is None]
    old = [c for c in commits if ancestor(code_commit, c) is False]
    if unknown:
        return f"unknown: commit {', '.join(unknown)} is not in this repository's history"
    if old:
        # The newest code commit is not named: the page must not change with every later commit to the code.
        return f"**stale**: its code changed after {', '.join(old)}"
    return f"current (code last changed in {code_commit[:7]})"


def stamp_table(name: str) -> str:
    """Return the stamp table printed under benchmark NAME's table: per result file, commit, commit date, device,
    versions and status."""
    code = last_commit(benchmark_sources(name))
    rows = []
    for rel in BENCHMARK_FILES[name]:
        st = read_stamp(rel)
        if st.missing:
            rows.append({"file": f"results/{rel}", "commit": "", "commit date (git)": "", "device": "", "versions": "",
                         "status": "missing: run `python3 -m benchmarks." + name + "`"})
            continue
        rows.append({"file": f"results/{rel}", "commit": ", ".join(st.commits) or "not stamped",
                     "commit date (git)": ", ".join(commit_date(c) for c in st.commits),
                     "device": st.device or "not stamped", "versions": st.versions or "not stamped",
                     "status": staleness(st.commits, code)})
    return pd.DataFrame(rows).to_markdown(index=False) + "\n"


# ---- generated sentences: every figure in them is a cell of a result file, named in the sentence

def run_time_summary() -> str:
    """Return how long the default run took and on what machine (run_time.csv; the machine from a column of it, else
    from the baseline JSON stamped at the same commit)."""
    df = _csv("run_time")
    total = df[df["stage"].astype(str) == "total"]
    stages = df[~df["stage"].astype(str).isin(["total", "install"])]["stage"].astype(str).tolist()
    minutes = f"{total['minutes'].iloc[0]:.1f}" if len(total) else f"{df['minutes'].sum():.1f} (sum of its rows)"
    commits = _distinct(df["commit"]) if "commit" in df else []
    profile = ", ".join(_distinct(df["profile"])) if "profile" in df else "not recorded"
    machine_cols = [c for c in ("machine", "device_name", "device") if c in df.columns]
    if machine_cols:
        machine = ", ".join(_distinct(df[machine_cols[0]])) + f" (column `{machine_cols[0]}` of `run_time.csv`)"
    else:
        machine = "a machine `run_time.csv` does not record"
        for name in ("perplexity_baseline.json", "latency_baseline.json"):
            path = ablation_dir() / name
            env = json.loads(path.read_text()).get("env", {}) if path.exists() else {}
            if env and env.get("git_commit") in commits:
                machine = (f"{env.get('device_name', env.get('device'))}, {env.get('cpu_count')} CPU cores, "
                           f"{env.get('threads')} threads, {env.get('dtype')} (the `env` stamp of `{name}`, written at "
                           f"the same commit)")
                break
    return (f"The {profile} profile's run of stages {', '.join(stages)} took **{minutes} minutes** (row `total` of "
            f"`results/ablation_studies/run_time.csv`, commit {', '.join(f'`{c}`' for c in commits) or 'not stamped'}) "
            f"on {machine}.\n")


def final_readings() -> str:
    """Return which smaller variant keeps the lowest perplexity and which decodes fastest (final_eval.csv)."""
    df = _csv("final_eval")
    base = df[df["variant"] == "baseline"]
    smaller = df[df["reduction_pct"] > 0]
    if base.empty or smaller.empty:
        return "_`final_eval.csv` has no baseline row or no smaller variant to compare._\n"
    b, best, fast = base.iloc[0], smaller.loc[smaller["ppl"].idxmin()], df.loc[df["decode_tok_s"].idxmax()]
    return (f"Of the variants with fewer non-embedding parameters, `{best['variant']}` keeps the lowest perplexity: "
            f"{best['ppl']:.2f} against the baseline's {b['ppl']:.2f}, with {best['reduction_pct']:.1f}% fewer "
            f"non-embedding parameters. The fastest decode is `{fast['variant']}`'s, {fast['decode_tok_s']:.1f} tok/s "
            f"against {b['decode_tok_s']:.1f} (rows `{best['variant']}`, `{fast['variant']}` and `baseline` of "
            f"`results/ablation_studies/final_eval.csv`).{_heldout_reading(df, b)}\n")


def _heldout_reading(df, b) -> str:
    """Return the held-out English perplexity of the baseline and of each recovered (`*_lora`) variant (a ratio
    would be a figure no result file holds: tests/test_prose_numbers.py)."""
    if "heldout_ppl" not in df or not (b["heldout_ppl"] > 0):
        return ""
    rows = df[df["variant"].str.endswith("_lora") & (df["heldout_ppl"] > 0)]
    parts = [f"`{r['variant']}` {r['heldout_ppl']:.2f}" for _, r in rows.iterrows()]
    return (f" On held-out English prose (`heldout_ppl`) the baseline scores {b['heldout_ppl']:.2f}"
            + (f"; after recovery {', '.join(parts)}." if parts else "."))


def _recipe_row(df: pd.DataFrame, shape: str, recipe: tuple) -> pd.Series | None:
    """Return the semantic_refit.csv row of `shape` cut by `recipe` (head criterion, calibration source, refit
    windows, ridge), or None."""
    crit, source, n_calib, ridge = recipe
    hit = df[(df["shape"] == shape) & (df["criterion"].str.split("+").str[0] == crit)
             & (df["calibration_source"] == source) & (df["n_calib"] == n_calib)
             & ((df["ridge_ratio"] - ridge).abs() <= 1e-9 * ridge)]
    return None if hit.empty else hit.iloc[-1]


def semantic_refit_readings() -> str:
    """Return whether the saved recipe's heads (MAIN_HEAD_CRITERION scored on TEXT_SOURCE, refit from REFIT_CALIB
    windows) are at least as good as the earlier recipe's (`EARLIER_RECIPE`) in-domain AND on fidelity at S2 and S3
    (issue 34's rule), from semantic_refit.csv."""
    if not (ablation_dir() / "semantic_refit.csv").exists():
        return _NO_SEMANTIC_REFIT
    df = _csv("semantic_refit")
    saved = (DEFAULTS["MAIN_HEAD_CRITERION"], DEFAULTS["TEXT_SOURCE"], DEFAULTS["REFIT_CALIB"], DEFAULTS["RIDGE_RATIO"])
    lines, wins = [], True
    for shape in ("S2", "S3"):
        new, old = _recipe_row(df, shape, saved), _recipe_row(df, shape, EARLIER_RECIPE)
        if new is None or old is None:
            return (f"_Rows of {shape} missing: `python3 -m benchmarks.semantic_refit` (the saved recipe) and "
                    f"`--source {EARLIER_RECIPE[1]} --n-calib {EARLIER_RECIPE[2]}` (the earlier one)._\n")
        ok = new["ppl"] <= old["ppl"] and new["fidelity_ppl"] <= old["fidelity_ppl"]
        wins = wins and ok
        lines.append(f"- {shape}: `{saved[0]}` on `{saved[1]}`, {saved[2]} windows: in-domain {new['ppl']:.2f}, "
                     f"fidelity {new['fidelity_ppl']:.2f}, held-out English {new['heldout_ppl']:.2f}; "
                     f"`{EARLIER_RECIPE[0]}` on `{EARLIER_RECIPE[1]}`, {EARLIER_RECIPE[2]} windows: {old['ppl']:.2f}, "
                     f"{old['fidelity_ppl']:.2f}, {old['heldout_ppl']:.2f}: "
                     + ("at least as good on both." if ok else "NOT at least as good on both."))
    verdict = ("The saved recipe's heads meet the rule against the earlier recipe's." if wins else
               "The saved recipe's heads do NOT meet the rule against the earlier recipe's: revisit the defaults.")
    return "\n".join(lines) + f"\n\n{verdict} (Rows of `results/ablation_studies/semantic_refit.csv`.)\n"


S1_TARGET = 12.8  # issue 34: in-domain perplexity of S1 (MLP-only -18.7%)
S1_CHECKPOINT = "mlp_pruned"  # the saved model of that shape


def local_refit_readings() -> str:
    """Return what local_refit.csv says of each step budget against the saved model (steps 0, per model), and whether
    the S1 rows (the saved checkpoint's and those built by a criterion) meet issue 34's S1 target."""
    if not (ablation_dir() / "local_refit.csv").exists():
        return "Not measured yet: run `python3 -m benchmarks.local_refit`.\n"
    df = _csv("local_refit").sort_values(["model", "lr", "steps"])
    lines = []
    for model, rows in df.groupby("model", sort=False):
        saved = rows[rows["steps"] == 0]
        if not len(saved):
            continue
        s = saved.iloc[0]
        for _, r in rows[rows["steps"] > 0].iterrows():
            lines.append(f"- `{model}`, {int(r['steps'])} steps at lr {r['lr']:g}: in-domain {s['ppl']:.2f} -> "
                         f"{r['ppl']:.2f}, fidelity {s['fidelity_ppl']:.2f} -> {r['fidelity_ppl']:.2f}, held-out "
                         f"English {s['heldout_ppl']:.2f} -> {r['heldout_ppl']:.2f}; {int(r['layers_kept'])} of "
                         f"{int(r['layers_refit'])} layers kept their steps, in {r['refit_minutes']:.1f} min "
                         f"({r['device']}).")
    s1 = df[(df["model"] == S1_CHECKPOINT) | df["model"].astype(str).str.startswith(S1_BUILT)]
    verdict = ""
    if len(s1):
        best = s1.loc[s1["ppl"].idxmin()]
        verdict = (f"Issue 34's S1 target (in-domain <= {S1_TARGET}) is "
                   f"{'met' if best['ppl'] <= S1_TARGET else 'not met'} by the S1 rows (best {best['ppl']:.2f}: "
                   f"`{best['model']}`, {int(best['steps'])} steps). ")
    return "\n".join(lines) + f"\n\n{verdict}(Rows of `results/ablation_studies/local_refit.csv`.)\n"


def recovery_budget_readings() -> str:
    """Return what recovery_budget.csv says of the default budget against no recovery and the longest budget."""
    if not (ablation_dir() / "recovery_budget.csv").exists():
        return "Not measured yet: run `python3 -m benchmarks.recovery_budget`.\n"
    every = _csv("recovery_budget").sort_values("steps", kind="stable")
    # rows of another profile's checkpoint are labelled 'profile:name' (benchmarks/recovery_budget.py --profile)
    other = every["model"].astype(str).str.contains(":", regex=False)
    df = every[~other]
    b = _csv("baseline").iloc[0]

    def figures(r) -> str:
        return (f"in-domain {r['ppl']:.2f}, fidelity {r['fidelity_ppl']:.2f}, held-out English {r['heldout_ppl']:.2f}, "
                f"semantic cosine {r['semantic_cosine']:.2f}")

    profile_runs = ""
    for model, rows in every[other].groupby("model", sort=True):
        profile = str(model).split(":", 1)[0]
        first, last = rows.iloc[0], rows.iloc[-1]
        before = f"before recovery {figures(first)}; " if int(first["steps"]) == 0 else ""
        profile_runs += (f" The {profile} profile's own checkpoint ({model}): {before}after {int(last['steps'])} "
                         f"steps {figures(last)}.")

    default = df[df["steps"] == DEFAULTS["RECOVERY_STEPS"]]
    parts = [f"before recovery {figures(df.iloc[0])}"]
    if len(default):
        parts.append(f"at the default budget (RECOVERY_STEPS, {int(default.iloc[0]['steps'])} steps) "
                     f"{figures(default.iloc[0])}")
    thorough = int(PROFILES["thorough"]["RECOVERY_STEPS"])
    if thorough in set(df["steps"]) and thorough != df.iloc[-1]["steps"]:
        parts.append(f"at the thorough profile's budget ({thorough} steps) "
                     f"{figures(df[df['steps'] == thorough].iloc[0])}")
    last = int(df.iloc[-1]["steps"])
    whose = ", the thorough profile's" if last == thorough else ""
    parts.append(f"after the longest budget measured ({last} steps{whose}) {figures(df.iloc[-1])}")
    under = df[df["heldout_ppl"] <= 2 * b["heldout_ppl"]]
    held = (f" Held-out English is first within 2x the unpruned model's at {int(under.iloc[0]['steps'])} steps."
            if len(under) else " No budget measured brings held-out English within 2x the unpruned model's.")
    return (f"{df.iloc[0]['model']}: " + "; ".join(parts) + f". The unpruned model: in-domain {b['ppl']:.2f}, "
            f"fidelity {b['fidelity_ppl']:.2f}, held-out English {b['heldout_ppl']:.2f}.{held}{profile_runs} (Rows of "
            "`results/ablation_studies/recovery_budget.csv` and `baseline.csv`.)\n")


def _sweep_readings(name: str, rate: str) -> str:
    df = _csv(name)
    sweep = df[df["variant"].str.count("-").eq(2)]
    lines = []
    for r, rows in sweep.groupby(rate):
        best = rows.loc[rows["ppl"].idxmin()]
        rand = rows[rows["criterion"] == "random"]
        vs = f"; `random` {rand['ppl'].iloc[0]:.1f}" if len(rand) else ""
        lines.append(f"- `{rate}` {r:g}: lowest screen perplexity `{best['criterion']}` ({best['ppl']:.1f}){vs}.")
    return "\n".join(lines) + f"\n\n(From the criteria-sweep rows of `results/ablation_studies/{name}.csv`.)\n"


def head_sweep_readings() -> str:
    """Return the best head criterion at each swept rate, next to `random` (head_pruning.csv)."""
    return _sweep_readings("head_pruning", "head_rate_requested")


def mlp_sweep_readings() -> str:
    """Return the best MLP criterion at each swept rate, next to `random` (mlp_pruning.csv)."""
    return _sweep_readings("mlp_pruning", "mlp_rate_requested")


TABLES: dict[str, Callable[[], str]] = {
    "baseline": baseline, "head_sweep": head_sweep, "mlp_sweep": mlp_sweep, "head_pruning": head_pruning,
    "mlp_pruning": mlp_pruning, "neuronrank": neuronrank, "recovery": recovery, "final_eval": final_eval,
    "final_cost": final_cost,
    "run_time": run_time, "stage_steps": stage_steps, "quality_benchmark": quality_benchmark,
    "recovery_budget": recovery_budget, "local_refit": local_refit,
    "memory_scale": memory_scale, "memory_extrapolation": memory_extrapolation,
    "calibration_sources": calibration_sources, "recovery_sources": recovery_sources,
    "semantic_refit": semantic_refit,
    "compression_methods": compression_methods, "adaptive_summary": adaptive_summary,
    "adaptive_levels": adaptive_levels, "encoder_glue": encoder_glue, "calibration_size": calibration_size,
    "int8_smoothing": int8_smoothing, "search_heldout": search_heldout,
    "thorough_profile": thorough_profile, "final_short": final_short, "profiles": profiles,
    "kaggle_plans": kaggle_plans, "kaggle_rehearsal": kaggle_rehearsal, "kaggle_plan_settings": kaggle_plan_settings,
    "prefill_speedup": prefill_speedup, "importance_cost": importance_cost, "encoder_int8_speed": encoder_int8_speed,
    "llamacpp_speed": llamacpp_speed,
    **{f"stamp-{name}": (lambda name=name: stamp_table(name)) for name in BENCHMARK_FILES},
}
TEXTS: dict[str, Callable[[], str]] = {
    "run_time_summary": run_time_summary, "final_readings": final_readings,
    "head_sweep_readings": head_sweep_readings, "mlp_sweep_readings": mlp_sweep_readings,
    "semantic_refit_readings": semantic_refit_readings, "recovery_budget_readings": recovery_budget_readings,
    "local_refit_readings": local_refit_readings,
}


def render_text(text: str) -> str:
    """Return a document with every marked table and text re-rendered from the result files (unknown names raise;
    a missing result file or column renders as a note saying so)."""
    def fill(m: re.Match) -> str:
        known = TABLES if m.group("kind") == "table" else TEXTS
        name = m.group("name")
        if name not in known:
            raise KeyError(f"unknown {m.group('kind')} '{name}'; known: {', '.join(known)}")
        try:
            body = known[name]()
        except FileNotFoundError as e:
            body = f"_Not rendered: {e}._\n"
        except KeyError as e:  # a result file written before (or after) a column existed
            body = f"_Not rendered: the result file has no column {e}._\n"
        return m.group("open") + body + m.group("close")

    return MARKER.sub(fill, text)


render_readme = render_text  # the name the README-only renderer had


def marked(text: str) -> dict[str, str]:
    """Return `{name: body}` of every marked table and text in a document."""
    return {m.group("name"): m.group("body") for m in MARKER.finditer(text)}


def marked_tables(text: str) -> dict[str, str]:
    """Return `{name: body}` of every marked table (not text) in a document."""
    return {m.group("name"): m.group("body") for m in MARKER.finditer(text) if m.group("kind") == "table"}


def doc_paths() -> list[Path]:
    """Return the rendered documents: README.md, docs/RESULTS.md, docs/BENCHMARKS.md."""
    return [PROJECT_ROOT / d for d in DOCS]


def readme_path() -> Path:
    """Return the project's README.md."""
    return PROJECT_ROOT / "README.md"


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md and the docs (or only compare them, with --check); returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only report the files that differ from their rendering")
    args = ap.parse_args(argv)
    stale = []
    for path in doc_paths():
        text = path.read_text()
        new = render_text(text)
        if new != text:
            stale.append(_shown(path))
            if not args.check:
                path.write_text(new)
    if args.check:
        print("README and docs agree with the result files" if not stale else f"stale: {', '.join(stale)}")
        return 1 if stale else 0
    print(f"rendered {', '.join(DOCS)}" + (f" (changed: {', '.join(stale)})" if stale else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
