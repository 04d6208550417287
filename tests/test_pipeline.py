"""run_all.sh end to end on the smoke profile, from a clean copy of the checkout; a second run skips every stage."""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pruning_utils.measure.variants import VARIANT_COLUMNS
from pruning_utils.pipeline.stages import STAGES, StageFailed, resolve_parameters, run

ROOT = Path(__file__).resolve().parent.parent


def _clean_copy(dest: Path) -> Path:
    """Copy what a fresh clone holds (tracked and untracked-but-not-ignored files), nothing built or run."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if f.startswith(("results/", "models/")) and not f.endswith((".gitkeep", "README.md")):
            continue  # committed reference results must not satisfy the stages
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def _finite(df: pd.DataFrame, cols) -> None:
    for c in cols:
        assert df[c].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v)).all(), f"non-finite {c}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = _clean_copy(tmp_path_factory.mktemp("clone"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNE_", "PRUNING_"))}
    # stands in for `pip install -e` of the copy, without touching site-packages: the kernels import this copy's
    # package (PYTHONPATH comes before any installed one), and the runner points their outputs into the copy
    env.update(SKIP_INSTALL="1", HF_HUB_OFFLINE="1")
    first = subprocess.run(["bash", "run_all.sh", "--profile", "smoke"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Passed unknown parameter" not in first.stderr, (
        "the runner must pass only the parameters a notebook declares")
    second = subprocess.run(["bash", "run_all.sh", "--profile", "smoke"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return root, first.stdout, second.stdout


def test_every_stage_writes_its_outputs(smoke_run):
    root, _, _ = smoke_run
    for stage in STAGES:
        for out in stage.outputs:
            assert (root / out).exists(), f"stage {stage.key} did not write {out}"
        assert (root / "results" / "notebooks" / stage.notebook).exists()


def test_csvs_have_documented_columns_and_finite_values(smoke_run):
    root, _, _ = smoke_run
    out = root / "results" / "ablation_studies"
    numeric = ["params_total", "params_non_embedding", "reduction_pct", "flops_per_token", "size_mb", "ppl",
               "ppl_change_pct", "eval_tokens"]
    for name in ("baseline", "head_pruning", "mlp_pruning", "final_eval"):
        df = pd.read_csv(out / f"{name}.csv")
        assert set(VARIANT_COLUMNS) <= set(df.columns), f"{name}.csv lacks {set(VARIANT_COLUMNS) - set(df.columns)}"
        lm_head = df["variant"].str.startswith("lm-head-")
        _finite(df[~lm_head], numeric)
        # a pruned LM head cannot produce some targets: its perplexity is infinite exactly when it says so
        if lm_head.any():
            heads = df[lm_head]
            assert (heads["ppl"] == float("inf")).tolist() == (heads["lm_head_unreachable_pct"] > 0).tolist()
    mlp = pd.read_csv(out / "mlp_pruning.csv").set_index("variant")
    assert {"mlp-fluctuation-last1-0.25", "lm-head-magnitude-0.25"} <= set(mlp.index)  # NeuronRank's options (smoke)
    final = pd.read_csv(out / "final_eval.csv")
    assert list(final["variant"]) == ["baseline", "head_pruned", "mlp_pruned", "mix_pruned", "head_pruned_lora",
                                      "mix_pruned_lora", "baseline_int8", "mix_pruned_int8", "depth_pruned",
                                      "lowrank_pruned", "hybrid_pruned"]
    methods = pd.read_csv(out / "compression_methods.csv")
    saved = methods[methods["saved"]]
    assert set(VARIANT_COLUMNS) <= set(methods.columns) and methods["applicable"].all()
    _finite(saved, numeric + ["prefill_ms", "decode_tok_s", "peak_memory_mb"])
    assert set(saved["variant"]) == {"depth_pruned", "lowrank_pruned", "hybrid_pruned", "baseline_int8",
                                     "head_pruned_int8", "mlp_pruned_int8", "mix_pruned_int8"}
    by = saved.set_index("variant")
    assert by.loc["mix_pruned_int8", "size_mb"] == by["size_mb"].min()  # INT8 stacked on S3: the smallest
    _finite(final, ["prefill_ms", "decode_tok_s", "semantic_cosine", "exact_match", "peak_memory_mb"])
    assert final.loc[0, "semantic_cosine"] == pytest.approx(1.0, abs=1e-5)
    # INT8 keeps the count (1 byte each); the sparse hybrid keeps dense shapes (its zeros are counted in 03b's table)
    pruned = final.iloc[1:][~final["variant"].iloc[1:].isin(["baseline_int8", "hybrid_pruned"])]
    assert (pruned["params_non_embedding"] < final["params_non_embedding"].iloc[0]).all()
    assert final.set_index("variant").loc["baseline_int8", "size_mb"] < final.loc[0, "size_mb"]
    # the smoke profile takes the thorough recipe's path: obs heads, searched counts, checkpoints that record it
    from pruning_utils.model.checkpoint import read_plan

    for csv, variant in (("head_pruning", "head_pruned"), ("mlp_pruning", "mlp_pruned"), ("mlp_pruning", "mix_pruned")):
        row = pd.read_csv(out / f"{csv}.csv").set_index("variant").loc[variant]
        assert row["allocation"] == "search", variant
        assert "search" in read_plan(root / "models" / variant).provenance, variant
    assert pd.read_csv(out / "head_pruning.csv").set_index("variant").loc["head_pruned", "criterion"] == "obs"
    # notebook 06's GGUF cell: the uniform baseline is written; the searched plan only where the search kept every
    # layer alike (it may, on a tiny model: float rounding differs between CPUs), else refused and not written
    # (the refusal itself: tests/test_gguf.py)
    mix = read_plan(root / "models" / "mix_pruned")
    widths = {(len(mix.kept_heads(li)), len(mix.kept_neurons(li))) for li in mix.kept_layers()}
    uniform = len(widths) == 1
    assert sorted(p.name for p in (root / "models" / "gguf").iterdir()) == \
        ["baseline-q8_0.gguf"] + ["mix_pruned-f16.gguf"] * uniform
    recovery = pd.read_csv(out / "recovery.csv")
    _finite(recovery, ["steps", "tokens_seen", "heldout_loss_before", "heldout_loss_after", "ppl_before",
                       "ppl_after", "minutes"])
    for name in ("perplexity_baseline", "latency_baseline"):
        assert json.loads((out / f"{name}.json").read_text())["env"]["git_commit"]
    runtime, summary = pd.read_csv(out / "adaptive_runtime.csv"), pd.read_csv(out / "adaptive_summary.csv")
    names = ["always_none", "always_max", "rules", "learned", "dqn"]  # simulated load, then the live run
    assert list(summary["controller"]) == names * 2 and summary["simulated_load"].tolist() == [True] * 5 + [False] * 5
    assert len(runtime) == len(names) * summary.loc[0, "n_prompts"]
    live = pd.read_csv(out / "adaptive_runtime_live.csv")  # live readings (one per prompt: tests/test_adaptive.py)
    assert len(live) == len(runtime) and live["load"].between(0, 1).all()
    _finite(runtime, ["complexity", "load", "latency_s", "tokens_per_s", "ppl", "reward", "retention", "switch_ms"])
    _finite(summary, ["latency_s", "tokens_per_s", "retention", "ppl", "reward", "speedup_pct", "retention_pct"])
    levels = pd.read_csv(out / "adaptive_levels.csv")
    from pruning_utils.adaptive.nested_model import parse_levels
    from pruning_utils.pipeline.profiles import PROFILES

    assert list(levels["level"]) == [lv.name for lv in parse_levels(PROFILES["smoke"]["ADAPTIVE_LEVELS"])]
    assert levels["int8"].tolist() == [False, False, False, True] and levels["refit"].iloc[2]  # smoke: refit + int8
    _finite(levels, ["tokens_per_s", "answer_ppl", "chunk_ppl", "switch_ms_median", "memory_overhead_ratio"])
    for png in ("inference_time_vs_complexity", "quality_vs_complexity", "adaptive_pareto"):
        assert (out / f"{png}.png").stat().st_size > 1000
    for png in ("pareto_params", "pareto_latency", "pareto_size", "stage_bars"):
        assert (root / "results" / "plots" / f"{png}.png").stat().st_size > 1000


def test_encoder_table(smoke_run):
    from pruning_utils.encoder.variants import ENCODER_COLUMNS

    root, _, _ = smoke_run
    table = pd.read_csv(root / "results" / "ablation_studies" / "encoder_glue.csv")
    assert list(table.columns) == list(ENCODER_COLUMNS) and table["variant"].iloc[0] == "baseline"
    _finite(table, ["accuracy", "f1", "ms_per_batch", "ms_per_batch_iqr", "samples_per_s", "size_mb", "params"])
    by = table.drop_duplicates("variant").set_index("variant")  # the CPU rows (a GPU row follows its CPU twin)
    assert by.loc["baseline_int8", "size_mb"] < by.loc["baseline", "size_mb"]
    assert by.loc["fluctuation_lstsq", "params_non_embedding"] < by.loc["baseline", "params_non_embedding"]
    for part in ("heads_only_pruned", "mlp_only_pruned"):
        assert 0 < by.loc[part, "reduction_pct"] < by.loc["fluctuation_lstsq", "reduction_pct"]
    assert by.loc["onnx_int8", "size_mb"] < by.loc["onnx_fp32", "size_mb"]
    assert set(by.loc[["onnx_fp32", "onnx_int8"], "runtime"]) == {"onnxruntime"}
    assert by.loc["lowrank", "lowrank_rule"].endswith("ffn, layers 0,1")


def test_second_run_skips_finished_stages(smoke_run):
    _, first, second = smoke_run
    assert all(f"[{s.key}] running" in first for s in STAGES)
    assert all(f"[{s.key}] skipped (finished, same parameters)" in second for s in STAGES)


def test_failed_stage_names_itself(tmp_path):
    root = tmp_path
    (root / "notebooks").mkdir()
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("raise RuntimeError('boom')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / STAGES[0].notebook)
    with pytest.raises(StageFailed, match=r"(?s)stage 00 .*boom.*results/notebooks"):
        run(resolve_parameters("smoke"), root=root, only=["00"], log=lambda *_: None)


def test_unknown_profile_and_overrides():
    with pytest.raises(ValueError, match="known: default, smoke"):
        resolve_parameters("huge")
    params = resolve_parameters("smoke", {"head_rate": 0.5}, environ={"PRUNE_MODEL": "tiny-qwen3"})
    assert params["HEAD_RATE"] == 0.5 and params["MODEL"] == "tiny-qwen3"
