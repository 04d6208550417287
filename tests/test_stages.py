"""The stage runner without kernels: validation before anything runs, typed parameters, per-notebook digests."""
import json
from pathlib import Path

import pytest

from pruning_utils.pipeline import profiles, stages, timing
from pruning_utils.pipeline.profiles import ParameterError, coerce, parse_value
from pruning_utils.pipeline.stages import STAGES, UsageError, main, parse_only, resolve_parameters, run, stage_digests


@pytest.fixture(autouse=True)
def no_prune_env(monkeypatch):
    """Tests start from a clean environment: a PRUNE_* variable of the caller's shell must not leak in."""
    import os

    for var in [v for v in os.environ if v.startswith(("PRUNE_", "PRUNING_RESULTS_DIR", "PRUNING_MODELS_DIR"))]:
        monkeypatch.delenv(var)


def _main(argv, tmp_path, capsys) -> tuple[int, str]:
    code = main(argv, root=tmp_path)
    err = capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "bad usage must write nothing"
    return code, err


def test_unknown_stage_key_lists_known_keys(tmp_path, capsys):
    code, err = _main(["--only", "08"], tmp_path, capsys)
    assert code == 2 and "'08'" in err and "known: 00, 02, 03, 03b, 04, 05, 06, 07" in err
    with pytest.raises(UsageError, match="known: 00, 02"):
        parse_only("02,7")
    assert parse_only(" 02, 03 ") == ["02", "03"] and parse_only(None) is None


def test_mistyped_value_names_parameter_type_and_value(tmp_path, capsys):
    code, err = _main(["-p", "HEAD_RATE", "abc"], tmp_path, capsys)
    assert code == 2 and "HEAD_RATE" in err and "float" in err and "'abc'" in err


def test_unknown_parameter_suggests_close_names(tmp_path, capsys, monkeypatch):
    code, err = _main(["-p", "HEAD_RAT", "0.3"], tmp_path, capsys)
    assert code == 2 and "unknown parameter 'HEAD_RAT'" in err and "HEAD_RATE" in err
    monkeypatch.setenv("PRUNE_LORA_LRR", "0.001")
    code, err = _main([], tmp_path, capsys)
    assert code == 2 and "PRUNE_LORA_LRR" in err and "LORA_LR" in err


def test_unknown_profile_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--profile", "huge"], root=tmp_path)
    assert exc.value.code == 2 and "smoke" in capsys.readouterr().err
    with pytest.raises(ValueError, match="known: default, smoke"):
        resolve_parameters("huge")


def test_list_params_prints_every_declaration(tmp_path, capsys):
    assert main(["--list-params"], root=tmp_path) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in profiles.PARAMS) and "int or None" in out


@pytest.mark.parametrize("name,text,expected", [
    ("HEAD_RATE", "0.3", 0.3), ("HEAD_RATE", "0", 0.0), ("N_CALIB", "16", 16), ("N_CALIB", "1e2", 100),
    ("EVAL_MAX_TOKENS", "null", None), ("ZERO_SHOT_LIMIT", "50", 50), ("ZERO_SHOT", "true", True),
    ("ZERO_SHOT", "False", False), ("MODEL", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"), ("MODEL", "123", "123"),
    ("HEAD_SWEEP", "0.25", "0.25"), ("MLP_SWEEP", "0.25,0.5", "0.25,0.5"), ("INSTRUCTION_JSONL", "", ""),
])
def test_parse_value(name, text, expected):
    value = parse_value(name, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name,value", [
    ("HEAD_RATE", None), ("HEAD_RATE", True), ("HEAD_RATE", "abc"), ("N_CALIB", 1.5), ("N_CALIB", True),
    ("N_CALIB", "many"), ("ZERO_SHOT", 1), ("ZERO_SHOT", "yes"), ("MODEL", None), ("MODEL", {"a": 1}),
])
def test_coerce_rejects(name, value):
    with pytest.raises(ParameterError, match=rf"{name} expects \w+"):
        coerce(name, value)


