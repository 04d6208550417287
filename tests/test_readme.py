"""README.md, docs/RESULTS.md and docs/BENCHMARKS.md are the committed result files, rendered: a table or generated
sentence edited by hand or left stale fails here, and so does a benchmark stamp whose staleness is judged wrongly."""
import re
import subprocess

import pandas as pd
import pytest

from scripts import render_readme as report


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return {str(p.relative_to(report.PROJECT_ROOT)): p.read_text() for p in report.doc_paths()}


def test_every_table_is_marked_once(docs):
    tables = [n for text in docs.values() for n in report.marked_tables(text)]
    assert sorted(tables) == sorted(set(tables)), "a table is marked in more than one place"
    names = {n for text in docs.values() for n in report.marked(text)}  # a sentence may recur (README and RESULTS)
    assert names == set(report.TABLES) | set(report.TEXTS)


def _full_history() -> bool:
    """Return True in a checkout with its whole git history (the stamp tables date and age commits from it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=report.PROJECT_ROOT,
                             capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return False
    return out.returncode == 0 and out.stdout.strip() == "false"


def _without_stamps(text: str) -> str:
    return re.sub(r"(<!-- table:stamp-[\w-]+ -->).*?(<!-- /table:stamp-[\w-]+ -->)", r"\1\2", text, flags=re.S)


@pytest.mark.parametrize("doc", report.DOCS)
def test_committed_doc_equals_its_rendering(doc, docs):
    rendered, committed = report.render_text(docs[doc]), docs[doc]
    if not _full_history():  # a shallow clone cannot date or age the stamped commits: all but those tables
        rendered, committed = _without_stamps(rendered), _without_stamps(committed)
    assert rendered == committed, f"{doc} differs from the result files: run `python3 -m scripts.render_readme`"


def test_a_changed_csv_changes_the_rendering(docs, tmp_path, monkeypatch):
    src = report.ablation_dir() / "final_eval.csv"
    df = pd.read_csv(src)
    df.loc[df["variant"] == "baseline", "ppl"] = 999.25
    (tmp_path / "final_eval.csv").write_text(df.to_csv(index=False))
    monkeypatch.setattr(report, "ablation_dir", lambda: tmp_path)
    new = report.render_text(docs["README.md"])
    assert new != docs["README.md"] and "999.25" in report.marked(new)["final_short"]


def test_a_missing_result_file_renders_a_note(docs, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ablation_dir", lambda: tmp_path)
    monkeypatch.setattr(report, "results_dir", lambda: tmp_path)
    for doc, text in docs.items():
        new = report.render_text(text)  # must not raise
        assert "_Not rendered: `" in new or doc == "docs/BENCHMARKS.md"
    assert "missing: run `python3 -m benchmarks.quality`" in report.stamp_table("quality")


def test_unknown_marker_is_refused():
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        report.render_text("<!-- table:nope -->\nx\n<!-- /table:nope -->")


def test_staleness_with_injected_history():
    # history: a -> b -> c; the benchmark's code last changed in b
    order = {"a": 0, "b": 1, "c": 2}
    ancestor = lambda old, new: (order[old] <= order[new]) if old in order and new in order else None  # noqa: E731
    assert report.staleness(["a"], "b", ancestor).startswith("**stale**")
    assert report.staleness(["b"], "b", ancestor).startswith("current")
    assert report.staleness(["c", "b"], "b", ancestor).startswith("current")
    assert report.staleness(["c", "a"], "b", ancestor) == "**stale**: its code changed after a"
    assert report.staleness([], "b", ancestor) == "not stamped"
    assert report.staleness(["zzz"], "b", ancestor).startswith("unknown")


def test_staleness_on_a_real_git_repo(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pruning_utils").mkdir()
    (tmp_path / "benchmarks" / "b.py").write_text("from pruning_utils import m\n")
    (tmp_path / "pruning_utils" / "m.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "one")
    measured = git("rev-parse", "HEAD")
    (tmp_path / "README").write_text("unrelated\n")
    git("add", ".")
    git("commit", "-qm", "two")
    monkeypatch.setattr(report, "PROJECT_ROOT", tmp_path)
    sources = report.benchmark_sources("b")
    assert sources == ["benchmarks/b.py", "pruning_utils/m.py"]
    assert report.staleness([measured[:7]], report.last_commit(sources)).startswith("current")
    (tmp_path / "pruning_utils" / "m.py").write_text("x = 2\n")  # an imported module changes after the measurement
    git("commit", "-qam", "three")
    assert report.staleness([measured[:7]], report.last_commit(sources)).startswith("**stale**")


def test_recovery_readings_follow_the_curve(tmp_path, monkeypatch):
    """The readings name the first budget within 2x the baseline's held-out perplexity, from the rows, not by hand."""
    base = pd.read_csv(report.ablation_dir() / "baseline.csv")
    base.to_csv(tmp_path / "baseline.csv", index=False)
    h = float(base["heldout_ppl"].iloc[0])
    thorough = report.PROFILES["thorough"]["RECOVERY_STEPS"]
    steps = [0, report.DEFAULTS["RECOVERY_STEPS"], 2 * thorough]
    rows = pd.DataFrame(dict(model="m", steps=steps, ppl=[20.0, 18.0, 15.0], fidelity_ppl=[40.0, 38.0, 30.0],
                             heldout_ppl=[3 * h, 1.5 * h, 1.2 * h], semantic_cosine=[0.5, 0.6, 0.7]))
    rows.to_csv(tmp_path / "recovery_budget.csv", index=False)
    monkeypatch.setattr(report, "ablation_dir", lambda: tmp_path)
    text = report.recovery_budget_readings()
    assert f"within 2x the unpruned model's at {steps[1]} steps" in text
    assert "thorough profile's budget" not in text  # no row at its budget
    rows.loc[2, "steps"] = thorough
    rows.assign(heldout_ppl=3 * h).to_csv(tmp_path / "recovery_budget.csv", index=False)
    text = report.recovery_budget_readings()
    assert f"({thorough} steps, the thorough profile's)" in text and "No budget measured" in text
    # the thorough profile's own checkpoint, labelled by the benchmark's --profile: its own sentence, and the default
    # checkpoint's readings stay those of its rows (its 0-step row is still the 'before recovery' one)
    own = pd.DataFrame(dict(model="thorough:m", steps=[0, thorough], ppl=[16.0, 14.0], fidelity_ppl=[35.0, 26.5],
                            heldout_ppl=[2.5 * h, 1.1 * h], semantic_cosine=[0.55, 0.75]))
    pd.concat([own, rows.assign(heldout_ppl=3 * h)]).to_csv(tmp_path / "recovery_budget.csv", index=False)
    both = report.recovery_budget_readings()
    assert both.startswith("m: before recovery in-domain 20.00, fidelity 40.00")
    assert ("The thorough profile's own checkpoint (thorough:m): before recovery in-domain 16.00, fidelity 35.00"
            in both) and f"after {thorough} steps in-domain 14.00, fidelity 26.50" in both
    assert "No budget measured" in both  # the thorough rows' held-out English does not count for the default's


