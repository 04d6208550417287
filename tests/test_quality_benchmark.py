"""The quality benchmark (issue 6) end to end on a tiny random model: every grid cell, the full scores, the peers."""
import math
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CRITERIA = ["random", "magnitude", "activation", "fluctuation", "taylor"]


@pytest.fixture(scope="module")
def bench_table(tmp_path_factory):
    from benchmarks import quality

    out = tmp_path_factory.mktemp("quality") / "quality_benchmark.csv"
    argv = ["quality.py", "--model", "tiny-llama", "--scores", str(out.parent / "no-scores"),
            "--criteria", ",".join(CRITERIA), "--n-calib", "8", "--calib-seq-len", "32", "--eval-seq-len", "32",
            "--eval-max-tokens", "256", "--screen-tokens", "64", "--full-top", "1", "--out", str(out)]
    saved, sys.argv = sys.argv, argv
    try:
        quality.main()
    finally:
        sys.argv = saved
    return pd.read_csv(out), quality


def test_every_criterion_and_mode_is_screened_at_every_shape(bench_table):
    table, quality = bench_table
    grid = table[(table["role"] == "grid") & table["screen"]]
    # tiny-llama has o_proj / down_proj biases, so all three modes apply
    expected = {(s, c, m) for s in ("S1", "S2", "S3") for c in CRITERIA for m in ("none", "bias", "lstsq")}
    assert set(zip(grid["shape"], grid["criterion"], grid["reconstruction"])) == expected
    assert set(table.columns) == set(quality.COLUMNS)


def test_full_rows_cover_baseline_peers_and_extras_with_consistent_sizes(bench_table):
    table, _ = bench_table
    full = table[~table["screen"]]
    assert {"baseline", "top", "magnitude", "FLAP-like", "LLM-Pruner-like", "Torch-Pruning", "allocation"} <= set(
        full["role"])
    n_tokens = full["eval_tokens"].unique()
    assert len(n_tokens) == 1 and n_tokens[0] > table[table["screen"]]["eval_tokens"].max()
    assert full["ppl"].map(math.isfinite).all()
    for shape in ("S1", "S2", "S3"):  # every recipe of a shape prunes to the same non-embedding size ...
        rows = full[full["shape"] == shape]
        assert rows["params_non_embedding"].nunique() == 1, rows[["criterion", "role", "params_non_embedding"]]
        assert set(rows["role"]) >= {"Torch-Pruning", "top"}
    # ... which shrinks S1 < S3 and S2 < S3
    size = full.groupby("shape")["params_non_embedding"].first()
    assert size["S3"] < min(size["S1"], size["S2"]) < size["baseline"]