def test_overrides_are_typed_and_case_insensitive():
    params = resolve_parameters("smoke", {"head_rate": 0, "mlp_sweep": [0.25, 0.5]}, environ={"PRUNE_N_CALIB": "4"})
    assert params["HEAD_RATE"] == 0.0 and isinstance(params["HEAD_RATE"], float)
    assert params["MLP_SWEEP"] == "0.25,0.5" and params["N_CALIB"] == 4 and params["PROFILE"] == "smoke"
    with pytest.raises(ParameterError, match="--profile"):
        resolve_parameters("smoke", {"PROFILE": "default"})
    assert resolve_parameters("default", environ={"PRUNE_PROFILE": "smoke"})["PROFILE"] == "default"


def test_profiles_declare_every_parameter_with_its_type():
    assert profiles.PROFILES["default"] == profiles.DEFAULTS
    for name, values in profiles.PROFILES.items():
        assert values["PROFILE"] == name and set(values) == set(profiles.PARAMS)
        assert profiles.check_parameters(values) == values


def _fake_project(root: Path) -> Path:
    (root / "notebooks").mkdir(parents=True)
    for stage in STAGES:
        (root / "notebooks" / stage.notebook).write_text(json.dumps({"stage": stage.key}))
    return root


def test_digest_hashes_only_the_notebooks_own_parameters(tmp_path):
    root = _fake_project(tmp_path)
    base = resolve_parameters("smoke")
    decoder = [i for i, s in enumerate(STAGES) if not s.encoder]
    before = list(stage_digests(base, root))
    after = list(stage_digests(dict(base, ZERO_SHOT_LIMIT=10), root))  # read by 06 only
    assert [b == a for b, a in zip(before, after)] == [s.key != "06" for s in STAGES]
    changed = list(stage_digests(dict(base, HEAD_RATE=0.5), root))  # read by 02; 03..06 build on it
    assert changed[0] == before[0] and all(changed[i] != before[i] for i in decoder[1:])
    # the encoder stage builds on no decoder stage, and only its own parameters re-run it
    assert [c == b for c, b in zip(changed, before)] == [s.encoder or s.key == "00" for s in STAGES]
    enc = list(stage_digests(dict(base, ENCODER_HEAD_RATE=0.5), root))
    assert [e == b for e, b in zip(enc, before)] == [not s.encoder for s in STAGES]


def test_run_passes_declared_parameters_and_skips_finished_stages(tmp_path, monkeypatch):
    import os

    import papermill

    root = _fake_project(tmp_path)
    calls = []

    def fake_execute(src, dst, parameters, cwd, **kw):
        stage = next(s for s in STAGES if src.endswith(s.notebook))
        calls.append((stage.key, parameters, {k: os.environ.get(k) for k in stages.kernel_environment(root)}))
        for out in stage.outputs:
            (root / out).parent.mkdir(parents=True, exist_ok=True)
            (root / out).write_text("x")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    params = resolve_parameters("smoke")
    assert [r["status"] for r in run(params, root=root, log=lambda *_: None)] == ["ran"] * len(STAGES)
    for (key, passed, env), stage in zip(calls, STAGES):
        assert list(passed) == list(stage.params)
        assert env == {"PRUNING_PROJECT_ROOT": str(root), "PRUNING_RESULTS_DIR": str(root / "results"),
                       "PRUNING_MODELS_DIR": str(root / "models"), "PRUNING_PROGRESS": "log"}
    assert "PRUNING_PROJECT_ROOT" not in os.environ, "the kernel's variables must not leak into the caller"
    lines = []
    assert [r["status"] for r in run(params, root=root, log=lines.append)] == ["skipped"] * len(STAGES)
    skipped = [line for line in lines if line.startswith("[")]
    assert skipped and all("finished, same parameters" in line for line in skipped)
    assert lines[0].startswith("estimate"), "the estimate comes before the first stage"
    calls.clear()
    run(dict(params, ZERO_SHOT_LIMIT=3), root=root, log=lambda *_: None)
    assert [c[0] for c in calls] == ["06"]


def test_models_dir_already_set_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert stages.kernel_environment(tmp_path)["PRUNING_MODELS_DIR"] == str(tmp_path / "elsewhere")
    assert stages.output_dirs(tmp_path)["results"] == tmp_path / "results"


