"""The README's result tables, rendered from the committed CSVs: one function per table, one place that fills them in.

README.md holds each table between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; `render_readme` replaces what
is between the markers with `TABLES[NAME]()`, and `tests/test_readme.py` fails when the README and the CSVs
disagree. Run from the repository root after `bash run_all.sh`: `python3 -m scripts.render_readme` rewrites the README
(`--check`: exit 1 and name the tables that disagree, changing nothing).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from pruning_utils.paths import PROJECT_ROOT, ablation_dir
from pruning_utils.pipeline.stages import STAGES

MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def _csv(name: str) -> pd.DataFrame:
    path = ablation_dir() / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `bash run_all.sh` (or the benchmark that writes it) first")
    return pd.read_csv(path)


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
            "fidelity_ppl", "fidelity_tokens"]
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
            "flops_reduction_pct", "ppl", "ppl_change_pct", "eval_tokens", "fidelity_ppl", "kl_to_baseline"]
    return _md(_present(df[df["variant"].str.count("-").ne(2)], cols), 3)


def head_pruning() -> str:
    """Return notebook 02's reconstruction options (screen) and its saved model (full evaluation)."""
    return _saved("head_pruning")


def mlp_pruning() -> str:
    """Return notebook 03's reconstruction options (screen) and its saved models (full evaluation)."""
    return _saved("mlp_pruning")


def recovery() -> str:
    """Return the LoRA recovery rows: held-out loss and perplexity before / after (its timings stay in the CSV)."""
    cols = ["model", "steps", "tokens_seen", "loss", "data", "heldout_loss_before", "heldout_loss_after", "ppl_before",
            "ppl_after", "damage_recovered_pct", "fidelity_before", "fidelity_after", "semantic_before",
            "semantic_after"]
    return _md(_present(_csv("recovery"), cols), 3)


def final_eval() -> str:
    """Return the final table: every variant measured the same way."""
    cols = ["variant", "params_non_embedding", "reduction_pct", "head_frac_removed", "mlp_frac_removed",
            "flops_reduction_pct", "size_mb", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline",
            "semantic_cosine", "semantic_ci_low", "semantic_ci_high", "first_sentence_match"]
    return _md(_present(_csv("final_eval"), cols), 3)


def final_cost() -> str:
    """Return the final table's speed and memory columns (timing columns: they vary from run to run)."""
    cols = ["variant", "prefill_ms", "prefill_ms_iqr", "decode_tok_s", "latency_noisy", "peak_memory_mb"]
    return _md(_csv("final_eval")[cols], 1)


def calibration_sources() -> str:
    """Return `benchmarks/calibration_sources.py`: per calibration source and shape, in-domain / fidelity PPL, KL."""
    df = _csv("calibration_sources")
    df["calibration_source"] = df["calibration_source"].fillna("").replace("", "(unpruned)")
    table = df.pivot_table(index="calibration_source", columns="shape",
                           values=["ppl", "fidelity_ppl", "kl_to_baseline"], sort=False)
    table.columns = [f"{shape} {metric}" for metric, shape in table.columns]
    order = [f"{s} {m}" for s in ("baseline", "S1", "S2", "S3") for m in ("ppl", "fidelity_ppl", "kl_to_baseline")]
    return _md(table[[c for c in order if c in table.columns]].reset_index(), 3)


def recovery_sources() -> str:
    """Return `benchmarks/recovery_sources.py`: each recovery (loss on data) by perplexity, fidelity and retention."""
    if not (ablation_dir() / "recovery_sources.csv").exists():
        return "_No `recovery_sources.csv` yet: `python3 -m benchmarks.recovery_sources` writes it._\n"
    cols = ["model", "loss", "data", "ppl", "fidelity_ppl", "kl_to_baseline", "semantic_cosine", "semantic_ci_low",
            "semantic_ci_high", "first_sentence_match", "tokens_seen"]
    return _md(_csv("recovery_sources")[cols], 3)


def run_time() -> str:
    """Return the measured minutes of the install and of each stage."""
    return _md(_csv("run_time")[["stage", "notebook", "minutes"]], 1)


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
    """Return `benchmarks/recovery_budget.py`'s rows (its timings stay in the CSV)."""
    df = _csv("recovery_budget")
    return _md(df[[c for c in df.columns if not c.endswith(("_minutes", "_per_s"))]], 3)


