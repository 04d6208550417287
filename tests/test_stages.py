"""The stage runner without kernels: validation before anything runs, typed parameters, per-notebook digests."""
import json
from pathlib import Path

import pytest

from pruning_utils import profiles, stages
from pruning_utils.profiles import ParameterError, coerce, parse_value
from pruning_utils.stages import STAGES, UsageError, main, parse_only, resolve_parameters, run, stage_digests


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
    code, err = _main(["--only", "07"], tmp_path, capsys)
    assert code == 2 and "'07'" in err and "known: 00, 02, 03, 03b, 04, 06" in err
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
    ("HEAD_RATE", "0.3", 0.3), ("HEAD_RATE", "1", 1.0), ("N_CALIB", "16", 16), ("N_CALIB", "1e2", 100),
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
    params = resolve_parameters("smoke", {"head_rate": 1, "mlp_sweep": [0.25, 0.5]}, environ={"PRUNE_N_CALIB": "4"})
    assert params["HEAD_RATE"] == 1.0 and isinstance(params["HEAD_RATE"], float)
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
    before = list(stage_digests(base, root))
    after = list(stage_digests(dict(base, ZERO_SHOT_LIMIT=10), root))  # read by 06 only
    assert before[:-1] == after[:-1] and before[-1] != after[-1]
    changed = list(stage_digests(dict(base, HEAD_RATE=0.5), root))  # read by 02; 03..06 build on it
    assert changed[0] == before[0] and all(c != b for c, b in zip(changed[1:], before[1:]))


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
    assert all("finished, same parameters" in line for line in lines)
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
    probe = "import sys, pruning_utils.stages; sys.exit('torch' in sys.modules)"  # run_all.sh checks before installing
    assert subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parent.parent).returncode == 0
