"""Faults and bad input: every refusal comes before the work and names the cause.

Parameters out of range and stages the profile leaves out stop `--check`; results, stamps and histories survive a full
disk; a cut-short stamp does not kill the next run; bad data files are refused naming the file, the line and the fix.
"""
import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import pruning_utils
from pruning_utils.data.files import DataFileError
from pruning_utils.pipeline import profiles, stages

ROOT = Path(pruning_utils.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_prune_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith(("PRUNE_", "PRUNING_RESULTS_DIR", "PRUNING_MODELS_DIR"))]:
        monkeypatch.delenv(var)


# ------------------------------------------------------------------------------------------ parameters, --only


@pytest.mark.parametrize("name,value,got,takes", [
    ("HEAD_RATE", "1.5", "1.5", "[0, 1)"), ("HEAD_RATE", "-1", "-1.0", "[0, 1)"), ("N_CALIB", "0", "0", ">= 1"),
    ("MODEL", "", "''", "non-empty text"), ("ENCODER_MAX_TRAIN", "0", "0", ">= 1 (fine-tuning needs"),
    ("MLP_SWEEP", "0.25,1", "'0.25,1' (item '1'", "each [0, 1)"), ("ADAPTIVE_N_PROMPTS", "1", "1", ">= 2"),
    ("ADAPTIVE_LOAD", "0.9,0.1", "'0.9,0.1'", "low <= high"),
    ("RECON_OPTIONS", "none,lstq", "'none,lstq'", "did you mean lstsq"), ("DTYPE", "half", "'half'", "one of auto"),
])
def test_check_refuses_a_value_out_of_range(name, value, got, takes, tmp_path, capsys):
    assert stages.main(["--check", "-p", name, value], root=tmp_path) == 2
    err = capsys.readouterr().err
    assert f"parameter {name} expects" in err and f"got {got}" in err and takes in err and f"-p {name} " in err
    assert not list(tmp_path.iterdir())


def test_check_refuses_a_stage_the_profile_leaves_out(tmp_path, capsys):
    assert stages.main(["--check", "--only", "07"], root=tmp_path) == 2
    err = capsys.readouterr().err
    assert "07" in err and "ENCODER_STAGE is 'off'" in err
    assert "-p ENCODER_STAGE on" in err and "--profile encoder" in err
    assert stages.main(["--check", "--profile", "encoder", "--only", "07"], root=tmp_path) == 0
    assert stages.main(["--check", "--only", "06,07", "-p", "ENCODER_STAGE", "on"], root=tmp_path) == 0
    assert stages.main(["--check", "--profile", "encoder", "--only", "02"], root=tmp_path) == 2
    assert "ENCODER_STAGE is 'only'" in capsys.readouterr().err
    with pytest.raises(stages.UsageError, match="would not run"):  # the runner refuses it too, not just the CLI
        stages.run(stages.resolve_parameters("default"), root=tmp_path, only=["07"])


