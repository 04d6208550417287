# %% [markdown]
# # 03 · MLP-neuron pruning, alone and on top of head pruning
# Neurons are removed from `gate_proj`/`up_proj` rows and `down_proj` columns. Two starting points: the baseline (MLP
# pruning alone → `models/mlp_pruned/`) and the head-pruned model (cumulative attention + MLP → `models/mix_pruned/`).

# %%
from pruning_utils.measure.mix import mix_variant, refit_locally
from pruning_utils.measure.variants import (
    SWEEP_KEY,
    measure_variant,
    neuronrank_screens,
    pruned_copy,
    screens,
)
from pruning_utils.model.checkpoint import read_checkpoint_meta, save_pruned
from pruning_utils.pipeline import plots, results
from pruning_utils.prune import local_refit, reconstruction
from pruning_utils.prune.search import main_plan

# %% [markdown]
# ## Screens: criteria side by side on the baseline (plain removal), then reconstruction options for the main criterion
# Both on the short text (`SWEEP_EVAL_MAX_TOKENS`): a ranking screen; the saved model below is measured in full.
# One layer-wise calibration pass (the Gram matrices of the refit projections' inputs) serves every one-shot refit of
# the unpruned model in this notebook, kept on the device or the host (`RUN.grams`); when memory is short each refit
# instead collects its own, one layer at a time (`streamed`: the same refit, one calibration pass per variant).

# %%
grams = (reconstruction.collect_grams(source.model, windows,
                                      which=["o_proj", "down_proj"],
                                      storage=RUN.grams_storage, device=RUN.compute_device)
         if RUN.hold_grams else None)
plan = main_plan(source.model, scores, mlp_criterion=MAIN_MLP_CRITERION, mlp_rate=MLP_RATE, grams=grams, **PLAN)
ref, rows, recon_rows = screens(source, scores, "neurons", as_list(CRITERIA), as_list(MLP_SWEEP, float), plan, windows,
                                as_list(RECON_OPTIONS), sweep_chunks, criterion=MAIN_MLP_CRITERION, rate=MLP_RATE,
                                stats=grams, **SCREEN)
sweep = pd.DataFrame(rows)
rows += recon_rows
sweep.pivot_table(index="criterion", columns="mlp_rate_requested", values="ppl").round(2)

# %%
pd.DataFrame(recon_rows)[["variant", "reconstruction", "intermediate", "ppl", "ppl_change_pct", "fidelity_ppl"]]

# %% [markdown]
# ## NeuronRank options (screens, plain removal)
# `MLP_PRUNING_LAST`: `MLP_RATE` of the neurons of only the last N decoder layers (`MAIN_MLP_CRITERION`), the earlier
# layers untouched. `LM_HEAD_RATE`: that fraction of the output matrix's rows removed (smallest L2 norm) with the
# vocabulary mapping kept: a removed token has probability 0, so the perplexity is infinite as soon as one evaluation
# target is such a token (`lm_head_unreachable_pct`). A model with tied embeddings keeps its whole input embedding and
# stores more parameters than before (`params_total`). Its decode speed is timed beside the unpruned model's.

# %%
neuronrank = neuronrank_screens(source, scores, sweep_chunks, criterion=MAIN_MLP_CRITERION, rate=MLP_RATE,
                                pruning_last=as_list(MLP_PRUNING_LAST, int), lm_head_rates=as_list(LM_HEAD_RATE, float),
                                reference=ref, latency_kw=LATENCY, **SCREEN)
rows += neuronrank
pd.DataFrame(neuronrank).reindex(columns=[
    "variant", "criterion_options", "intermediate", "params_total", "params_non_embedding", "flops_reduction_pct",
    "ppl", "ppl_change_pct", "lm_head_unreachable_pct", "decode_tok_s", "reference_decode_tok_s", "decode_change_pct"])

# %% [markdown]
# ## MLP pruning alone → `models/mlp_pruned/`

# %%
# `LOCAL_REFIT_STEPS` > 0: then Adam steps per pruned MLP on its own output error, gate/up rows with the down columns
# (held-out windows guard each layer); its bar ends with the layers' mean relative error before and after.
LOCAL = dict(steps=LOCAL_REFIT_STEPS, lr=LOCAL_REFIT_LR, seed=SEED, device=RUN.compute_device)
RECON_LABEL = local_refit.reconstruction_label(RECONSTRUCTION, LOCAL_REFIT_STEPS)
mlp_model = pruned_copy(source, plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                        ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
refit_locally(mlp_model, source, windows, LOCAL)
row = measure_variant(mlp_model, chunks, variant="mlp_pruned", source_model=MODEL, reference=baseline,
                      criterion=MAIN_MLP_CRITERION, allocation=ALLOCATION, reconstruction=RECON_LABEL,
                      mlp_rate_requested=MLP_RATE, compute_device=RUN.compute_device, **SAVED)
save_pruned(mlp_model, tok, "mlp_pruned", extra=row)
rows.append(row)
del mlp_model

# %% [markdown]
# ## Heads + MLP (the head-pruned model's heads, then neurons) → `models/mix_pruned/`
# By default one plan on the unpruned model removes the head-pruned model's heads and this notebook's neurons, refit
# one-shot from the Grams above (each refit matches the unpruned layer): the attention is then exactly the head-pruned
# model's. `MIX_RESCORE = True` instead rescores the neurons on the head-pruned model and refits them there (it changes
# what the MLPs see). The one-shot plan is the S3 recipe of `benchmarks/quality.py`, and it needs no second scoring or
# calibration pass. With `ALLOCATION = 'search'` the mix is searched from the unpruned model at the joint budget
# instead (heads and neurons together, trading one for the other).

# %%
head_row = read_checkpoint_meta("head_pruned")["extra"]
mix = mix_variant(source, scores, plan, windows, head_row=head_row, mlp_criterion=MAIN_MLP_CRITERION, mlp_rate=MLP_RATE,
                  plan_kw=PLAN, rescore=MIX_RESCORE, grams=grams, reconstruction=RECONSTRUCTION,
                  sequential=RECON_SEQUENTIAL, ridge_ratio=RIDGE_RATIO, device=RUN.compute_device, local=LOCAL)
row = measure_variant(mix, chunks, variant="mix_pruned", source_model=MODEL, reference=baseline,
                      criterion=f"{head_row['criterion']}+{MAIN_MLP_CRITERION}", allocation=ALLOCATION,
                      reconstruction=RECON_LABEL, head_rate_requested=head_row["head_rate_requested"],
                      mlp_rate_requested=MLP_RATE, compute_device=RUN.compute_device, **SAVED)
save_pruned(mix, tok, "mix_pruned", extra=row)
rows.append(row)
table = results.unique_rows(rows, SWEEP_KEY)  # the refit sweep's 'none' row is the criteria sweep's row
results.write_csv(table, OUT / "mlp_pruning.csv")
table[["variant", "criterion", "reconstruction", "mlp_rate_requested", "mlp_frac_removed", "intermediate",
       "reduction_pct", "flops_reduction_pct", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline"]].round(3)

# %%
fig = plots.metric_vs(sweep, "mlp_frac_removed", title="perplexity vs fraction of MLP channels removed")
results.save_plot(fig, OUT / "mlp_pruning_ppl_vs_rate.png")
fig = plots.metric_vs(sweep, "params_non_embedding", title="perplexity vs non-embedding params")
results.save_plot(fig, OUT / "mlp_pruning_ppl_vs_params.png")
