# %% [markdown]
# # 03b · Other ways to compress, side by side
# At the −25% non-embedding count of `models/mix_pruned/` (S3, read from its metadata): depth pruning (block influence
# and bypass-damage layer scores, plain and with the stock-loadable `down_proj` refit), low-rank SVD (plain,
# activation-aware, and the RMT rank as a row), Wanda unstructured / 2:4 sparsity with a low-rank residual fix or
# a truncated SVD of the pruned weight (Wanda+SVD), and torchao INT8 (COMPRESS_INT8_MODE) on the baseline and stacked
# on each pruned checkpoint. Candidates are screened on the short evaluation text; the best of each method is saved
# under `models/` and measured on the full text with latency and memory → `compression_methods.csv`.

# %%
import time

import pandas as pd

from pruning_utils.compress import compare
from pruning_utils.data import sources
from pruning_utils.measure.variants import measure_variant
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list

model, tok = load_model(MODEL, device=DEVICE, dtype=DTYPE)
baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=COMPRESS_CALIB_WINDOWS, seq_len=CALIB_SEQ_LEN,
                                      seed=SEED, model=model, selfgen_kw=SELFGEN)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
sweep_chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
# the fidelity set and held-out prose notebook 00 measured the baseline on: short for the screens (as notebook 02's
# sweeps), whole for the saved variants (with KL to the baseline)
screen_sets, saved_sets = compare.baseline_sets(model, tok, baseline, seed=SEED, selfgen_kw=SELFGEN,
                                                screen_tokens=SWEEP_EVAL_MAX_TOKENS)
target = compare.target_params(COMPRESS_TARGET_FROM)
SCREEN = dict(source_model=MODEL, **screen_sets)
# the screens' changes are against the unpruned model on the same short text, the saved rows' against the full one
SCREEN["reference"] = measure_variant(model, sweep_chunks, variant="baseline", **SCREEN)
SAVE = dict(reference=baseline, latency_kw=LATENCY, memory_kw=MEMORY, source_model=MODEL, reference_model=model,
            **saved_sets)
rows, t0 = [], time.time()
print(f"target: {target:,} non-embedding parameters "
      f"({100 * (1 - target / baseline['params_non_embedding']):.1f}% fewer)")

# %% [markdown]
# ## Depth pruning: whole decoder layers → `models/depth_pruned/` (stock `from_pretrained`)

# %%
cands = list(compare.depth_candidates(model, windows, sweep_chunks, target, as_list(COMPRESS_DEPTH_CRITERIA),
                                      semantic_windows=COMPRESS_DEPTH_SEMANTIC_WINDOWS, **SCREEN))
rows += [r for r, _ in cands]
row, best = compare.best(cands)
rows.append(compare.save_measured(best, tok, "depth_pruned", row, chunks, **SAVE))
del cands, best
pd.DataFrame(rows)[["variant", "layers", "params_non_embedding", "ppl", "eval_tokens", "note"]]

# %% [markdown]
# ## Low-rank SVD at the same count → `models/lowrank_pruned/` (reloads with `load_pruned`)

# %%
cands = list(compare.lowrank_candidates(model, windows, sweep_chunks, target, as_list(COMPRESS_LOWRANK_METHODS),
                                        **SCREEN))
rows += [r for r, _ in cands]
row, best = compare.best([c for c in cands if c[0]["form"] != "rmt"])
rows.append(compare.save_measured(best, tok, "lowrank_pruned", row, chunks, **SAVE))
del cands, best
pd.DataFrame(rows)[["variant", "params_non_embedding", "ppl", "eval_tokens", "note"]].tail(5)

# %% [markdown]
# ## Wanda sparsity + low-rank → `models/hybrid_pruned/` (the best screen of either form)
# `residual`: the sparse weight plus a low-rank SVD of what the sparsity removed (adds parameters); `svd`
# (Wanda+SVD): the truncated SVD of the pruned weight replaces it, at the count above.

# %%
hyb_rows, (row, best) = compare.screen(compare.hybrid_candidates(
    model, windows, sweep_chunks, as_list(COMPRESS_HYBRID_SPARSITY), COMPRESS_HYBRID_RANK,
    forms=as_list(COMPRESS_HYBRID_FORMS), target=target, **SCREEN))
rows += hyb_rows
rows.append(compare.save_measured(best, tok, "hybrid_pruned", row, chunks, **SAVE))
del best
pd.DataFrame(rows)[["variant", "params_non_embedding", "nonzero_params_non_embedding", "ppl", "eval_tokens",
                    "note"]].tail(len(hyb_rows) + 1)

# %% [markdown]
# ## INT8 (torchao) on the baseline and stacked on each pruned model → `models/<base>_int8/`

# %%
int8_kw = dict(mode=COMPRESS_INT8_MODE, keep_fp32=as_list(COMPRESS_INT8_KEEP_FP32))
if COMPRESS_INT8_ALPHA is not None:  # move activation outliers into the weights (16 of the calibration windows)
    int8_kw.update(smooth_alpha=COMPRESS_INT8_ALPHA, smooth_windows=windows[:16])
for base in as_list(COMPRESS_INT8_BASES):
    kw = dict(model=model, tok=tok) if base == "baseline" else {}
    rows.append(compare.int8_row(base, next(model.parameters()).device, chunks, **kw, **int8_kw, **SAVE))
table = compare.table(rows)
results.write_csv(table, OUT / "compression_methods.csv")
print(f"{len(table)} rows in {(time.time() - t0) / 60:.1f} min")
table[["variant", "saved", "params_non_embedding", "size_mb", "ppl", "eval_tokens", "prefill_ms", "decode_tok_s",
       "peak_memory_mb"]].round(2)

# %%
saved = table[table["saved"].eq(True)]
results.save_plot(plots.pareto(saved, "size_mb", "ppl", title="compression methods: quality vs size on disk"),
                  OUT / "compression_methods.png")