def test_progress_is_a_few_plain_lines_in_log_mode(monkeypatch):
    from tqdm.std import tqdm as plain

    from pruning_utils.progress import progress

    monkeypatch.setenv("PRUNING_PROGRESS", "log")
    bar = progress(range(3), desc="x")
    assert type(bar) is plain and bar.mininterval >= 60 and bar.leave
    assert list(bar) == [0, 1, 2]
    monkeypatch.delenv("PRUNING_PROGRESS")
    with progress(total=2, desc="y", disable=True) as manual:
        manual.update(2)


def test_command_line_is_checked_without_torch(tmp_path, capsys):
    import subprocess
    import sys

    assert main(["--check", "--profile", "smoke", "-p", "HEAD_RATE", "0.3"], root=tmp_path) == 0
    assert not list(tmp_path.iterdir())
    # run_all.sh checks before installing
    probe = "import sys, pruning_utils.pipeline.stages; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parent.parent).returncode == 0


def _fake_checkpoint_stages(root: Path, monkeypatch, log: list, fail: str | None = None):
    """Stages that write their outputs (checkpoints as folders with weights) and record models/ before they run."""
    import papermill

    def fake_execute(src, dst, parameters, cwd, **kw):
        stage = next(s for s in STAGES if src.endswith(s.notebook))
        models = root / "models"
        log.append((stage.key, sorted(p.name for p in models.iterdir()) if models.exists() else []))
        for name in stages.checkpoints_read(stage.key, {**resolve_parameters("smoke"), **parameters}):
            assert (models / name / "model.safetensors").exists(), f"stage {stage.key} reads {name}, which is gone"
        if stage.key == fail:
            (models / f".tmp-{stage.key}-1234").mkdir(parents=True)  # a save interrupted by the failure
            raise RuntimeError("kernel died")
        written = stages.checkpoints_written(stage.key, {**resolve_parameters("smoke"), **parameters})
        for out in list(stage.outputs) + [f"models/{n}/model.safetensors" for n in written]:
            (root / out).parent.mkdir(parents=True, exist_ok=True)
            (root / out).write_text("x")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)


def test_stage_graph_of_the_default_and_smoke_profiles():
    # hybrid_pruned left out of the final table: a checkpoint 03b writes and no later stage reads
    smoke = resolve_parameters("smoke", {"EXTRA_VARIANTS": "baseline_int8,mix_pruned_int8,depth_pruned,lowrank_pruned"})
    assert stages.checkpoints_read("03", smoke) == {"head_pruned"}
    assert stages.checkpoints_read("04", smoke) == {"head_pruned", "mix_pruned"}
    assert stages.checkpoints_written("04", smoke) == {"head_pruned_lora", "mix_pruned_lora"}
    assert stages.checkpoints_read("06", smoke) == {"head_pruned", "mlp_pruned", "mix_pruned", "head_pruned_lora",
                                                    "mix_pruned_lora", "baseline_int8", "mix_pruned_int8",
                                                    "depth_pruned", "lowrank_pruned"}
    assert "hybrid_pruned" in stages.not_needed_after("03b", smoke)  # written by 03b, read by no later stage
    # 06 reads every checkpoint of VARIANTS / EXTRA_VARIANTS: before it only what 03b wrote for none can go
    only_03b = {"hybrid_pruned", "head_pruned_int8", "mlp_pruned_int8"}
    assert stages.not_needed_after("04", smoke) == only_03b
    assert stages.not_needed_after("06", smoke) == stages.checkpoints_read("06", smoke) | only_03b


