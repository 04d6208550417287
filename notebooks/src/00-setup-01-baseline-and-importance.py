# %% [markdown]
# # 00 · Set-up, baseline and importance
# Loads the model, measures the baseline (quality, size, FLOPs, latency, memory), then scores every attention head and
# MLP neuron under each importance criterion in shared calibration passes. Scores are saved under `results/importance/`
# for the pruning notebooks.

# %%
import time

import pandas as pd

from pruning_utils.data import heldout, sources
from pruning_utils.measure import metrics
from pruning_utils.measure.variants import measure_variant
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list
from pruning_utils.prune import importance
from pruning_utils.prune.scores import save_scores

model, tok = load_model(MODEL, device=RUN.load_device, dtype=RUN.dtype)  # on the host in offload mode
env = metrics.environment_info(model)
pd.Series(env)

# %% [markdown]
# ## Baseline

# %%
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
# held-out text sampled from this model (cached for later stages): the domain-neutral fidelity measure
fidelity = sources.fidelity_chunks(model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
# general English prose no stage calibrates, searches or selects on (pruning_utils/data/heldout.py)
prose = heldout.heldout_chunks(tok, n_tokens=HELDOUT_TOKENS)
row = measure_variant(model, chunks, variant="baseline", source_model=MODEL,
                      memory_kw=MEMORY and dict(spec=MODEL, **MEMORY), compute_device=RUN.compute_device,
                      fidelity_chunks=fidelity, heldout_chunks=prose, reference_model=model,
                      logits_rows=RUN.logits_rows)
lat = metrics.latency(model, **LATENCY)
row.update(prefill_ms=lat["prefill_ms_median"], prefill_ms_iqr=lat["prefill_ms_iqr"],
           decode_tok_s=lat["decode_tok_s_median"], load_avg=lat["load_avg"], latency_noisy=lat["latency_noisy"])
results.write_csv([row], OUT / "baseline.csv")
results.write_json({"model": MODEL, "text_source": TEXT_SOURCE, "ppl": row["ppl"], "tokens": row["eval_tokens"],
                    "fidelity_ppl": row["fidelity_ppl"], "fidelity_tokens": row["fidelity_tokens"],
                    "heldout_ppl": row["heldout_ppl"], "heldout_tokens": row["heldout_tokens"],
                    "seq_len": EVAL_SEQ_LEN, "env": env}, OUT / "perplexity_baseline.json")
results.write_json({"model": MODEL, **lat, "peak_memory_mb": row["peak_memory_mb"], "env": env},
                   OUT / "latency_baseline.json")
pd.DataFrame([row]).T.rename(columns={0: "baseline"})

# %% [markdown]
# ## Importance of every head and neuron

# %%
t0 = time.time()
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=N_CALIB, seq_len=CALIB_SEQ_LEN, seed=SEED,
                                      model=model, selfgen_kw=SELFGEN)
print(f"calibration windows ({TEXT_SOURCE}) in {time.time() - t0:.0f} s")
t0 = time.time()
# NeuronRank TF-IDF++ (tfidf, tfidf_topic): |W_j|^alpha * TF_j^beta * IDF_j^gamma, topics as documents; the scores'
# provenance (saved with them) records the settings, and the sweep rows of 02 / 03 show them (criterion_options)
scores = importance.compute_importance(model, windows, as_list(CRITERIA), seed=SEED, compute_device=RUN.compute_device,
                                       semantic_max_windows=SEMANTIC_MAX_WINDOWS, semantic_seq_len=SEMANTIC_SEQ_LEN,
                                       refit_windows=SEMANTIC_REFIT_WINDOWS, refit_ridge=RIDGE_RATIO,
                                       tfidf_alpha=TFIDF_ALPHA, tfidf_beta=TFIDF_BETA, tfidf_gamma=TFIDF_GAMMA,
                                       n_topics=TFIDF_TOPICS)
seconds = time.time() - t0
folder = save_scores(scores, paths.results_dir() / "importance")
results.write_json({"criteria": as_list(CRITERIA), "seconds": seconds, "windows": list(windows.shape),
                    "model": MODEL, "env": env}, paths.results_dir() / "importance" / "importance_run.json")
print(f"{len(scores)} criteria in {seconds / 60:.1f} min -> {folder}")
(pd.read_csv(paths.results_dir() / "importance" / "importance_summary.csv")
 .groupby(["criterion", "kind"])["mean"].describe())

# %%
fig = plots.importance_heatmaps(scores, "heads")
results.save_plot(fig, paths.results_dir() / "importance" / "heads_heatmap.png")
fig = plots.importance_heatmaps(scores, "neurons")
results.save_plot(fig, paths.results_dir() / "importance" / "neurons_heatmap.png")

# %% [markdown]
# Heat maps are rank-normalised within each layer; `results/importance/*.png` holds them.