def _memory_json() -> dict:
    import json

    path = PROJECT_ROOT / "results" / "benchmarks" / "memory_scale.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python3 -m benchmarks.memory_scale` first")
    return json.loads(path.read_text())


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
    return _md(df[cols], 2)


def _optional(name: str, stage: str, cols: list[str], digits: int = 3) -> str:
    """Return the `cols` a stage's CSV has, or a note when the stage has not written it yet."""
    if not (ablation_dir() / f"{name}.csv").exists():  # an encoder stage runs only with its profile (or switch)
        how = "--profile encoder" if any(s.key == stage and s.encoder for s in STAGES) else f"--only {stage}"
        return f"_No `{name}.csv` yet: `bash run_all.sh {how}` writes it._\n"
    return _md(_present(_csv(name), cols), digits)


def adaptive_summary() -> str:
    """Return the adaptive-runtime controllers on the held-out prompts (notebook 05)."""
    return _optional("adaptive_summary", "05", [
        "controller", "n_prompts", "reward", "reward_ppl_only", "tokens_per_s", "speedup_pct", "latency_s", "retention",
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
    """Return `benchmarks/int8_smoothing.py`: dynamic INT8 of the embedded model, plain / smoothed / down_proj fp32."""
    df = _csv("int8_smoothing")
    return _md(_present(df, ["option", "ppl", "ppl_change_pct", "decode_tok_s", "speedup", "build_s"]), 2)


def encoder_glue() -> str:
    """Return the encoder classifier variants (notebook 07)."""
    return _optional("encoder_glue", "07", [
        "variant", "task", "accuracy", "f1", "params", "params_non_embedding", "reduction_pct", "size_mb",
        "ms_per_batch", "samples_per_s"])


TABLES: dict[str, Callable[[], str]] = {
    "baseline": baseline, "head_sweep": head_sweep, "mlp_sweep": mlp_sweep, "head_pruning": head_pruning,
    "mlp_pruning": mlp_pruning, "recovery": recovery, "final_eval": final_eval, "final_cost": final_cost,
    "run_time": run_time, "quality_benchmark": quality_benchmark, "recovery_budget": recovery_budget,
    "memory_scale": memory_scale, "memory_extrapolation": memory_extrapolation,
    "calibration_sources": calibration_sources, "recovery_sources": recovery_sources,
    "compression_methods": compression_methods, "adaptive_summary": adaptive_summary,
    "adaptive_levels": adaptive_levels, "encoder_glue": encoder_glue, "calibration_size": calibration_size,
    "int8_smoothing": int8_smoothing, "search_heldout": search_heldout,
    "thorough_profile": thorough_profile,
}
# tables whose numbers are timings: they change with every run, so the agreement test does not pin them
TIMING_TABLES = ("final_cost", "run_time", "compression_methods", "adaptive_summary", "adaptive_levels", "encoder_glue",
                 "calibration_size", "int8_smoothing", "search_heldout", "thorough_profile")


def render_readme(text: str) -> str:
    """Return the README text with every marked table re-rendered from the CSVs (unknown names raise)."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"README marks an unknown table '{name}'; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + m.group(4)

    return MARKER.sub(fill, text)


def marked_tables(text: str) -> dict[str, str]:
    """Return `{name: body}` of every marked table in a README text."""
    return {m.group("name"): m.group("body") for m in MARKER.finditer(text)}


def readme_path() -> Path:
    """Return the project's README.md."""
    return PROJECT_ROOT / "README.md"


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md (or only compare it, with --check); returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only report the tables that differ from the CSVs")
    args = ap.parse_args(argv)
    path = readme_path()
    text = path.read_text()
    new = render_readme(text)
    stale = [n for n, body in marked_tables(new).items() if marked_tables(text).get(n) != body]
    if args.check:
        print("README tables agree with the CSVs" if not stale else f"stale README tables: {', '.join(stale)}")
        return 1 if stale else 0
    path.write_text(new)
    print(f"rendered {len(marked_tables(new))} tables into {path}"
          + (f" (changed: {', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