def test_keep_needed_removes_each_checkpoint_after_its_last_reader(tmp_path, monkeypatch):
    root = _fake_project(tmp_path)
    log: list = []
    _fake_checkpoint_stages(root, monkeypatch, log)
    params = resolve_parameters("smoke", {"KEEP_CHECKPOINTS": "needed", "VARIANTS": "baseline,mix_pruned_lora",
                                          "EXTRA_VARIANTS": "", "COMPRESS_INT8_BASES": "baseline"})
    lines: list = []
    run(params, root=root, log=lines.append)
    before = dict(log)
    assert before["03"] == ["head_pruned"]
    assert before["04"] == ["head_pruned", "mix_pruned"]  # mlp_pruned: no later stage reads it, gone after 03
    assert before["06"] == ["mix_pruned_lora"]  # 04's inputs and head_pruned_lora (06 skips it) gone after 04
    assert not [p for p in (root / "models").iterdir()], "after the last reader nothing is kept, nothing half-removed"
    assert any("removed mlp_pruned" in line for line in lines)
    removed = json.loads((root / "results" / "stages" / "removed_checkpoints.json").read_text())
    assert removed == {"head_pruned": "02", "mlp_pruned": "03", "mix_pruned": "03", "head_pruned_lora": "04",
                       "mix_pruned_lora": "04", "depth_pruned": "03b", "lowrank_pruned": "03b",
                       "hybrid_pruned": "03b", "baseline_int8": "03b"}
    # removed checkpoints count as written: a second run skips every stage
    log.clear()
    assert [r["status"] for r in run(params, root=root, log=lambda *_: None)] == ["skipped"] * len(STAGES)
    # a stage that must re-run and reads removed checkpoints re-runs their writers first
    run(dict(params, RECOVERY_STEPS=5), root=root, log=lambda *_: None)
    # 05 reads no checkpoint; it re-runs because a stage before it did (stamps chain)
    assert [k for k, _ in log] == ["02", "03", "04", "05", "06"]
    # KEEP_CHECKPOINTS='all' (the default) keeps everything
    keep_all = _fake_project(tmp_path / "all")
    _fake_checkpoint_stages(keep_all, monkeypatch, [])
    run(resolve_parameters("smoke"), root=keep_all, log=lambda *_: None)
    assert len(list((keep_all / "models").iterdir())) == 12  # 02, 03, 03b (3 methods + 4 INT8) and 04 outputs
    with pytest.raises(ParameterError, match="KEEP_CHECKPOINTS expects one of all, needed"):
        resolve_parameters("smoke", {"KEEP_CHECKPOINTS": "some"})


def test_a_failed_stage_leaves_nothing_half_written_and_removes_nothing(tmp_path, monkeypatch):
    root = _fake_project(tmp_path)
    log: list = []
    _fake_checkpoint_stages(root, monkeypatch, log, fail="03")
    params = resolve_parameters("smoke", {"KEEP_CHECKPOINTS": "needed", "VARIANTS": "baseline"})
    with pytest.raises(stages.StageFailed, match=r"(?s)stage 03 .*kernel died.*removed half-written.*\.tmp-03-1234"):
        run(params, root=root, log=lambda *_: None)
    assert sorted(p.name for p in (root / "models").iterdir()) == ["head_pruned"]  # 03's input stays for a re-run
    assert not (root / "results" / "stages" / "03.json").exists()


def _writes_outputs(root, calls: list):
    """Return a stand-in for papermill.execute_notebook that records the stage key and writes its outputs."""
    def execute(src, *args, **kwargs):
        stage = next(s for s in STAGES if src.endswith(s.notebook))
        calls.append(stage.key)
        for out in stage.outputs:
            (root / out).parent.mkdir(parents=True, exist_ok=True)
            (root / out).write_text("x")
    return execute


def test_a_stage_re_runs_after_an_upstream_stage_that_an_only_run_left_behind(tmp_path, monkeypatch):
    """`--only 02,03,04,06` leaves 03b of the old parameters; `--only 03b,06` then re-runs 06 on the new 03b."""
    import papermill

    root, calls = _fake_project(tmp_path), []
    monkeypatch.setattr(papermill, "execute_notebook", _writes_outputs(root, calls))
    params = resolve_parameters("smoke")
    quiet = dict(root=root, log=lambda *_: None)
    run(params, **quiet)
    changed = dict(params, HEAD_RATE=0.5)  # read by 02: every decoder stage after it builds on it
    calls.clear()
    run(changed, only=["02", "03", "04", "06"], **quiet)
    assert calls == ["02", "03", "04", "06"]
    calls.clear()
    run(changed, only=["03b", "06"], **quiet)
    assert calls == ["03b", "06"], "06 must re-run: it was built on the 03b of the old parameters"
    calls.clear()
    run(changed, only=["03b", "06"], **quiet)
    assert calls == []
    calls.clear()
    # 04 was built on the 03b of the old parameters, 05 never ran on the new 02, and 06 builds on both
    run(changed, **quiet)
    assert calls == ["04", "05", "06"]
    calls.clear()
    run(changed, **quiet)
    assert calls == []


