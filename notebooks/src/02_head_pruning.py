# %% [markdown]
# # 02 · Attention-head pruning (Q + O only, GQA-compatible)
# Query heads are removed from `q_proj` rows and `o_proj` columns; K/V stay, and every KV group keeps the same number
# of query heads. Criteria are compared at equal rates, then the main recipe (criterion + reconstruction) is saved to
# `models/head_pruned/`.

# %%
from pruning_utils.measure.variants import (
    SWEEP_KEY,
    measure_variant,
    pruned_copy,
    screens,
)
from pruning_utils.model.checkpoint import save_pruned
from pruning_utils.pipeline import plots, results
from pruning_utils.prune import reconstruction
from pruning_utils.prune.search import main_plan

# %% [markdown]
# ## Screens: criteria side by side (plain removal), then reconstruction options for the main criterion
# Both on the short text (`SWEEP_EVAL_MAX_TOKENS`): a ranking screen; the saved model below is measured in full.
# One layer-wise calibration pass (the Gram matrices of the refit projections' inputs) serves every one-shot refit of
# the unpruned model in this notebook, kept on the device or the host (`RUN.grams`); when memory is short each refit
# instead collects its own, one layer at a time (`streamed`: the same refit, one calibration pass per variant).

# %%
grams = (reconstruction.collect_grams(source.model, windows,
                                      which=["o_proj", "down_proj"] if ALLOCATION == "search" else ["o_proj"],
                                      storage=RUN.grams_storage, device=RUN.compute_device)
         if RUN.hold_grams else None)
plan = main_plan(source.model, scores, head_criterion=MAIN_HEAD_CRITERION, head_rate=HEAD_RATE, grams=grams, **PLAN)
ref, rows, recon_rows = screens(source, scores, "heads", as_list(CRITERIA), as_list(HEAD_SWEEP, float), plan, windows,
                                as_list(RECON_OPTIONS), sweep_chunks, criterion=MAIN_HEAD_CRITERION, rate=HEAD_RATE,
                                stats=grams, **SCREEN)
sweep = pd.DataFrame(rows)
rows += recon_rows
sweep.pivot_table(index="criterion", columns="head_rate_requested", values="ppl").round(2)

# %%
pd.DataFrame(recon_rows)[["variant", "reconstruction", "query_heads", "ppl", "ppl_change_pct", "fidelity_ppl"]]

# %% [markdown]
# ## Main head-pruned model (full evaluation) → `models/head_pruned/`
# Latency and memory of every saved variant are measured once, the same way, in notebook 06.

# %%
main = pruned_copy(source, plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                   ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
row = measure_variant(main, chunks, variant="head_pruned", source_model=MODEL, reference=baseline,
                      criterion=MAIN_HEAD_CRITERION, allocation=ALLOCATION, reconstruction=RECONSTRUCTION,
                      head_rate_requested=HEAD_RATE, compute_device=RUN.compute_device, **SAVED)
folder = save_pruned(main, tok, "head_pruned", extra=row)
rows.append(row)
table = results.unique_rows(rows, SWEEP_KEY)  # the refit sweep's 'none' row is the criteria sweep's row
results.write_csv(table, OUT / "head_pruning.csv")
table[["variant", "criterion", "reconstruction", "head_rate_requested", "head_frac_removed", "query_heads",
       "reduction_pct", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline"]].round(3)

# %%
fig = plots.metric_vs(sweep, "head_frac_removed", title="perplexity vs fraction of query heads removed")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_rate.png")
fig = plots.metric_vs(sweep, "params_non_embedding", title="perplexity vs non-embedding params")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_params.png")
