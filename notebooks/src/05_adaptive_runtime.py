# %% [markdown]
# # 05 · Adaptive runtime: how much to prune, chosen per prompt
# One set of weights serves every level: heads (within each KV group) and MLP neurons are reordered by importance so
# each level is a prefix slice, switched in about a millisecond and restored after every prompt
# (`pruning_utils/adaptive/nested_model.py`). A controller picks the level from the prompt's complexity score and the
# machine load (simulated and seeded unless `ADAPTIVE_LOAD='live'`): a rule table, a LinUCB contextual bandit and a DQN
# (`pruning_utils/adaptive/dqn.py`, or the saved policy `ADAPTIVE_DQN_POLICY`) trained on 80% of a prompt CSV, and the
# fixed extremes. Reward = 0.6 x tokens/s (normalised to a speed target) -
# 0.4 x perplexity / 10 - w x (1 - semantic retention), where w is the smallest weight whose trained policy keeps
# `ADAPTIVE_MIN_RETENTION` of the unpruned answers' meaning on the training prompts (w = 0: the issue's reward;
# `pruning_utils/adaptive/controller.py`). Everything is measured on the held-out 20%. With `ADAPTIVE_MODEL` a pruned
# checkpoint (e.g. `mix_pruned`) takes the unpruned model's place: every level, and "unpruned" below, is relative to it.

# %%
import time

import numpy as np
from IPython.display import Markdown, display

from pruning_utils.adaptive import controller, experiment
from pruning_utils.data import sources
from pruning_utils.measure import evaluation, metrics
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list
from pruning_utils.prune.scores import load_scores

scores = load_scores(paths.results_dir() / "importance")[ADAPTIVE_CRITERION]  # of MODEL (notebook 00)
# ADAPTIVE_MODEL: a pruned checkpoint is the full level, its scores restricted to its plan (an 8B model's unpruned
# weights do not fit a T4)
model, tok, scores = experiment.full_level(MODEL, ADAPTIVE_MODEL, scores, device=DEVICE, dtype=DTYPE)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
base_ppl = metrics.perplexity(model, chunks)["ppl"]
nested = experiment.build_nested(model, tok, scores, ADAPTIVE_LEVELS, text_source=TEXT_SOURCE, n_calib=N_CALIB,
                                 seq_len=CALIB_SEQ_LEN, seed=SEED, refit=ADAPTIVE_REFIT, int8_mode=ADAPTIVE_INT8_MODE,
                                 int8_keep_fp32=as_list(ADAPTIVE_INT8_KEEP_FP32), int8_alpha=ADAPTIVE_INT8_ALPHA)
print(f"{len(nested.levels)} levels; refit {nested.refit_s:.1f} s; memory {nested.memory()}")

# %% [markdown]
# ## The prompt set and its seeded 80/20 split

# %%
if not ADAPTIVE_PROMPTS:
    results.write_csv(controller.prompt_pool(), OUT / "adaptive_prompts.csv")
pool = controller.load_prompt_csv(ADAPTIVE_PROMPTS or OUT / "adaptive_prompts.csv")  # any CSV with a `prompt` column
train, test = experiment.split_prompts(pool, tok, model if ADAPTIVE_ENTROPY else None, seed=SEED, n=ADAPTIVE_N_PROMPTS)
print(f"{len(train)} training and {len(test)} test prompts of {len(pool)}")
test[["id", "prompt", "n_tokens", "code", "math", "entities", "clauses", "entropy", "complexity"]].head(8)

# %% [markdown]
# ## Every level on the training prompts: speed, quality, cache, switch time

# %%
t0 = time.time()
judge = evaluation.SemanticJudge()  # retention of every level's answer vs the unpruned one
outcomes = controller.measure_outcomes(nested, tok, train, max_new_tokens=ADAPTIVE_NEW_TOKENS, judge=judge)
results.write_csv(outcomes, OUT / "adaptive_outcomes.csv")  # (training prompt, level): what the bandit learns from
levels_table = experiment.level_table(nested, outcomes, chunks, refit=ADAPTIVE_REFIT)
results.write_csv(levels_table, OUT / "adaptive_levels.csv")
print(f"{len(outcomes)} (prompt, level) outcomes in {(time.time() - t0) / 60:.1f} min; base chunk ppl {base_ppl:.2f}")
levels_table.round(3)

# %% [markdown]
# ## Controllers: fixed extremes, rules, a bandit and a DQN trained on the 80%

# %%
tps_ref = float(outcomes[outcomes["level"] == "none"]["tokens_per_s"].median())
load_range = experiment.parse_load(ADAPTIVE_LOAD)
# ADAPTIVE_MIN_RETENTION None: the reward; else the smallest retention weight whose policy keeps it
policy, retention_weight, grid = experiment.train_policy(
    outcomes, train, len(nested.levels), tps_ref, ADAPTIVE_MIN_RETENTION, epochs=ADAPTIVE_EPOCHS, seed=SEED,
    load_range=load_range or (0.0, 0.9), target=ADAPTIVE_TARGET, alpha=ADAPTIVE_ALPHA)
if grid is not None:
    results.write_csv(grid, OUT / "adaptive_retention_weight.csv")
    display(Markdown(grid.round(3).to_markdown(index=False)))
# the DQN learns the same reward (w included) from the same outcomes; ADAPTIVE_DQN_POLICY: load it instead
dqn = experiment.dqn_policy(outcomes, train, nested.levels, tps_ref, retention_weight, ADAPTIVE_DQN,
                            ADAPTIVE_DQN_POLICY, ADAPTIVE_DQN_EPOCHS, SEED, load_range, ADAPTIVE_TARGET)
print(f"retention weight w = {retention_weight}; DQN policy: {dqn.path if dqn else 'off'}")
controllers = experiment.controllers(len(nested.levels), train, policy, dqn)
loads = experiment.held_out_loads(load_range, len(test), seed=SEED + 1)
experiment.training_rewards(policy, dqn)

# %% [markdown]
# ## Held-out 20%: latency, tokens/s, level, semantic retention, perplexity, reward

# %%
runtime, summary, live = experiment.held_out_evaluation(
    controllers, nested, tok, test, loads, tps_ref, retention_weight, live=ADAPTIVE_LIVE_EVAL,
    max_new_tokens=ADAPTIVE_NEW_TOKENS, target=ADAPTIVE_TARGET, judge=judge)
for name, table in (("adaptive_runtime", runtime), ("adaptive_summary", summary), ("adaptive_runtime_live", live)):
    table is None or results.write_csv(table, OUT / f"{name}.csv")  # live: ADAPTIVE_LIVE_EVAL, simulated load
display(Markdown(summary.round(3).to_markdown(index=False)))
print(experiment.verdict(summary, retention_weight))

# %%
results.save_plot(plots.scatter_trend(runtime, "complexity", "latency_s", title="inference time vs prompt complexity"),
                  OUT / "inference_time_vs_complexity.png")
results.save_plot(plots.scatter_trend(runtime.assign(log_ppl=np.log(runtime["ppl"])), "complexity", "log_ppl",
                                      title="quality (log perplexity of the unpruned answer) vs prompt complexity"),
                  OUT / "quality_vs_complexity.png")
results.save_plot(plots.pareto(summary, "latency_s", "ppl", label="controller",
                               title="controllers: quality vs latency"), OUT / "adaptive_pareto.png")

# %% [markdown]
# Rows of `adaptive_runtime.csv` are (controller, test prompt); `adaptive_summary.csv` has one row per controller;
# `adaptive_levels.csv` one per level. Outliers (Tukey's 1.5 IQR per controller) are left out of the scatter plots and
# counted in their legends.
