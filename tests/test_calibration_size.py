"""The calibration size benchmark on a tiny random model: rows per shape, criterion and size at the shape's exact
parameter count, and a re-run of one shape that keeps the other shape's rows."""
import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(tmp_path, shapes, sizes="128,256", ridges="1e-2", orders="one-shot", criteria="obs,fluctuation",
         extra=()):
    from benchmarks import calibration_size
    from pruning_utils import paths

    out = tmp_path / "calibration_size.csv"
    argv = ["--model", "tiny-llama", "--source", "embedded:0.75+selfgen:0.25", "--sizes", sizes, "--shapes", shapes,
            "--ridges", ridges, "--orders", orders, "--criteria", criteria,
            "--seq-len", "32", "--eval-seq-len", "32", "--eval-max-tokens", "256", "--fidelity-tokens", "64",
            "--scores", str(tmp_path / "no-scores"), "--out", str(out), *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "MODELS_DIR", tmp_path / "models")  # the tiny model's selfgen cache stays there
        calibration_size.main(argv)
    return pd.read_csv(out)


def test_rows_per_shape_and_merge(tmp_path):
    table = _run(tmp_path, "S1,S3")
    assert sorted(zip(table["shape"], table["calib_tokens"])) == [("S1", 128), ("S1", 256), ("S3", 128), ("S3", 256)]
    assert set(table["criterion"]) == {"obs"}  # no saved fluctuation scores: obs rows only
    for shape, rows in table.groupby("shape"):
        assert rows["params_non_embedding"].nunique() == 1, f"{shape}: calibration size changed the budget"
    assert table.loc[table["shape"] == "S1", "params_non_embedding"].iloc[0] > \
        table.loc[table["shape"] == "S3", "params_non_embedding"].iloc[0]
    assert (table["ppl"] > 1).all() and (table["fidelity_ppl"] > 1).all()
    again = _run(tmp_path, "S1", sizes="128")  # one shape and size again: the other rows stay as they were
    key = ["shape", "criterion", "calibration_source", "calib_tokens", "ridge_ratio", "order"]
    assert sorted(map(tuple, again[key].values)) == sorted(map(tuple, table[key].values))
    pd.testing.assert_series_equal(again.set_index(key)["ppl"], table.set_index(key)["ppl"], rtol=1e-6)


def test_ridges_and_orders_are_rows(tmp_path):
    table = _run(tmp_path, "S1", sizes="128", ridges="1e-3,1e-1", orders="one-shot,sequential,chase,chase-reselect")
    assert sorted(table["ridge_ratio"]) == [1e-3] * 4 + [1e-1] * 4
    assert sorted(table["order"]) == ["chase", "chase", "chase-reselect", "chase-reselect", "one-shot", "one-shot",
                                      "sequential", "sequential"]
    # the ridge and the order reach the refit (on a tiny random model two orders may agree to float rounding)
    assert (table.groupby("ridge_ratio")["ppl"].nunique() >= 2).all()
    assert table.groupby("order")["ppl"].nunique().min() == 2
    assert table["params_non_embedding"].nunique() == 1


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--shapes"):
        _run(tmp_path, "S4")
    with pytest.raises(SystemExit, match="--ridges"):
        _run(tmp_path, "S1", ridges="small")
    with pytest.raises(SystemExit, match="--orders"):
        _run(tmp_path, "S1", orders="two-shot")
    with pytest.raises(SystemExit, match="--criteria"):
        _run(tmp_path, "S1", criteria="taylor")
    with pytest.raises(SystemExit, match="--fisher-windows"):
        _run(tmp_path, "S1", criteria="obs_fisher", extra=["--fisher-windows", "0"])


def test_obs_fisher_rows(tmp_path):
    table = _run(tmp_path, "S1", sizes="128", criteria="obs,obs_fisher", extra=["--fisher-windows", "2"])
    rows = table.set_index("criterion")
    assert sorted(rows.index) == ["obs", "obs_fisher"]
    assert rows.loc["obs_fisher", "fisher_windows"] == 2 and rows.loc["obs", "fisher_windows"] == 0
    assert rows.loc["obs_fisher", "fisher_s"] >= 0 and pd.isna(rows.loc["obs", "fisher_s"])
    assert rows["params_non_embedding"].nunique() == 1  # the metric changes which neurons go, never how many
    assert rows.loc["obs_fisher", "fisher_source"] == "embedded:0.75+selfgen:0.25"
    assert rows.loc["obs", "fisher_source"] == "-"
    again = _run(tmp_path, "S1", sizes="128", criteria="obs_fisher",
                 extra=["--fisher-windows", "2", "--fisher-source", "selfgen"])
    fisher_rows = again[again["criterion"] == "obs_fisher"].set_index("fisher_source")
    assert sorted(fisher_rows.index) == ["embedded:0.75+selfgen:0.25", "selfgen"]  # another source: another row