def test_stamps_of_older_versions_without_upstream_digests_still_count_as_finished(tmp_path, monkeypatch):
    import papermill

    root, calls = _fake_project(tmp_path), []
    monkeypatch.setattr(papermill, "execute_notebook", _writes_outputs(root, calls))
    params = resolve_parameters("smoke")
    run(params, root=root, log=lambda *_: None)
    stripped = 0
    for stamp in (root / "results" / "stages").glob("*.json"):
        record = json.loads(stamp.read_text())
        if isinstance(record, dict) and "upstream_seen" in record:
            del record["upstream_seen"]
            stamp.write_text(json.dumps(record))
            stripped += 1
    assert stripped == len(STAGES), "every stage that ran records what it built on"
    calls.clear()
    run(params, root=root, log=lambda *_: None)
    assert calls == []


def test_encoder_stage_runs_by_profile(tmp_path, monkeypatch):
    import papermill

    calls = []
    for profile, want in (("encoder", ["07"]), ("default", [s.key for s in STAGES if not s.encoder])):
        root, lines = _fake_project(tmp_path / profile), []
        monkeypatch.setattr(papermill, "execute_notebook", _writes_outputs(root, calls))
        calls.clear()
        run(resolve_parameters(profile), root=root, log=lines.append)
        assert calls == want
    assert any("[07] skipped (ENCODER_STAGE=off)" in line for line in lines)


