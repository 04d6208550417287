"""The quality benchmark (issue 6) end to end on a tiny random model: every grid cell, the full scores, the peers."""
import math

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CRITERIA = ["random", "magnitude", "activation", "fluctuation", "taylor", "obs"]


@pytest.fixture(scope="module")
def bench_table(tmp_path_factory):
    from benchmarks import quality
    from pruning_utils import paths

    out = tmp_path_factory.mktemp("quality") / "quality_benchmark.csv"
    argv = ["--model", "tiny-llama", "--scores", str(out.parent / "no-scores"),
            "--criteria", ",".join(CRITERIA), "--n-calib", "8", "--calib-seq-len", "32", "--eval-seq-len", "32",
            "--eval-max-tokens", "256", "--screen-tokens", "64", "--full-top", "1", "--fidelity-tokens", "64",
            "--search-iterations", "8", "--search-group", "8", "--search-windows", "2", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "MODELS_DIR", out.parent / "models")  # the selfgen cache of the tiny model stays there
        quality.main(argv)
    return pd.read_csv(out), quality


def test_every_criterion_and_mode_is_screened_at_every_shape(bench_table):
    table, quality = bench_table
    grid = table[(table["role"] == "grid") & table["screen"]]
    # tiny-llama has o_proj / down_proj biases, so all three modes apply
    expected = {(s, c, m) for s in ("S1", "S2", "S3") for c in CRITERIA for m in ("none", "bias", "lstsq")}
    assert set(zip(grid["shape"], grid["criterion"], grid["reconstruction"])) == expected
    assert set(table.columns) - {"device", "commit"} == set(quality.COLUMNS)  # write_csv stamps the last two


def test_full_rows_cover_baseline_peers_and_extras_with_consistent_sizes(bench_table):
    table, _ = bench_table
    full = table[~table["screen"]]
    assert {"baseline", "top", "magnitude", "FLAP-like", "LLM-Pruner-like", "Torch-Pruning", "allocation",
            "search"} <= set(full["role"])
    assert full["fidelity_ppl"].map(math.isfinite).all() and table[table["screen"]]["fidelity_ppl"].isna().all()
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


def test_search_row_beats_its_uniform_start_on_held_out_kl_and_reports_latency(bench_table):
    table, _ = bench_table
    full = table[~table["screen"]]
    search = full[full["allocation"] == "search"]
    assert len(search) == 1 and search["criterion"].iloc[0] == "obs"
    start = full[(full["criterion"] == "obs") & (full["allocation"] == "uniform") & (full["shape"] == "S3")
                 & full["kl_heldout"].notna()]
    assert len(start) == 1
    assert search["kl_heldout"].iloc[0] <= start["kl_heldout"].iloc[0]
    both = pd.concat([search, start])
    assert (both["prefill_ms"] > 0).all() and (both["decode_tokens_per_s"] > 0).all()
