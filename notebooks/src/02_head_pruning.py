# %% [markdown]
# # 02 · Attention-head pruning (Q + O only, GQA-compatible)
# Query heads are removed from `q_proj` rows and `o_proj` columns; K/V stay, and every KV group keeps the same number
# of query heads. Criteria are compared at equal rates, then the main recipe (criterion + reconstruction) is saved to
# `models/head_pruned/`.

# %%
from pruning_utils.measure.variants import criteria_sweep, measure_variant, pruned_copy, reconstruction_sweep
from pruning_utils.model.checkpoint import save_pruned
from pruning_utils.pipeline import plots, results
from pruning_utils.prune import reconstruction
from pruning_utils.prune.search import main_plan

# %% [markdown]
# ## Criteria side by side (plain removal, no reconstruction)

# %%
ref = measure_variant(source.model, sweep_chunks, variant="baseline", source_model=MODEL,
                      compute_device=RUN.compute_device, fidelity_chunks=sweep_fidelity)
rows = criteria_sweep(source, scores, as_list(CRITERIA), as_list(HEAD_SWEEP, float), "heads", sweep_chunks,
                      allocation=ALLOCATION, reference=ref, source_model=MODEL, compute_device=RUN.compute_device,
                      fidelity_chunks=sweep_fidelity)
sweep = pd.DataFrame(rows)
sweep.pivot_table(index="criterion", columns="head_rate_requested", values="ppl").round(2)

# %% [markdown]
# ## Reconstruction options for the main criterion
# One layer-wise calibration pass (the Gram matrices of the refit projections' inputs) serves every one-shot refit of
# the unpruned model in this notebook, kept on the device or the host (`RUN.grams`); when memory is short each refit
# instead collects its own, one layer at a time (`streamed`: the same refit, one calibration pass per variant).

# %%
grams = (reconstruction.collect_grams(source.model, windows,
                                      which=["o_proj", "down_proj"] if ALLOCATION == "search" else ["o_proj"],
                                      storage=RUN.grams_storage, device=RUN.compute_device)
         if RUN.hold_grams else None)
plan = main_plan(source.model, scores, head_criterion=MAIN_HEAD_CRITERION, head_rate=HEAD_RATE, grams=grams, **PLAN)
recon_rows = reconstruction_sweep(source, plan, windows, as_list(RECON_OPTIONS), sweep_chunks, kind="heads",
                                  criterion=MAIN_HEAD_CRITERION, rate=HEAD_RATE, allocation=ALLOCATION,
                                  reference=ref, source_model=MODEL, stats=grams, sequential=RECON_SEQUENTIAL,
                                  ridge_ratio=RIDGE_RATIO, compute_device=RUN.compute_device,
                                  fidelity_chunks=sweep_fidelity)
rows += recon_rows
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
table = pd.DataFrame(rows)
results.write_csv(table, OUT / "head_pruning.csv")
table[["variant", "criterion", "reconstruction", "head_rate_requested", "head_frac_removed", "query_heads",
       "reduction_pct", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline"]].round(3)

# %%
fig = plots.metric_vs(sweep, "head_frac_removed", title="perplexity vs fraction of query heads removed")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_rate.png")
fig = plots.metric_vs(sweep, "params_non_embedding", title="perplexity vs non-embedding params")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_params.png")
