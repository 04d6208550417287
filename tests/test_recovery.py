"""LoRA recovery: adapters on pruned (non-uniform) layers, merge equivalence, training, distillation,
the divergence guard, the script and a 2-process data-parallel run on CPU."""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning_utils.model.checkpoint import is_pruned_checkpoint, load_pruned, save_pruned
from pruning_utils.model.surgery import prune_heads, prune_neurons
from pruning_utils.model.tiny import TinyTokenizer, tiny_model
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.recovery import launch
from pruning_utils.recovery.launch import main as train_main
from pruning_utils.recovery.lora import (
    RecoveryConfig,
    RecoveryDivergedError,
    attach_lora,
    distillation_loss,
    heldout_loss,
    merge_lora,
    recover,
    train_lora,
)
from pruning_utils.recovery.training_data import instruction_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def windows(n: int = 16, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def fast_cfg(**kw) -> RecoveryConfig:
    return RecoveryConfig(**{**dict(seq_len=32, batch_size=4, dropout=0.0, warmup_steps=0, lr=1e-2), **kw})


def pruned_tiny():
    """A tiny Llama whose layers differ: layer 1 keeps 40 of 96 MLP channels, layer 2 keeps 4 of 8 heads."""
    model = tiny_model("llama")
    prune_neurons(model, {1: list(range(0, 80, 2))})
    prune_heads(model, {2: [0, 1, 4, 5]})  # two heads in each of the two KV groups
    return model


def lm_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_config_json_round_trip_and_errors():
    cfg = RecoveryConfig(r=4, loss="mix", target_modules=["q_proj", "down_proj"])
    assert RecoveryConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="known"):
        RecoveryConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="max_epochs"):
        RecoveryConfig(max_epochs=2.0)
    with pytest.raises(ValueError, match="known: lm, distill, mix"):
        RecoveryConfig(loss="kl")


def test_lora_attaches_to_non_uniform_layers():
    model = pruned_tiny()
    peft_model = attach_lora(model, fast_cfg())
    layers = peft_model.base_model.model.model.layers
    for name in ("up_proj", "down_proj", "gate_proj"):
        lora = getattr(layers[1].mlp, name)
        base = lora.base_layer
        assert lora.lora_A["default"].in_features == base.in_features
        assert lora.lora_B["default"].out_features == base.out_features
    assert layers[1].mlp.up_proj.base_layer.out_features == 40
    assert layers[2].self_attn.q_proj.lora_B["default"].out_features == 4 * 16
    assert layers[2].self_attn.o_proj.lora_A["default"].in_features == 4 * 16
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert peft_model(input_ids=windows(2)).logits.shape == (2, 32, 128)


def test_merge_gives_adapter_logits():
    peft_model = attach_lora(pruned_tiny(), fast_cfg())
    # gradient accumulation and checkpointing ride along: 16 windows / (batch 4 x accum 2) = 2 steps
    stats = train_lora(peft_model, windows(16), fast_cfg(grad_accum=2, grad_checkpointing=True), progress=False)
    assert stats["steps"] == 2 and stats["tokens_seen"] == 16 * 32
    lora_b = peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # otherwise merging would be trivially exact
    ids = windows(2, seed=1)
    with torch.no_grad():
        with_adapters = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        assert not any("lora" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapters, atol=1e-4, rtol=0)


def test_a_few_steps_lower_the_loss(tmp_path):
    ids = windows(16)
    model = tiny_model("qwen3")
    before = lm_loss(model, ids)
    merged, stats = recover(model, None, ids, fast_cfg(max_steps=100, warmup_steps=2),
                            log_csv=tmp_path / "loss.csv", progress=False)
    assert stats["steps"] == 4  # 16 windows / batch 4: one epoch caps max_steps
    assert stats["tokens_seen"] == 16 * 32
    assert [h[0] for h in stats["history"]] == [1, 2, 3, 4]
    assert lm_loss(merged, ids) < before - 0.01
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,device,commit" and len(lines) == 5