def test_run_all_check_exits_2_before_anything_is_installed():
    for args, says in ((["-p", "HEAD_RATE", "1.5"], "HEAD_RATE expects [0, 1)"),
                       (["--only", "07"], "--profile encoder")):
        proc = subprocess.run([sys.executable, "-m", "pruning_utils.pipeline.stages", "--check", *args], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_limits_mirror_the_library_registries():
    from pruning_utils.compress.depth import LAYER_CRITERIA
    from pruning_utils.compress.lowrank import SCALINGS
    from pruning_utils.encoder.variants import LOWRANK_RULES, LOWRANK_SCOPES
    from pruning_utils.model.devices import DTYPES
    from pruning_utils.pipeline.memory_plan import BUILD_CHOICES, GRAMS_CHOICES, OFFLOAD_MODES
    from pruning_utils.prune.allocation import ALLOCATIONS
    from pruning_utils.prune.reconstruction import MODES
    from pruning_utils.recovery.lora import LOSSES
    from pruning_utils.recovery.training_data import RECOVERY_DATA

    words = {n: set(limit.choices) for n, limit in profiles.LIMITS.items()}
    assert words["RECONSTRUCTION"] == words["RECON_OPTIONS"] == set(MODES)
    assert words["RECOVERY_LOSS"] == set(LOSSES) and words["RECOVERY_DATA"] == set(RECOVERY_DATA)
    assert words["COMPRESS_LOWRANK_METHODS"] == set(SCALINGS)
    assert words["COMPRESS_DEPTH_CRITERIA"] == set(LAYER_CRITERIA)
    assert words["DTYPE"] == set(DTYPES) | {"auto"} and words["ALLOCATION"] == set(ALLOCATIONS) | {"search"}
    assert words["GRAMS"] == set(GRAMS_CHOICES) and words["VARIANT_BUILD"] == set(BUILD_CHOICES)
    assert words["OFFLOAD"] == set(OFFLOAD_MODES)
    assert words["ENCODER_LOWRANK_RULE"] == set(LOWRANK_RULES) and words["ENCODER_LOWRANK_SCOPE"] == set(LOWRANK_SCOPES)
    assert set(profiles.LIMITS) <= set(profiles.PARAMS)


# ------------------------------------------------------------------------------------------ atomic writes


def _full_disk(monkeypatch, cls, method: str, when=lambda target: True):
    """Make `cls.method(self, target-or-text, ...)` write half of what it was given, then fail with ENOSPC."""
    real = getattr(cls, method)

    def half_then_enospc(self, arg, *a, **kw):
        target, text = (self, arg) if method == "write_text" else (Path(arg), real(self, None, *a, **kw))
        if not when(target):
            return real(self, arg, *a, **kw)
        Path.write_bytes(target, text[: len(text) // 2].encode())
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(cls, method, half_then_enospc)


def test_atomic_writes_keep_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    from pruning_utils.atomic import write_text_atomic
    from pruning_utils.recovery.lora import write_history_csv

    stamp, history = tmp_path / "stages" / "00.json", tmp_path / "lora" / "loss_history.csv"
    write_text_atomic(stamp, '{"digest": "abc"}')
    write_history_csv([(0, 2.0, 1e-3)], history)
    _full_disk(monkeypatch, Path, "write_text")
    _full_disk(monkeypatch, pd.DataFrame, "to_csv")
    with pytest.raises(OSError) as err:
        write_text_atomic(stamp, json.dumps({"digest": "x" * 100}))
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):
        write_history_csv([(i, 1.0, 1e-3) for i in range(50)], history)
    monkeypatch.undo()
    assert json.loads(stamp.read_text()) == {"digest": "abc"}
    assert pd.read_csv(history)[["step", "loss", "lr"]].values.tolist() == [[0, 2.0, 1e-3]]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["00.json", "loss_history.csv"]


def _project(root: Path) -> Path:
    """A checkout whose notebooks are stubs; papermill is replaced by `_write_outputs`."""
    for stage in stages.STAGES:
        (root / "notebooks").mkdir(parents=True, exist_ok=True)
        (root / "notebooks" / stage.notebook).write_text(f"stub {stage.key}")
    return root


def _write_outputs(monkeypatch, root: Path, ran: list):
    import papermill

    def execute(src, dst, **kw):
        stage = next(s for s in stages.STAGES if src.endswith(s.notebook))
        ran.append(stage.key)
        for out in stage.outputs:
            (root / out).parent.mkdir(parents=True, exist_ok=True)
            (root / out).write_bytes(b"x")

    monkeypatch.setattr(papermill, "execute_notebook", execute)


def test_a_stamp_cut_short_does_not_kill_the_next_run(tmp_path, monkeypatch):
    root, ran, lines = _project(tmp_path), [], []
    _write_outputs(monkeypatch, root, ran)
    params = stages.resolve_parameters("smoke")
    # the disk fills up while stage 00's stamp is written: the run stops with the OSError ...
    _full_disk(monkeypatch, Path, "write_text", when=lambda target: target.parent.name == "stages")
    with pytest.raises(OSError, match="No space left"):
        stages.run(params, root=root, only=["00"], log=lines.append)
    # ... and the next run is not killed by what it left: stage 00 re-runs and is stamped
    monkeypatch.undo()
    _write_outputs(monkeypatch, root, ran)
    stages.run(params, root=root, only=["00"], log=lines.append)
    assert ran == ["00", "00"] and json.loads((root / "results/stages/00.json").read_text())["digest"]
    # a stamp cut short by an older version counts as not finished, with a warning naming it
    (root / "results/stages/00.json").write_text('{"digest": "0123')
    stages.run(params, root=root, only=["00"], log=lines.append)
    assert ran == ["00"] * 3 and any("00.json is unreadable" in line and "re-runs" in line for line in lines)
    (root / "results/stages/00.json").write_text('{"dig')
    stages.write_run_time(root, "smoke", 0.0)  # the run-time table skips it too


def _unguarded_writes(path: Path) -> list[str]:
    """Return 'function:line' of every file write in a module that does not go through a temporary path of
    `atomic_file` / `atomic_folder` (a name bound by `with atomic_...(...) as tmp` in the same function)."""
    temp_makers = {"atomic_file", "atomic_folder", "TemporaryDirectory"}
    target_arg = {"to_csv": 0, "to_json": 0, "to_parquet": 0, "savefig": 0, "save_pretrained": 0, "save_file": 1}

    def name(node):
        return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None

    def target(call: ast.Call):
        fn = name(call.func)
        if fn in ("write_text", "write_bytes") and isinstance(call.func, ast.Attribute):
            return call.func.value
        if fn == "save" and isinstance(call.func, ast.Attribute) and name(call.func.value) == "torch":
            return call.args[1] if len(call.args) > 1 else None
        if fn == "open" and len(call.args) > 1 and isinstance(call.args[1], ast.Constant):
            return call.args[0] if set(str(call.args[1].value)) & set("wax+") else None
        return call.args[target_arg[fn]] if fn in target_arg and len(call.args) > target_arg[fn] else None

    found = []

    def visit(node, func: str, temps: set):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, temps = node.name, {item.optional_vars.id for w in ast.walk(node) if isinstance(w, ast.With)
                                      for item in w.items if isinstance(item.context_expr, ast.Call)
                                      and name(item.context_expr.func) in temp_makers
                                      and isinstance(item.optional_vars, ast.Name)}
        if isinstance(node, ast.Call) and (t := target(node)) is not None:
            if not {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} & temps:
                found.append(f"{func}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, func, temps)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>", set())
    return found


# writes allowed outside `atomic_file`: each inside a folder that is renamed into place afterwards, or no result
ALLOWED_WRITES = {
    "paths:write_manifest": "the manifest goes into atomic_folder's temporary folder, last",
    "model.checkpoint:*": "save_pruned hands these functions atomic_folder's temporary folder",
    "model.tiny:save_pretrained": "writes into the folder it is given: a checkpoint's temporary folder",
    "measure.metrics:_clear_peak_rss": "a kernel control file (/proc/self/clear_refs), no result",
    "recovery.launch:main": "--save-state-dict: a per-rank debugging dump its caller asked for",
    "recovery.launch:recover_data_parallel": "the launch's inputs, written before the processes that read them start",
    "serialization:to_json": "a leaf module that may import nothing of the package; no pipeline result goes through it",
    "progress:record_loop": "appends one whole line to the runner's profile log, read once the stage ends; a torn "
                            "last line is skipped (timing.step_rows)",
}


def test_results_stamps_and_histories_are_written_atomically(tmp_path):
    mod = tmp_path / "m.py"  # the scan can fail
    mod.write_text("def f(p, df):\n    p.write_text('x')\n    df.to_csv(p / 'a.csv')\n"
                   "    with atomic_file(p) as tmp:\n        tmp.write_text('x')\n        df.to_csv(tmp)\n"
                   "    with open(p, 'w') as f:\n        pass\n    open(p).read()\n")
    assert _unguarded_writes(mod) == ["f:2", "f:3", "f:7"]
    package = ROOT / "pruning_utils"
    bad = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package).with_suffix("").parts)
        bad += [f"{module}:{hit}" for hit in _unguarded_writes(path)
                if f"{module}:{hit.split(':')[0]}" not in ALLOWED_WRITES and f"{module}:*" not in ALLOWED_WRITES]
    assert not bad, ("files written in place (a full disk or a crash leaves them truncated): write through "
                     f"pruning_utils.atomic.atomic_file / write_text_atomic, or say why not in ALLOWED_WRITES: {bad}")


