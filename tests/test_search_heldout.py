"""The search KL-window benchmark on a tiny random model: one uniform row per shape, budget-exact searches, and a
partial re-run that keeps the rows it did not measure."""
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(out, runs, orders="one-shot", extra=()):
    from benchmarks import search_heldout
    from pruning_utils import paths

    argv = ["--model", "tiny-llama", "--runs", runs, "--n-calib", "8", "--seq-len", "32",
            "--iterations", "6", "--group", "8", "--eval-seq-len", "32", "--eval-max-tokens", "256",
            "--fidelity-tokens", "64", "--orders", orders, "--out", str(out), *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "MODELS_DIR", out.parent / "models")  # the selfgen cache of the tiny model stays there
        search_heldout.main(argv)
    return pd.read_csv(out)


def test_runs_rows_and_merge(tmp_path):
    out = tmp_path / "search_heldout.csv"
    table = _run(out, "S1 2 embedded; S3 2 selfgen; S3 3 embedded:0.5+selfgen:0.5 no-trade",
                 orders="one-shot,sequential")
    assert list(zip(table["shape"], table["allocation"], table["order"])).count(("S3", "uniform", "sequential")) == 1
    assert len(table) == 10 and set(table["order"]) == {"one-shot", "sequential"}
    for shape, rows in table.groupby("shape"):
        assert rows["params_non_embedding"].nunique() == 1, f"{shape}: the search changed the budget"
        assert (rows["ppl"] > 1).all() and (rows["fidelity_ppl"] > 1).all()
    search = table[table["allocation"] == "search"]
    assert (search["kl_heldout"] > -1e-6).all()  # a KL, up to float rounding
    assert set(search["n_kl_windows"]) == {2, 3}
    no_trade = search[~search["trade"]]
    assert set(no_trade["n_kl_windows"]) == {3}
    uniform = table[(table["allocation"] == "uniform") & (table["shape"] == "S3")].iloc[0]
    total = lambda counts: sum(map(int, counts.split()))  # noqa: E731
    for _, row in no_trade.iterrows():  # without trades heads and neurons only move between layers
        assert total(row["heads_removed_per_group"]) == total(uniform["heads_removed_per_group"])
        assert total(row["neurons_removed"]) == total(uniform["neurons_removed"])
    # a partial re-run replaces its own rows and keeps the others
    key = ["shape", "calibration_source", "calib_tokens", "ridge_ratio", "allocation", "kl_windows", "n_kl_windows",
           "trade", "order"]
    first = table.set_index(key)
    again = _run(out, "S1 2 embedded").set_index(key)
    assert sorted(again.index) == sorted(first.index)
    pd.testing.assert_series_equal(again.loc[first.index, "ppl"], first["ppl"], rtol=1e-6)


def test_bad_run_spec_is_refused():
    from benchmarks.search_heldout import parse_runs

    with pytest.raises(SystemExit, match="SHAPE WINDOWS SOURCE"):
        parse_runs("S4 4 selfgen")
    with pytest.raises(SystemExit, match="SHAPE WINDOWS SOURCE"):
        parse_runs("S3 four selfgen")
    with pytest.raises(SystemExit, match="no-trade"):
        parse_runs("S3 4 selfgen trade")
    with pytest.raises(SystemExit, match="--orders"):
        _run(Path("unused.csv"), "S1 2 embedded", orders="two-shot")
    assert parse_runs("S3 4 selfgen; ;S1 2 embedded no-trade") == [("S3", 4, "selfgen", True),
                                                                   ("S1", 2, "embedded", False)]


def test_selfgen_only_calibration_evaluates_on_the_named_text(tmp_path):
    """The over-fitting control: Grams and KL windows from the model's own samples, in-domain PPL on text."""
    out = tmp_path / "search_heldout.csv"
    with pytest.raises(SystemExit, match="--eval-source"):
        _run(out, "S1 2 selfgen", extra=("--source", "selfgen"))
    assert not out.exists()
    table = _run(out, "S1 2 selfgen", extra=("--source", "selfgen", "--eval-source", "embedded"))
    assert set(table["calibration_source"]) == {"selfgen"} and set(table["allocation"]) == {"uniform", "search"}
    assert (table["ppl"] > 1).all() and (table["fidelity_ppl"] > 1).all()
