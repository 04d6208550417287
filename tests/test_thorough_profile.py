"""benchmarks/thorough_profile.py: the saved models of two results folders side by side, with the calibration
tokens and ridge each stage ran with, and clear refusals for folders a run did not finish."""
import json

import pandas as pd
import pytest

from benchmarks import thorough_profile
from pruning_utils.pipeline.profiles import DEFAULTS


def _folder(root, ppl: float, stamp: dict | None = None, variants=("head_pruned", "mlp_pruned", "mix_pruned")):
    table = root / "ablation_studies"
    table.mkdir(parents=True)
    base = dict(criterion="obs", allocation="search", reconstruction="lstsq", query_heads="6x30",
                intermediate="1152x30", params_non_embedding=1, reduction_pct=1.0, ppl_change_pct=0.0,
                fidelity_ppl=2 * ppl, kl_to_baseline=0.1, eval_tokens=100, ppl_reference="baseline@100",
                load_avg=0.5, device="cpu")
    rows = [dict(base, variant=v, ppl=ppl + i) for i, v in enumerate(variants)]
    heads = [r for r in rows if r["variant"] == "head_pruned"]
    pd.DataFrame([dict(base, variant="heads-obs-0.2-none", ppl=99.0)] + heads).to_csv(table / "head_pruning.csv",
                                                                                  index=False)
    pd.DataFrame([r for r in rows if r["variant"] != "head_pruned"]).to_csv(table / "mlp_pruning.csv", index=False)
    pd.DataFrame(dict(stage=["02", "03", "total"], notebook=["a", "b", ""], minutes=[2.0, 3.0, 5.0],
                      profile="p", commit=["c02", "c03", ""])).to_csv(table / "run_time.csv", index=False)
    if stamp is not None:
        (root / "stages").mkdir()
        for stage in ("02", "03"):
            (root / "stages" / f"{stage}.json").write_text(json.dumps({"params": stamp}))
    return root


def test_rows_of_both_profiles_with_their_calibration(tmp_path):
    default = _folder(tmp_path / "default", 10.0)
    thorough = _folder(tmp_path / "thorough", 8.0, stamp=dict(N_CALIB=448, CALIB_SEQ_LEN=256, RIDGE_RATIO=1e-4))
    out = tmp_path / "thorough_profile.csv"
    thorough_profile.main(["--thorough", str(thorough), "--default", str(default), "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table["profile"]) == ["default"] * 3 + ["thorough"] * 3
    assert list(table["variant"]) == ["head_pruned", "mlp_pruned", "mix_pruned"] * 2
    assert list(table["ppl"]) == [10.0, 11.0, 12.0, 8.0, 9.0, 10.0]  # the saved rows, not the sweep's
    # no stamps: the default profile's declared values; stamps: what the stages ran with (a stamp written before
    # REFIT_CALIB existed: its N_CALIB windows were the refits' too)
    declared = DEFAULTS["REFIT_CALIB"] * DEFAULTS["CALIB_SEQ_LEN"]
    assert list(table["calib_tokens"]) == [declared] * 3 + [114688] * 3
    assert list(table["ridge_ratio"]) == [1e-2] * 3 + [1e-4] * 3
    assert list(table["stage_minutes"]) == [2.0, 3.0, 3.0] * 2 and list(table["commit"][:2]) == ["c02", "c03"]


def test_the_refits_windows_are_refit_calib_not_n_calib(tmp_path):
    default = _folder(tmp_path / "default", 10.0)
    thorough = _folder(tmp_path / "thorough", 8.0,
                       stamp=dict(REFIT_CALIB=128, CALIB_SEQ_LEN=256, RIDGE_RATIO=1e-4))  # 02 / 03 read no N_CALIB
    out = tmp_path / "thorough_profile.csv"
    thorough_profile.main(["--thorough", str(thorough), "--default", str(default), "--out", str(out)])
    assert list(pd.read_csv(out)["calib_tokens"][3:]) == [128 * 256] * 3


def test_unfinished_folders_are_refused(tmp_path):
    default = _folder(tmp_path / "default", 10.0)
    partial = _folder(tmp_path / "partial", 8.0, variants=("head_pruned", "mlp_pruned"))
    out = tmp_path / "thorough_profile.csv"
    with pytest.raises(SystemExit, match="no 'mix_pruned' row"):
        thorough_profile.main(["--thorough", str(partial), "--default", str(default), "--out", str(out)])
    with pytest.raises(SystemExit, match="run notebooks 02 and 03"):
        thorough_profile.main(["--thorough", str(tmp_path / "empty"), "--default", str(default), "--out", str(out)])
    assert not out.exists()


def test_a_new_default_run_alone_keeps_the_thorough_rows(tmp_path):
    thorough = _folder(tmp_path / "thorough", 8.0, stamp=dict(N_CALIB=448, CALIB_SEQ_LEN=256, RIDGE_RATIO=1e-4))
    out = tmp_path / "thorough_profile.csv"
    with pytest.raises(SystemExit, match="no thorough rows"):
        thorough_profile.main(["--default", str(_folder(tmp_path / "d1", 10.0)), "--out", str(out)])
    thorough_profile.main(["--thorough", str(thorough), "--default", str(tmp_path / "d1"), "--out", str(out)])
    thorough_profile.main(["--default", str(_folder(tmp_path / "d2", 20.0)), "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table["profile"]) == ["default"] * 3 + ["thorough"] * 3
    assert list(table["ppl"]) == [20.0, 21.0, 22.0, 8.0, 9.0, 10.0]  # the new default rows, the kept thorough ones
    assert list(table["calib_tokens"][3:]) == [114688] * 3