# ------------------------------------------------------------------------------------------ data files


def test_instruction_jsonl_errors_name_the_file_and_line(tmp_path):
    from pruning_utils.recovery.training_data import instruction_windows

    path = tmp_path / "dolly.jsonl"
    good = json.dumps({"instruction": "say\u2028hi", "response": "hi"}, ensure_ascii=False)
    path.write_text(f"{good}\n\n{{\"instruction\": \"x\", \"response\": \n{good}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"dolly\.jsonl:3: not valid JSON"):
        instruction_windows(None, path, seq_len=8)
    path.write_text(f"{good}\n\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"dolly\.jsonl:3: a JSON list, not an object"):
        instruction_windows(None, path, seq_len=8)
    path.write_text(json.dumps({"instruction": "é", "response": "x"}) + "\n", encoding="utf-16")
    with pytest.raises(DataFileError, match=r"dolly\.jsonl is UTF-16 .*not UTF-8: re-save it as UTF-8"):
        instruction_windows(None, path, seq_len=8)
    path.write_text("\n\n")
    with pytest.raises(DataFileError, match="holds no records"):
        instruction_windows(None, path, seq_len=8)


def test_prompt_json_errors_name_the_file_and_line(tmp_path):
    from pruning_utils.measure.evaluation import load_instructions

    path = tmp_path / "prompts.json"
    path.write_text('[{"id": "a", "category": "c", "prompt": "p"}]', encoding="utf-16")
    with pytest.raises(DataFileError, match=r"prompts\.json is UTF-16"):
        load_instructions(path)
    path.write_text('[\n{"id": "a",\n}]')
    with pytest.raises(DataFileError, match=r"prompts\.json:3: not valid JSON"):
        load_instructions(path)


def test_text_source_jsonl_names_the_line(tmp_path):
    from pruning_utils.data.sources import load_documents

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataFileError, match=r"docs\.jsonl:3"):
        load_documents(str(path))


def _task_file(tmp_path, name: str, rows: list[dict] | str, encoding="utf-8") -> str:
    path = tmp_path / name
    if isinstance(rows, str):
        path.write_bytes(rows.encode(encoding))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False, encoding=encoding)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding=encoding)
    return str(path)


