# %% [markdown]
# # 06 · Final evaluation: quality vs compression vs latency
# Every variant is measured the same way in this one run: perplexity, semantic retention of greedy answers
# (all-MiniLM-L6-v2 cosine to the baseline's answers, plus exact match), optional zero-shot accuracy
# (lm-evaluation-harness), parameters, FLOPs/token, checkpoint size, peak memory, prefill latency and decode speed.

# %%
import pandas as pd
from IPython.display import Markdown, display

from pruning_utils.compress import compare, gguf_export
from pruning_utils.data import heldout, sources
from pruning_utils.measure import evaluation, final_eval
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list

names = compare.available_variants(as_list(VARIANTS) + as_list(EXTRA_VARIANTS), DEVICE)
for name in names[1:]:
    read_checkpoint_meta(name)  # a missing variant fails here, naming the stage that writes it
gguf_export.parse_exports(GGUF_EXPORT)  # a bad GGUF type fails here, before any work
if ZERO_SHOT:
    evaluation.require_lm_eval()  # fails early with the install command when lm-eval is missing
prompts = evaluation.load_instructions()[:N_PROMPTS]
judge = evaluation.SemanticJudge()
# the unpruned model: on the host where it does not fit beside a variant (RUN.reference_host: its cost row is then
# baseline.csv's); a KL measured here is walked layer by layer on the device first, before any variant is there
base_model, tok = load_model(MODEL, device=RUN.reference_device, dtype=RUN.dtype)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
RUN.prepare_reference(base_model, chunks)
fidelity = sources.fidelity_chunks(base_model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
prose = heldout.heldout_chunks(tok, n_tokens=HELDOUT_TOKENS)  # general English prose (pruning_utils/data/heldout.py)
assert names[0] == "baseline", "VARIANTS must start with 'baseline' (the reference of every comparison)"

# %%
rows, answers = [], {}
recorded_baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()  # perplexity is reused, cost measured here
for name in names:
    model, t = (base_model, tok) if name == "baseline" else load_pruned(name, device=DEVICE, dtype=DTYPE)
    row, answers[name] = final_eval.final_row(
        name, model, t, chunks, source_model=MODEL, recorded_baseline=recorded_baseline,
        reference=rows[0] if rows else None, prompts=prompts, judge=judge, reference_answers=answers.get("baseline"),
        max_new_tokens=MAX_NEW_TOKENS, memory_kw=MEMORY, latency_kw=LATENCY, fidelity_chunks=fidelity,
        heldout_chunks=prose, reference_model=base_model, cost_from_record=RUN.reference_host, **RUN.measure_kw,
        zero_shot_tasks=as_list(ZERO_SHOT_TASKS) if ZERO_SHOT else None, zero_shot_limit=ZERO_SHOT_LIMIT)
    rows.append(row)
    del model  # a variant's weights go; the baseline's name only (base_model keeps it)
final = pd.DataFrame(rows)
results.write_csv(final, OUT / "final_eval.csv")
cols = ["variant", "params_non_embedding", "reduction_pct", "head_frac_removed", "mlp_frac_removed",
        "flops_reduction_pct", "size_mb", "ppl", "ppl_change_pct", "fidelity_ppl", "heldout_ppl", "kl_to_baseline",
        "semantic_cosine",
        "semantic_ci_low", "semantic_ci_high", "first_sentence_match", "prefill_ms", "decode_tok_s",
        "latency_noisy", "peak_memory_mb"]
cols += [c for c in final.columns if c.startswith("zs_")]
display(Markdown(final[cols].round(3).to_markdown(index=False)))

# %% [markdown]
# ## What the compression bought and what it cost

# %%
results.save_plot(plots.pareto(final, "params_non_embedding", "ppl", title="quality vs non-embedding parameters"),
                  PLOTS / "pareto_params.png")
results.save_plot(plots.pareto(final, "params_non_embedding", "fidelity_ppl",
                               title="fidelity (perplexity on the unpruned model's own samples) vs parameters"),
                  PLOTS / "pareto_fidelity.png")
results.save_plot(plots.pareto(final, "prefill_ms", "ppl", title="quality vs prefill latency"),
                  PLOTS / "pareto_latency.png")
results.save_plot(plots.pareto(final, "size_mb", "ppl", title="quality vs size on disk"), PLOTS / "pareto_size.png")
results.save_plot(plots.stage_bars(final, ["ppl", "fidelity_ppl", "heldout_ppl", "semantic_cosine",
                                           "params_non_embedding", "prefill_ms", "decode_tok_s"]),
                  PLOTS / "stage_bars.png")

# %% [markdown]
# ## A few answers side by side

# %%
last = names[-1]
evaluation.retention_table(prompts, answers["baseline"], answers[last], n=5)

# %% [markdown]
# ## Leaving Python: GGUF files for llama.cpp and Ollama
# `GGUF_EXPORT` names the variants to write (empty: none), e.g. `mix_pruned_lora:q8_0`. GGUF holds one head count and
# one MLP width for all layers: a non-uniform plan, an INT8 or a low-rank checkpoint is listed with the reason it was
# refused. `benchmarks/llamacpp_speed.py` runs such files in llama.cpp and times them.

# %%
if GGUF_EXPORT:
    exported = pd.DataFrame(gguf_export.export_variants(GGUF_EXPORT, MODEL))
    display(Markdown(exported.to_markdown(index=False)))
