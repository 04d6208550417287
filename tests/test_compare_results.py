"""scripts/compare_results.py: the reproduction check of result tables can fail."""
import numpy as np
import pandas as pd

from scripts.compare_results import compare_tables, quality_columns


def _table(ppl, kl, ms):
    return pd.DataFrame({"variant": list("ab")[:len(ppl)], "ppl": ppl, "kl_to_baseline": kl, "prefill_ms": ms})


def test_only_quality_columns_are_compared():
    assert quality_columns(_table([1.0, 2.0], [0.1, 0.2], [5.0, 6.0])) == ["ppl", "kl_to_baseline"]


def test_equal_tables_pass_and_timing_is_ignored():
    recs = compare_tables(_table([10.0, 20.0], [0.1, np.nan], [5.0, 6.0]),
                          _table([10.0, 20.0], [0.1, np.nan], [9.0, 1.0]), rtol=1e-6)
    assert all(r["ok"] for r in recs) and [r["column"] for r in recs] == ["ppl", "kl_to_baseline"]


def test_a_moved_figure_or_a_changed_row_count_fails():
    recs = compare_tables(_table([10.0, 20.0], [0.1, 0.2], [5.0, 6.0]),
                          _table([10.0, 20.001], [0.1, 0.2], [5.0, 6.0]), rtol=1e-6)
    assert [r["ok"] for r in recs] == [False, True] and abs(recs[0]["max_rel_diff"] - 5e-5) < 1e-9
    assert not compare_tables(_table([1.0, 2.0], [0.1, 0.2], [5.0, 6.0]),
                              _table([1.0], [0.1], [5.0]), rtol=1e-6)[0]["ok"]
    # a figure that became NaN fails too
    assert not compare_tables(_table([1.0, 2.0], [0.1, 0.2], [5.0, 6.0]),
                              _table([1.0, np.nan], [0.1, 0.2], [5.0, 6.0]), rtol=1e-6)[0]["ok"]