@pytest.mark.parametrize("name,rows,message", [
    ("one.csv", [{"text": "good", "label": 1}], r"holds 1 row\(s\): a task needs at least 2"),
    ("header.csv", "text,label\n", r"holds 0 row\(s\)"),
    ("empty.jsonl", "\n", r"holds 0 row\(s\)"),
    ("same.csv", [{"text": t, "label": "pos"} for t in "abcd"], "every row has the label 'pos'.*at least 2 classes"),
    ("holes.csv", "text,label\na,1\n,0\nc,\nd,1\n", "empty text or label in row 2 after the header, row 3"),
    ("holes.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n', "empty text or label in line 3"),
    ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', r"broken\.jsonl:2: not valid JSON"),
    ("utf16.csv", "text,label\na,1\nb,0\n", r"utf16\.csv is UTF-16"),
    ("latin1.csv", "text,label\ncafé,1\nb,0\n", r"latin1\.csv is not UTF-8: byte 0xe9 on line 2"),
])
def test_bad_encoder_task_files_are_refused(tmp_path, name, rows, message):
    from pruning_utils.encoder import tasks as et

    encoding = {"utf16.csv": "utf-16", "latin1.csv": "latin-1"}.get(name, "utf-8")
    with pytest.raises(ValueError, match=message):
        et.load_task(_task_file(tmp_path, name, rows, encoding))


def test_encoder_task_cells_are_text_and_labels_numbered(tmp_path):
    from pruning_utils.encoder import tasks as et

    rows = [{"text": t, "label": lab} for t, lab in (("007", 1), ("1.50", 2), ("10", 1), ("2", 2), ("3e2", 1))]
    task = et.load_task(_task_file(tmp_path, "ids.csv", rows))
    texts = pd.concat([task.train, task.validation])
    assert sorted(texts["text"]) == ["007", "1.50", "10", "2", "3e2"]  # read as text, not as numbers
    assert task.num_labels == 2 and set(texts["label"]) == {0, 1} and task.provenance["classes"] == "1=0, 2=1"


def test_fine_tuning_that_cannot_progress_is_refused(monkeypatch):
    import torch

    from pruning_utils.encoder import tasks as et

    calls = []

    def batches(*a, **kw):  # were the loop entered, it would never end: stop it after a few passes
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("fine_tune looped over an empty training set")
        return iter(())

    monkeypatch.setattr(et, "batches", batches)
    empty = pd.DataFrame({"text": [], "label": []})
    with pytest.raises(ValueError, match=r"needs training rows and steps >= 1, got 0 row\(s\)"):
        et.fine_tune(torch.nn.Linear(2, 2), None, empty, steps=5)
    with pytest.raises(ValueError, match=r"got 1 row\(s\) and 0 step\(s\)"):
        et.fine_tune(torch.nn.Linear(2, 2), None, pd.DataFrame({"text": ["a"], "label": [0]}), steps=0)


def test_fine_tuned_baseline_cache_is_keyed_by_content(models_dir, monkeypatch):
    from pruning_utils.encoder import tasks as et
    from pruning_utils.encoder import variants as ev

    tuned = []

    def fake_fine_tune(model, tok, df, steps, *a, **kw):
        tuned.append(len(df))
        return pd.DataFrame({"step": [0], "loss": [0.5]})

    monkeypatch.setattr(et, "fine_tune", fake_fine_tune)
    frame = pd.DataFrame({"text": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]})
    run = dict(epochs=1.0, lr=1e-3, batch_size=4, max_length=16, seed=0)
    ev.baseline("tiny-bert", et.Task("toy", frame, frame, 2), **run)
    ev.baseline("tiny-bert", et.Task("toy", frame.copy(), frame, 2), **run)
    assert len(tuned) == 1  # same rows: the cache
    edited = frame.assign(text=["good", "bad", "fine", "dreadful"])  # same name, same size, other content
    ev.baseline("tiny-bert", et.Task("toy", edited, edited, 2), **run)
    three = frame.assign(label=[2, 0, 1, 0])  # another number of classes
    model, _, info = ev.baseline("tiny-bert", et.Task("toy", three, three, 3), **run)
    assert len(tuned) == 3 and model.config.num_labels == 3 and info["recipe"]["num_labels"] == 3