def test_semantic_refit_readings_compare_recipes_by_their_windows(tmp_path, monkeypatch):
    """The rule's verdict reads the saved recipe's row at REFIT_CALIB windows, not a row of the same criterion and
    source refit from another count, and says so when the earlier recipe's row is better."""
    d, (e_crit, e_src, e_n, e_ridge) = report.DEFAULTS, report.EARLIER_RECIPE
    saved = dict(criterion=d["MAIN_HEAD_CRITERION"], calibration_source=d["TEXT_SOURCE"], ridge_ratio=d["RIDGE_RATIO"])
    rows = []
    for shape in ("S2", "S3"):
        suffix = "" if shape == "S2" else f"+{d['MAIN_MLP_CRITERION']}"
        rows += [dict(saved, shape=shape, criterion=saved["criterion"] + suffix, n_calib=d["REFIT_CALIB"], ppl=10.0,
                      fidelity_ppl=20.0, heldout_ppl=30.0),
                 dict(saved, shape=shape, criterion=saved["criterion"] + suffix, n_calib=d["REFIT_CALIB"] + 1,
                      ppl=99.0, fidelity_ppl=99.0, heldout_ppl=99.0),
                 dict(shape=shape, criterion=e_crit + suffix, calibration_source=e_src, n_calib=e_n,
                      ridge_ratio=e_ridge, ppl=11.0, fidelity_ppl=21.0, heldout_ppl=31.0)]
    pd.DataFrame(rows).to_csv(tmp_path / "semantic_refit.csv", index=False)
    monkeypatch.setattr(report, "ablation_dir", lambda: tmp_path)
    text = report.semantic_refit_readings()
    assert text.count("at least as good on both.") == 2 and "meet the rule" in text and "99.00" not in text
    df = pd.DataFrame(rows)
    df.loc[(df["n_calib"] == d["REFIT_CALIB"]) & (df["shape"] == "S3"), "fidelity_ppl"] = 22.0
    df.to_csv(tmp_path / "semantic_refit.csv", index=False)
    assert "do NOT meet the rule" in report.semantic_refit_readings()
    df[df["n_calib"] != d["REFIT_CALIB"]].to_csv(tmp_path / "semantic_refit.csv", index=False)
    assert "missing" in report.semantic_refit_readings()


def test_local_refit_readings_compare_each_budget_with_the_saved_model(tmp_path, monkeypatch):
    """Each budget is read against the same model's steps-0 row, and the S1 verdict follows the best row."""
    target = report.S1_TARGET
    rows = pd.DataFrame(dict(model=report.S1_CHECKPOINT, steps=[60, 0], lr=2e-3, ppl=[target + 0.5, target + 1.0],
                             fidelity_ppl=[30.0, 31.0], heldout_ppl=[50.0, 52.0], layers_refit=[30, 0],
                             layers_kept=[29, 0], refit_minutes=[16.0, 0.0], device="cpu"))
    rows.to_csv(tmp_path / "local_refit.csv", index=False)
    monkeypatch.setattr(report, "ablation_dir", lambda: tmp_path)
    text = report.local_refit_readings()
    assert f"in-domain {target + 1.0:.2f} -> {target + 0.5:.2f}" in text and "29 of 30 layers" in text
    assert "is not met" in text
    other = rows.assign(model="mix_pruned", ppl=[target - 0.2, target - 0.1])  # another shape: not S1's verdict
    pd.concat([rows, other]).to_csv(tmp_path / "local_refit.csv", index=False)
    assert "is not met" in report.local_refit_readings()
    rows.assign(ppl=[target - 0.1, target + 1.0]).to_csv(tmp_path / "local_refit.csv", index=False)
    assert "is met" in report.local_refit_readings()
    built = rows.assign(model=report.S1_BUILT + "semantic_refit", ppl=[target - 0.2, target + 0.9])  # S1 too
    pd.concat([rows, built]).to_csv(tmp_path / "local_refit.csv", index=False)
    text = report.local_refit_readings()
    assert "is met" in text and f"best {target - 0.2:.2f}: `{report.S1_BUILT}semantic_refit`, 60 steps" in text