def test_heldout_loss_is_deterministic_and_scores_the_same_windows_before_and_after(tmp_path):
    model = tiny_model("qwen3")
    cfg = fast_cfg(max_steps=4, dropout=0.1)  # dropout on: the held-out figure must still be deterministic
    held = windows(16)[:6]  # random tokens: only windows it trained on can show the loss falling
    first, again = heldout_loss(model, held, cfg), heldout_loss(model, held, cfg, batch_size=4)
    assert first == pytest.approx(again, rel=1e-6)  # batching does not change a per-window mean
    assert first == pytest.approx(lm_loss(model, held), rel=1e-5)  # equal windows: the mean loss of all tokens
    assert not model.training
    untouched = copy.deepcopy(model)
    merged, stats = recover(model, None, windows(16), cfg, heldout_windows=held, progress=False)
    assert stats["heldout_loss_before"] == pytest.approx(heldout_loss(untouched, held, cfg), rel=1e-5)
    assert stats["heldout_loss_after"] == pytest.approx(heldout_loss(merged, held, cfg), rel=1e-4)
    assert stats["heldout_loss_after"] < stats["heldout_loss_before"]
    _, plain = recover(tiny_model("qwen3"), None, windows(16), cfg, progress=False)
    assert math.isnan(plain["heldout_loss_before"]) and math.isnan(plain["heldout_loss_after"])
    with pytest.raises(ValueError, match="teacher"):
        heldout_loss(model, held, fast_cfg(loss="distill"))


def test_recover_hands_back_the_training_memory_after_the_merge(monkeypatch):
    """What training freed goes back to the OS after every step (a 0.5B rehearsal's second step peaked 1.3 GiB above
    its first on the first step's freed activations), before the held-out loss after training (5.7 GiB above its
    figure before) and before the caller measures the merged model (a 1.5B rehearsal: 0.5 GiB of freed steps
    resident next to the evaluation's logits)."""
    from pruning_utils.measure import metrics

    events = []
    monkeypatch.setattr(metrics, "trim_heap", lambda: events.append("trim"))
    import pruning_utils.recovery.lora as lora

    real_merge = lora.merge_lora
    real_loss, real_heldout = lora._loss, lora.heldout_loss
    monkeypatch.setattr(lora, "merge_lora", lambda *a, **k: events.append("merge") or real_merge(*a, **k))
    monkeypatch.setattr(lora, "_loss", lambda *a, **k: events.append("loss") or real_loss(*a, **k))
    monkeypatch.setattr(lora, "heldout_loss", lambda *a, **k: events.append("heldout") or real_heldout(*a, **k))
    recover(tiny_model("qwen3"), None, windows(8), fast_cfg(max_steps=2, batch_size=2), progress=False,
            heldout_windows=windows(2))
    # heldout_loss's own forwards are `_loss` calls too
    assert events == ["heldout", "loss", "loss", "trim", "loss", "trim", "trim", "heldout", "loss", "merge", "trim"]


def test_distillation_loss_is_zero_for_identical_models():
    logits = torch.randn(2, 5, 128)
    assert distillation_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 128), 2.0).item() > 0.1
    # LoRA's B starts at zero, so the student equals its teacher at the first step
    model = tiny_model("mistral")
    teacher = copy.deepcopy(model)
    peft_model = attach_lora(model, fast_cfg())
    stats = train_lora(peft_model, windows(8), fast_cfg(loss="distill", max_steps=2), teacher=teacher, progress=False)
    assert stats["loss_first"] == pytest.approx(0.0, abs=1e-5)
    stats = train_lora(peft_model, windows(8), fast_cfg(loss="mix", max_steps=1), teacher=teacher, progress=False)
    assert stats["loss_first"] > 1.0  # half of the ~4.8 LM loss
    with pytest.raises(ValueError, match="teacher"):
        train_lora(peft_model, windows(8), fast_cfg(loss="distill"), progress=False)