def test_adaptive_prompt_csv_is_checked_before_any_decoding(tmp_path):
    from pruning_utils.adaptive import controller

    path = tmp_path / "prompts.csv"
    for text, found in (("prompt\n", 0), ("prompt\nonly one\n", 1)):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"prompts\.csv holds {found} distinct prompt\(s\): .*at least 2"):
            controller.load_prompt_csv(path)
    path.write_text("prompt\nsame\n  same \n")
    with pytest.warns(UserWarning, match="1 duplicate"), pytest.raises(ValueError, match="holds 1 distinct"):
        controller.load_prompt_csv(path)
    path.write_text("")
    with pytest.raises(DataFileError, match=r"prompts\.csv is empty"):
        controller.load_prompt_csv(path)
    path.write_text("prompt\nhi\nho\n", encoding="utf-16")
    with pytest.raises(DataFileError, match="UTF-16"):
        controller.load_prompt_csv(path)
    path.write_text("prompt\n42\nwhy is the sky blue?\n42\nwhat is 2+2?\nwhy  is the sky blue?\nname a colour\n")
    with pytest.warns(UserWarning, match=r"2 duplicate prompt\(s\) removed before the train/test split"):
        pool = controller.load_prompt_csv(path)
    assert pool["prompt"].tolist() == ["42", "why is the sky blue?", "what is 2+2?", "name a colour"]
    train, test = controller.split_prompts(pool, seed=0)
    assert not set(train["prompt"]) & set(test["prompt"]) and len(train) + len(test) == 4
    with pytest.warns(UserWarning, match="the prompt table: 1 duplicate"):
        train, test = controller.split_prompts(pd.concat([pool, pool.iloc[:1]], ignore_index=True), seed=0)
    assert not set(train["prompt"]) & set(test["prompt"])
    with pytest.raises(ValueError, match="n=1 prompts cannot be split"):
        controller.split_prompts(pool, n=1)