def test_run_time_table_keeps_the_stages_a_partial_run_did_not_measure(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNING_RUN_STARTED", raising=False)
    table = tmp_path / "results" / "ablation_studies" / stages.RUN_TIME_FILE
    table.parent.mkdir(parents=True)
    table.write_text("stage,notebook,minutes,profile,commit\ninstall,scripts/install.sh,0.30,default,abc1234\n"
                     "00,00-setup-01-baseline-and-importance.ipynb,11.00,default,abc1234\n"
                     "05,05_adaptive_runtime.ipynb,8.00,default,abc1234\ntotal,,19.30,default,\n")
    stamp = tmp_path / "results" / "stages" / "05.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"digest": "x", "seconds": 120.0, "commit": "def5678", "speed_s": 0.5}))
    stages.write_run_time(tmp_path, "default", 0.0)
    rows = {r.split(",")[0]: r.split(",") for r in table.read_text().splitlines()[1:]}
    machine = timing.machine_name()
    assert rows["00"][2:6] == ["11.00", "default", "abc1234", ""]  # not re-run here: kept, with where it was measured
    assert rows["install"][2:6] == ["0.30", "default", "abc1234", ""]
    assert rows["05"][2:] == ["2.00", "default", "def5678", "0.500", "", machine]  # measured by this checkout's run
    assert rows["total"][2] == "13.30" and "03" not in rows


def test_an_encoder_run_times_itself_apart_from_the_default_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNING_RUN_STARTED", raising=False)
    results = tmp_path / "results"
    (results / "stages").mkdir(parents=True)
    for key, seconds in (("00", 600.0), ("07", 300.0)):
        (results / "stages" / f"{key}.json").write_text(json.dumps({"digest": "x", "seconds": seconds,
                                                                   "commit": "abc1234"}))
    encoder = stages.write_run_time(tmp_path, "encoder", 0.0, {"ENCODER_STAGE": "only"})
    default = stages.write_run_time(tmp_path, "default", 0.0, {"ENCODER_STAGE": "off"})
    assert encoder.name == stages.ENCODER_RUN_TIME_FILE and default.name == stages.RUN_TIME_FILE
    enc_rows = {r.split(",")[0]: r.split(",") for r in encoder.read_text().splitlines()[1:]}
    dec_rows = {r.split(",")[0]: r.split(",") for r in default.read_text().splitlines()[1:]}
    assert set(enc_rows) == {"07", "total"} and enc_rows["total"][2] == "5.00"
    assert set(dec_rows) == {"00", "total"} and dec_rows["total"][2] == "10.00"


def test_one_parameter_chooses_the_saved_recipes_criterion():
    params = stages.resolve_parameters("default", {"CRITERIA": "magnitude,fluctuation"}, environ={})
    assert stages.as_list(params["CRITERIA"]) == ["magnitude", "fluctuation", "semantic_refit"]  # 00 computes it
    default = stages.resolve_parameters("default", {}, environ={})
    assert default["CRITERIA"] == stages.PROFILES["default"]["CRITERIA"]  # already there: unchanged
    thorough = stages.resolve_parameters("thorough", {}, environ={})
    assert "obs" not in stages.as_list(thorough["CRITERIA"])  # obs comes from the Grams of 02 / 03


def test_notebook_05_owes_its_live_table_only_when_the_live_evaluation_runs():
    stage = next(s for s in STAGES if s.key == "05")
    live = [o for o in stage.outputs if o.endswith(stages.LIVE_TABLE)]
    assert len(live) == 1
    assert live[0] in stage.expected(resolve_parameters("default", {}))
    for override in ({"ADAPTIVE_LIVE_EVAL": "false"}, {"ADAPTIVE_LOAD": "live"}):
        expected = stage.expected(resolve_parameters("default", override))
        assert live[0] not in expected and set(expected) == set(stage.outputs) - set(live)


def test_run_refuses_stages_whose_memory_plans_do_not_fit_before_running_any(tmp_path, monkeypatch):
    import papermill

    from pruning_utils.pipeline import memory_plan

    root = _fake_project(tmp_path)
    calls = []
    monkeypatch.setattr(papermill, "execute_notebook", _writes_outputs(root, calls))
    params = resolve_parameters("smoke")
    real = memory_plan.preflight(params, ["00", "02"])
    assert all(r["fits"] for r in real) and real[0]["need_gb"] != real[1]["need_gb"]  # room for the tiny model
    # a machine with 1 MiB free: every stage's plan (the tiny model's weights alone) is over it
    monkeypatch.setattr(memory_plan, "_host_available", lambda: 2 ** -10)
    with pytest.raises(stages.StageFailed) as err:
        run(params, root=root, only=["00", "02"], log=lambda *_: None)
    text = str(err.value)
    assert "stages 00, 02 of this run do not fit" in text and "Nothing was run" in text
    assert "--ignore-memory-plan" in text and "What to do:" in text  # check_plan's advice comes along
    assert not calls and not list((root / "results").glob("stages/*.json"))
    # only one of them over: the advice names the stages that fit
    monkeypatch.setattr(memory_plan, "_host_available", lambda: (real[0]["need_gb"] + real[1]["need_gb"]) / 2)
    with pytest.raises(stages.StageFailed, match="--only 0"):
        run(params, root=root, only=["00", "02"], log=lambda *_: None)
    # and the user may run anyway
    monkeypatch.setattr(memory_plan, "_host_available", lambda: 2 ** -10)
    assert [r["status"] for r in run(params, root=root, only=["00"], log=lambda *_: None,
                                     check_memory=False)][0] == "ran"
    assert calls == ["00"]


def test_the_memory_check_is_skipped_with_a_note_when_no_plan_can_be_made(tmp_path, monkeypatch):
    lines = []
    stages.memory_preflight(dict(resolve_parameters("smoke"), MODEL="no/such-model-here"), ["00"], log=lines.append)
    assert lines and lines[0].startswith("memory check skipped")
    ok = []
    stages.memory_preflight(resolve_parameters("smoke"), ["00", "03b", "07"], log=ok.append)
    assert ok[0].startswith("memory check: 00 ") and "03b" not in ok[0]