def test_nan_guard_restores_last_good_step():
    from peft import get_peft_model_state_dict

    base = tiny_model("llama")
    cfg = fast_cfg(schedule="constant", batch_size=2)
    reference = attach_lora(copy.deepcopy(base), cfg)
    train_lora(reference, windows(16), RecoveryConfig.from_dict({**cfg.to_dict(), "max_steps": 2}), progress=False)

    peft_model = attach_lora(base, cfg)
    calls = {"n": 0}

    def poison_third_forward(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    handle = peft_model.base_model.model.lm_head.register_forward_hook(poison_third_forward)
    try:
        with pytest.raises(RecoveryDivergedError, match="lower lr") as err:
            train_lora(peft_model, windows(16), cfg, progress=False)
    finally:
        handle.remove()
    assert err.value.stats["steps"] == 2
    got, want = get_peft_model_state_dict(peft_model), get_peft_model_state_dict(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)


class _ChatTokenizer(TinyTokenizer):
    def __init__(self):
        super().__init__()
        self.chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


def test_instruction_windows(tmp_path):
    path = tmp_path / "dolly.jsonl"
    rows = [{"instruction": f"Say {i}", "context": "ctx" if i % 2 else "", "response": f"Answer number {i}."}
            for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = TinyTokenizer()

    def holds(ids: torch.Tensor, text: str) -> bool:  # TinyTokenizer.decode is not encode's inverse: compare ids
        return str(tok.encode(text))[1:-1] in str(ids.flatten().tolist())

    plain = instruction_windows(tok, path, seq_len=32)
    assert plain.dtype == torch.long and plain.shape[1] == 32
    assert holds(plain, "### Instruction:\nSay 1\n\nctx\n\n### Response:\nAnswer number 1.")
    chat = instruction_windows(_ChatTokenizer(), path, seq_len=32)
    assert holds(chat, "<user>Say 0</user><assistant>Answer number 0.</assistant>")
    with pytest.raises(ValueError, match="response_field"):
        instruction_windows(TinyTokenizer(), path, seq_len=32, response_field="output")


def _script_config(tmp_path: Path, max_steps: int, batch_size: int) -> Path:
    model = pruned_tiny()
    save_pruned(model, TinyTokenizer(), tmp_path / "pruned")
    torch.save(windows(16), tmp_path / "windows.pt")
    cfg = {"model_dir": str(tmp_path / "pruned"), "out_dir": str(tmp_path / "recovered"),
           "windows_path": str(tmp_path / "windows.pt"),
           "recovery": {"seq_len": 32, "batch_size": batch_size, "lr": 1e-2, "warmup_steps": 0, "max_steps": max_steps}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_script_single_process(tmp_path):
    config = _script_config(tmp_path, max_steps=3, batch_size=4)
    out = train_main(["--config", str(config), "--save-state-dict", str(tmp_path / "sd.pt"), "--no-progress"])
    assert is_pruned_checkpoint(out) and (out / "recovery_loss.csv").exists()
    stats = json.loads((out / "recovery_stats.json").read_text())
    assert stats["steps"] == 3
    assert math.isfinite(stats["heldout_loss_before"]) and math.isfinite(stats["heldout_loss_after"])
    model, _ = load_pruned(out)
    dumped = torch.load(tmp_path / "sd-rank0.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dumped[k])
    assert model.model.layers[1].mlp.up_proj.out_features == 40


def test_recover_data_parallel_writes_the_config_launches_and_reads_back(tmp_path, models_dir, monkeypatch):
    save_pruned(pruned_tiny(), TinyTokenizer(), "pruned")  # a bare name: under models/
    cfg = fast_cfg(max_steps=2)
    launched, real_run = {}, subprocess.run

    def fake_run(cmd, env=None, **kw):  # stands in for accelerate: runs the entry point in this process
        if "accelerate.commands.launch" not in cmd:  # anything else (git stamping a result) runs for real
            return real_run(cmd, env=env, **kw)
        launched["cmd"] = cmd
        config = cmd[cmd.index("--config") + 1]
        launched["run"] = json.loads(Path(config).read_text())
        train_main(["--config", config, "--no-progress"])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    merged, stats = launch.recover_data_parallel("pruned", "pruned_lora", cfg, text_source="embedded", seed=3,
                                                      n_gpus=2, config_path=tmp_path / "cfg.json")
    cmd = launched["cmd"]
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[cmd.index("-m", 3):][:2] == ["-m", "pruning_utils.recovery.launch"]
    run = launched["run"]
    assert run["model_dir"] == str((models_dir / "pruned").resolve())  # ranks need not share this process's env
    assert run["out_dir"] == str((models_dir / "pruned_lora").resolve()) and run["seed"] == 3
    assert RecoveryConfig.from_dict(run["recovery"]) == cfg and run["teacher_dir"] is None
    assert stats["steps"] == 2 and [h[0] for h in stats["history"]] == [1, 2]
    assert math.isfinite(stats["heldout_loss_after"])
    assert merged.model.layers[1].mlp.up_proj.out_features == 40 and not merged.training

    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, env=None: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="Re-run by hand"):
        launch.recover_data_parallel("pruned", "x", cfg, n_gpus=2)
    with pytest.raises(ValueError, match="recovery.recover"):
        launch.recover_data_parallel("pruned", "x", cfg, n_gpus=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_data_parallel_run_agrees(tmp_path):
    config = _script_config(tmp_path, max_steps=100, batch_size=2)
    # `--cpu` sends accelerate to its simple launcher, which starts ONE process unless MPI is set up;
    # `--multi_gpu` goes through torchrun, and with no visible GPU each rank runs on CPU over gloo.
    # `-m` runs from cwd=PROJECT_ROOT, so every rank imports this checkout's package (or the installed one)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "pruning_utils.recovery.launch", "--config", str(config), "--save-state-dict", str(tmp_path / "sd.pt"),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((tmp_path / "recovered" / "recovery_stats.json").read_text())
    assert stats["num_processes"] == 2
    assert stats["steps"] == 4  # 16 windows / (2 ranks x batch 2)
    rank0 = torch.load(tmp_path / "sd-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "sd-rank1.pt", weights_only=True)
    before = load_pruned(tmp_path / "pruned")[0].state_dict()
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], atol=0, rtol=0)
    assert not torch.equal(rank0["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"])


def test_merged_uniform_checkpoint_loads_with_stock_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("mistral")
    prune_heads(model, {i: [0, 1, 4, 5] for i in range(3)})  # uniform: every layer 4 heads
    prune_neurons(model, {i: list(range(64)) for i in range(3)})
    cfg = RecoveryConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, seed=0)
    merged, _ = recover(model, TinyTokenizer(), windows(), cfg, progress=False)
    folder = save_pruned(merged, TinyTokenizer(), tmp_path / "merged")
    ids = windows(2, 16, seed=3)
    with torch.no_grad():
        ref = merged(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(folder).eval()
        ours, _ = load_pruned(folder)
        assert (stock(ids).logits - ref).abs().max() <= 1e-5
        assert (ours(ids).logits - ref).abs().max() <= 1e-5
    assert not any("lora" in k for k in stock.state_dict())


def test_self_data_distillation_trains_on_the_teachers_answers_and_lowers_the_loss(models_dir):
    from pruning_utils.recovery.training_data import recovery_windows, selfdistill_windows

    teacher, tok = tiny_model("llama"), TinyTokenizer()
    prompts = [f"question {i}: tell me about item {i}" for i in range(12)]
    own = selfdistill_windows(teacher, tok, seq_len=32, prompts=prompts, max_new_tokens=16, batch_size=4)
    cache = list((models_dir / "_cache" / "selfdistill").glob("answers-*.jsonl"))
    assert len(cache) == 1 and len(cache[0].read_text().splitlines()) == len(prompts)
    assert own.shape[1] == 32 and len(own) >= 6
    assert torch.equal(own, selfdistill_windows(teacher, tok, seq_len=32, prompts=prompts, max_new_tokens=16))
    text = lambda n: windows(n, 32, seed=5)  # noqa: E731
    mixed = recovery_windows("selfdistill+text", tok, 8, 32, teacher, text, prompts=prompts, max_new_tokens=16)
    assert len(mixed) == 8 and {tuple(r.tolist()) for r in own[:4]} <= {tuple(r.tolist()) for r in mixed}
    with pytest.raises(ValueError, match="known: text, selfdistill"):
        recovery_windows("self", tok, 8, 32, teacher, text)
    student = pruned_tiny()
    cfg = fast_cfg(loss="distill", max_steps=100)
    train = recovery_windows("selfdistill", tok, 16, 32, teacher, text, prompts=prompts, max_new_tokens=16)
    _, stats = recover(student, tok, train, cfg, teacher=teacher, heldout_windows=train[:4], progress=False)
    assert stats["heldout_loss_after"] < stats["heldout_loss_before"]


def test_training_windows_read_the_instruction_file_or_draw_other_calibration_windows(tmp_path):
    from pruning_utils.data.sources import calibration_windows
    from pruning_utils.recovery.training_data import training_windows

    tok = TinyTokenizer()
    text = training_windows("text", tok, "embedded", 4, 16, model=None, seed=3)
    assert torch.equal(text, calibration_windows(tok, "embedded", n_samples=4, seq_len=16, seed=4))  # seed + 1
    assert not torch.equal(text, calibration_windows(tok, "embedded", n_samples=4, seq_len=16, seed=3))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"instruction": "Name a color.", "response": "Blue."}\n')
    assert torch.equal(training_windows("text", tok, "embedded", 4, 16, model=None, instruction_jsonl=jsonl),
                       instruction_windows(tok, jsonl, 16))


def test_recovery_row_reports_quality_before_and_after_and_the_damage_won_back():
    from pruning_utils.recovery.report import recovery_row

    stats = dict(steps=4, tokens_seen=512, heldout_loss_before=3.0, heldout_loss_after=2.5, loss_first=3.1,
                 loss_last=2.4, minutes=0.1, tokens_per_s=90.0)
    before = dict(ppl=14.0, fidelity_ppl=20.0, kl_to_baseline=0.3)
    after = dict(ppl=12.0, fidelity_ppl=18.0, kl_to_baseline=0.2, device="cpu", dtype="float32")
    kept = dict(cosine_mean=0.8), dict(cosine_mean=0.9)
    row = recovery_row("mix_pruned", stats, before, after, dict(ppl=10.0), *kept, loss="lm", data="text")
    assert row["model"] == "mix_pruned" and (row["loss"], row["data"]) == ("lm", "text")
    assert row["damage_recovered_pct"] == pytest.approx(50.0)  # 14 -> 12 of the 4 points lost to pruning
    assert (row["semantic_before"], row["semantic_after"], row["kl_before"], row["kl_after"]) == (0.8, 0.9, 0.3, 0.2)
    assert (row["ppl_baseline"], row["ppl_before"], row["ppl_after"], row["steps"]) == (10.0, 14.0, 12.0, 4)
    no_damage = recovery_row("x", stats, dict(ppl=9.0), after, dict(ppl=10.0), *kept, loss="lm", data="text")
    assert math.isnan(no_damage["damage_recovered_pct"]) and no_damage["fidelity_before"] is None


def test_a_recovery_that_lowers_retention_is_flagged(capsys):
    from pruning_utils.recovery.report import warn_if_retention_fell

    assert warn_if_retention_fell("m", {"cosine_mean": 0.8}, {"cosine_mean": 0.7}, "text", "lm")
    assert "LOWERED semantic retention 0.800 -> 0.700" in capsys.readouterr().out
    assert not warn_if_retention_fell("m", {"cosine_mean": 0.7}, {"cosine_mean": 0.8}, "text", "lm")
    assert capsys.readouterr().out == ""


def test_budget_curve_rows_reproduce_with_the_seed_and_leave_the_pruned_model_alone():
    from pruning_utils.recovery.bench import budget_curve

    pruned, teacher = pruned_tiny(), tiny_model("llama")
    ids = windows(64)
    state = {k: v.clone() for k, v in pruned.state_dict().items()}

    def curve(seed: int) -> list[dict]:
        def measure(model, stats):
            return dict(steps=stats["steps"] if stats else 0, loss=lm_loss(model, ids[:8]))
        return budget_curve(pruned, teacher, lambda n: ids[:n], [2, 6],
                            lambda n: fast_cfg(max_steps=n, loss="distill", seed=seed), measure, progress=False)

    first, again, other = curve(0), curve(0), curve(1)
    assert [r["steps"] for r in first] == [0, 2, 6]
    assert first == again  # bit for bit: windows, LoRA initialisation and order are seeded
    assert first[0] == other[0] and first[1:] != other[1:]  # the seed reaches the runs, not the unrecovered row
    assert first[2]["loss"] != first[1]["loss"]  # each budget is its own run
    assert all(torch.equal(v, state[k]) for k, v in pruned.state_dict().items())


def test_recovery_budget_labels_another_profile_and_refuses_a_missing_checkpoint(tmp_path):
    """Rows of another profile's checkpoint are labelled by it (the default's keep the bare name), and a --models
    folder without the checkpoint stops before anything loads, saying how to make it."""
    import pandas as pd

    from benchmarks import recovery_budget as rb

    assert rb.label("mix_pruned", "default") == "mix_pruned"
    assert rb.label("mix_pruned", "thorough") == "thorough:mix_pruned"
    with pytest.raises(SystemExit, match="no checkpoint 'mix_pruned' under .*stages 02-03"):
        rb.main(["--profile", "thorough", "--models", str(tmp_path), "--steps", "4"])
    table = pd.DataFrame(dict(model=["thorough:mix_pruned"], steps=[0]))
    with pytest.raises(SystemExit, match="no rows of 'mix_pruned'.*thorough:mix_pruned"):
        rb.save_curve(table)
