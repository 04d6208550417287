"""Prints the markdown tables the README quotes, straight from the committed result files.

Run from the repository root: `python3 -m scripts.summarize_results`.
"""
import json
import sys

import pandas as pd

from pruning_utils.paths import RESULTS_DIR

OUT = RESULTS_DIR / "ablation_studies"


def md(df: pd.DataFrame, digits: int = 2) -> str:
    return df.round(digits).to_markdown(index=False)


def sweep_table(name: str, rate_col: str) -> str:
    df = pd.read_csv(OUT / f"{name}.csv")
    if rate_col not in df:  # tables written before the rate columns were renamed `*_requested`
        rate_col = rate_col.removesuffix("_requested")
    sweep = df[df["reconstruction"].eq("none") & df["variant"].str.count("-").eq(2)]
    pivot = sweep.pivot_table(index="criterion", columns=rate_col, values="ppl").sort_values(sweep[rate_col].min())
    pivot.columns = [f"PPL @ {rate_col}={c}" for c in pivot.columns]
    return pivot.round(1).reset_index().to_markdown(index=False)


def quality_tables(q: pd.DataFrame) -> list[str]:
    """Return the screen grid (criterion x shape x refit) and the full-evaluation table with the peers' gaps."""
    from benchmarks.quality import PEERS, TARGETS

    grid = q[q["screen"] & q["role"].eq("grid")]
    pivot = grid.pivot_table(index="criterion", columns=["shape", "reconstruction"], values="ppl")
    pivot = pivot.sort_values(pivot.columns[-1])
    pivot.columns = [f"{s} {r}" for s, r in pivot.columns]
    base = q[q["role"].eq("baseline") & q["screen"]]["ppl"].iloc[0]
    out = [f"### Quality benchmark: screen perplexity (first {int(grid['eval_tokens'].iloc[0])} eval tokens, "
           f"baseline {base:.2f})\n" + pivot.round(1).reset_index().to_markdown(index=False)]
    extras = q[q["screen"] & ~q["role"].isin(["grid", "baseline"])]
    cols = ["shape", "criterion", "reconstruction", "allocation", "order", "ridge_ratio", "role", "ppl"]
    out.append("### Quality benchmark: extra recipes (screen)\n" + md(extras[cols], 3))
    full = q[~q["screen"]].sort_values(["shape", "ppl"]).copy()
    full["target"] = full["shape"].map(TARGETS)
    full["best peer"] = full["shape"].map(lambda s: ", ".join(f"{k} {v}" for k, v in PEERS.get(s, {}).items()))
    cols = ["shape", "criterion", "reconstruction", "allocation", "order", "role", "params_non_embedding",
            "reduction_pct", "ppl", "target", "best peer"]
    out.append(f"### Quality benchmark: full evaluation ({int(full['eval_tokens'].iloc[0])} tokens)\n"
               + md(full[cols], 2))
    return out


def main() -> None:
    sections = []
    base = pd.read_csv(OUT / "baseline.csv")
    sections.append("### Baseline\n" + md(base[["variant", "params_total", "params_non_embedding", "flops_per_token",
                                                 "size_mb", "ppl", "eval_tokens", "prefill_ms", "decode_tok_s",
                                                 "peak_memory_mb"]]))
    sections.append("### Head pruning: criteria at equal rate (screen eval)\n" + sweep_table("head_pruning", "head_rate_requested"))
    sections.append("### MLP pruning: criteria at equal rate (screen eval)\n" + sweep_table("mlp_pruning", "mlp_rate_requested"))
    cols = ["variant", "criterion", "reconstruction", "query_heads", "intermediate", "reduction_pct",
            "flops_reduction_pct", "ppl", "ppl_change_pct", "eval_tokens", "prefill_ms", "decode_tok_s"]
    for name in ("head_pruning", "mlp_pruning"):
        df = pd.read_csv(OUT / f"{name}.csv")
        sections.append(f"### {name}: reconstruction options and saved models\n"
                        + md(df[df["variant"].str.count("-").ne(2)][cols]))
    if (OUT / "recovery.csv").exists():
        sections.append("### Recovery (LoRA, merged)\n" + md(pd.read_csv(OUT / "recovery.csv")))
    if (OUT / "final_eval.csv").exists():
        final = pd.read_csv(OUT / "final_eval.csv")
        cols = ["variant", "params_non_embedding", "reduction_pct", "flops_reduction_pct", "size_mb", "ppl",
                "semantic_cosine", "exact_match", "prefill_ms", "decode_tok_s", "peak_memory_mb"]
        sections.append("### Final evaluation\n" + md(final[cols], 3))
    if (OUT / "quality_benchmark.csv").exists():
        sections += quality_tables(pd.read_csv(OUT / "quality_benchmark.csv"))
    if (OUT / "recovery_budget.csv").exists():
        sections.append("### Recovery budget (S3)\n" + md(pd.read_csv(OUT / "recovery_budget.csv"), 3))
    for name in ("importance_cost", "prefill_speedup"):
        path = RESULTS_DIR / "benchmarks" / f"{name}.json"
        if path.exists():
            d = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("env", "runs")}
            sections.append(f"### {name}\n```json\n{json.dumps(d, indent=1)}\n```")
    stages = RESULTS_DIR / "stages" / "last_run.json"
    if stages.exists():
        sections.append("### Run time\n```json\n" + stages.read_text() + "\n```")
    print("\n\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
