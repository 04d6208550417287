"""Tests of result writing: atomic CSV/JSON, compact shapes, plots, folders."""
import importlib
import json

import numpy as np
import pandas as pd
import pytest

from pruning_utils import paths
from pruning_utils.measure.variants import compact_shape
from pruning_utils.pipeline import results


def test_write_csv_from_rows_and_frame(tmp_path):
    path = results.write_csv([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], tmp_path / "sub" / "t.csv", stamp=False)
    assert pd.read_csv(path).to_dict("records") == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    results.write_csv(pd.DataFrame({"c": [3]}), path, device="cpu")
    assert list(pd.read_csv(path).columns) == ["c", "commit", "device"]  # stamped where it was measured
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary left behind


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = results.write_csv([{"a": 1}], tmp_path / "t.csv", stamp=False)

    def broken(self, target, **kw):
        open(target, "w").write("half a ta")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        results.write_csv([{"a": 2}], path)
    monkeypatch.undo()
    assert pd.read_csv(path).to_dict("records") == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_write_json_converts_numpy_and_paths(tmp_path):
    path = results.write_json({"x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(2), "p": tmp_path,
                               "s": {2, 1}}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3, "arr": [0, 1], "p": str(tmp_path), "s": [1, 2]}
    with pytest.raises(TypeError, match="cannot write object"):
        results.write_json({"o": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_compact_shape():
    assert compact_shape([9] * 30) == "9x30"
    assert compact_shape([9] * 10 + [6] * 20) == "9x10,6x20"
    assert compact_shape([1, 2, 2, 1]) == "1x1,2x2,1x1"
    assert compact_shape([]) == ""


def test_save_plot_writes_png_and_closes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = results.save_plot(fig, tmp_path / "plots" / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()


def test_folders_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.setenv("PRUNING_MODELS_DIR", str(tmp_path / "ckpt"))
    try:
        importlib.reload(paths)
        assert paths.results_dir() == paths.RESULTS_DIR == tmp_path / "res"
        assert paths.models_dir() == tmp_path / "ckpt"
        assert paths.ablation_dir() == tmp_path / "res" / "ablation_studies" and paths.ablation_dir().is_dir()
    finally:
        monkeypatch.delenv("PRUNING_RESULTS_DIR")
        monkeypatch.delenv("PRUNING_MODELS_DIR")
        importlib.reload(paths)
    assert paths.RESULTS_DIR == paths.PROJECT_ROOT / "results"
    assert paths.RESULTS_DIR.name == "results"


def test_models_dir_is_read_at_call_time(tmp_path, monkeypatch):
    from pruning_utils.model.checkpoint import resolve_checkpoint_dir

    monkeypatch.setattr(paths, "MODELS_DIR", tmp_path)
    assert resolve_checkpoint_dir("x") == tmp_path / "x"
    assert resolve_checkpoint_dir(tmp_path / "y" / "z") == tmp_path / "y" / "z"


def test_merge_rows_replaces_measured_keys_and_keeps_older_rows(tmp_path):
    from pruning_utils.pipeline.results import merge_rows, write_csv

    path = tmp_path / "bench.csv"
    write_csv([dict(shape="S1", ppl=13.0), dict(shape="S3", ppl=19.0)], path)  # written before "ridge" was a key
    new = pd.DataFrame([dict(shape="S1", ridge=1e-4, ppl=12.9)])
    merged = merge_rows(new, path, ["shape", "ridge"])
    assert len(merged) == 3 and sorted(merged["ppl"]) == [12.9, 13.0, 19.0]
    write_csv(merged, path)
    again = merge_rows(pd.DataFrame([dict(shape="S1", ridge=1e-4, ppl=12.8)]), path, ["shape", "ridge"])
    assert sorted(again["ppl"]) == [12.8, 13.0, 19.0]


def test_a_row_with_an_empty_key_cell_is_replaced_not_repeated(tmp_path):
    """A baseline row has no criterion or window count: re-measured, it replaces the written one (its "" comes back
    from the CSV as NaN, and NaN never equals NaN), and an int key read back from a column with empty cells
    (448 -> 448.0) still matches."""
    path = tmp_path / "bench.csv"
    key = ["shape", "criterion", "n_calib"]
    rows = [dict(shape="baseline", criterion="", ppl=10.0), dict(shape="S3", criterion="c", n_calib=448, ppl=17.0)]
    for _ in range(3):  # a benchmark writes after every row, its baseline among them each time
        results.write_csv(results.merge_rows(pd.DataFrame(rows), path, key), path)
    table = pd.read_csv(path)
    assert sorted(table["shape"]) == ["S3", "baseline"] and list(table["ppl"].sort_values()) == [10.0, 17.0]


def test_a_numeric_looking_commit_stays_a_commit(tmp_path, monkeypatch):
    """'0479e15' is 4.79e17 to pandas: merged rows and the docs' stamps keep it as the hash it is."""
    from scripts import render_readme

    path = tmp_path / "ablation_studies" / "bench.csv"
    path.parent.mkdir()
    results.write_csv(pd.DataFrame([dict(k=1, v=1.0, commit="0479e15", device="cpu")]), path)
    merged = results.merge_rows(pd.DataFrame([dict(k=2, v=2.0, commit="1234567", device="cpu")]), path, ["k"])
    assert sorted(merged["commit"]) == ["0479e15", "1234567"]
    monkeypatch.setattr(render_readme, "results_dir", lambda: tmp_path)
    assert render_readme.read_stamp("ablation_studies/bench.csv").commits == ["0479e15"]
