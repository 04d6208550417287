"""LoRA recovery as a script: `python -m pruning_utils.recovery.launch --config cfg.json`, or data parallel with
`accelerate launch --multi_gpu --num_processes N -m pruning_utils.recovery.launch --config cfg.json`;
`recover_data_parallel(...)` does the latter from Python (a notebook) and returns the merged model.

On CPU use the same `--multi_gpu` command with `CUDA_VISIBLE_DEVICES=""`: it goes through torchrun and the
ranks talk over gloo, whereas `accelerate launch --cpu --num_processes N` starts a single process unless
MPI is set up.

The config is JSON:
    {"model_dir": "models/pruned-x",      # any `load_model` spec: pruned checkpoint, HF folder, hub id, tiny-*
     "out_dir": "models/pruned-x-lora",   # folder, or a bare name under models/
     "recovery": {...},                   # RecoveryConfig fields; omitted ones take their defaults
     "text_source": "embedded",           # calibration text (see data.py), or
     "instruction_jsonl": null,           # a Dolly/Alpaca JSONL file (instruction_field / response_field), or
     "windows_path": null,                # a saved LongTensor [n, seq_len] (torch.save)
     "n_windows": null,                   # default: max_steps x batch_size x grad_accum x processes
     "seed": 0,                           # seed of the window sampling
     "n_heldout": 8,                      # fixed calibration windows scored before and after training (0: none)
     "heldout_seed": null,                # their sampling seed (default: seed + 1, so they differ from training)
     "heldout_path": null,                # or saved held-out windows (torch.save), used instead
     "teacher_dir": null}                 # teacher spec for loss "distill" / "mix" (e.g. the unpruned model)

Every rank builds the same windows and trains on its shard (the prepared DataLoader); the main process
merges the adapters and saves the checkpoint with `checkpoint.save_pruned`, plus the loss curve
(recovery_loss.csv) and statistics (recovery_stats.json) in the same folder.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pruning_utils.atomic import write_text_atomic
from pruning_utils.model.checkpoint import load_pruned, resolve_checkpoint_dir, save_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.recovery.lora import (
    RecoveryConfig,
    attach_lora,
    make_accelerator,
    merge_lora,
    train_lora,
    write_history_csv,
)

KNOWN_KEYS = ("model_dir", "out_dir", "recovery", "text_source", "instruction_jsonl", "instruction_field",
              "response_field", "windows_path", "heldout_path", "n_windows", "seed", "n_heldout", "heldout_seed",
              "teacher_dir")
STATS_FILE = "recovery_stats.json"
LOSS_FILE = "recovery_loss.csv"


def read_config(path: str | Path) -> tuple[dict[str, Any], RecoveryConfig]:
    """Return the run config (defaults filled in) and its RecoveryConfig, refusing unknown or missing keys."""
    run = json.loads(Path(path).read_text())
    unknown = sorted(set(run) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {', '.join(KNOWN_KEYS)}")
    for key in ("model_dir", "out_dir"):
        if not run.get(key):
            raise ValueError(f"{path}: '{key}' is required")
    defaults = dict(text_source="embedded", instruction_jsonl=None, instruction_field="instruction",
                    response_field="response", windows_path=None, heldout_path=None, n_windows=None, seed=0,
                    n_heldout=8,
                    heldout_seed=None, teacher_dir=None)
    run = {**defaults, **run}
    return run, RecoveryConfig.from_dict(run.get("recovery", {}))


def build_windows(run: dict[str, Any], cfg: RecoveryConfig, tokenizer, n_processes: int) -> torch.Tensor:
    """Return the training windows [n, seq_len] named by the run config (identical on every rank)."""
    n = run["n_windows"] or cfg.max_steps * cfg.batch_size * cfg.grad_accum * n_processes
    if run["windows_path"]:
        windows = torch.load(run["windows_path"], weights_only=True)
    elif run["instruction_jsonl"]:
        from pruning_utils.recovery.training_data import instruction_windows

        windows = instruction_windows(tokenizer, run["instruction_jsonl"], cfg.seq_len,
                                      run["instruction_field"], run["response_field"])
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(run["seed"]))
        windows = windows[order]
    else:
        from pruning_utils.data.sources import calibration_windows

        return calibration_windows(tokenizer, source=run["text_source"], n_samples=n, seq_len=cfg.seq_len,
                                   seed=run["seed"])
    return windows[:n]


def build_heldout(run: dict[str, Any], cfg: RecoveryConfig, tokenizer) -> torch.Tensor | None:
    """Return the fixed held-out windows of the run (calibration text, another seed), or None when `n_heldout` is 0."""
    if run.get("heldout_path"):
        return torch.load(run["heldout_path"], weights_only=True)
    if not run["n_heldout"]:
        return None
    from pruning_utils.data.sources import calibration_windows

    seed = run["heldout_seed"] if run["heldout_seed"] is not None else run["seed"] + 1
    return calibration_windows(tokenizer, source=run["text_source"], n_samples=run["n_heldout"], seq_len=cfg.seq_len,
                               seed=seed)


def _rank_path(path: str, rank: int) -> Path:
    """Return the per-rank file name: `{rank}` in the path is filled in, else `-rank<r>` goes before the suffix."""
    if "{rank}" in path:
        return Path(path.format(rank=rank))
    p = Path(path)
    return p.with_name(f"{p.stem}-rank{rank}{p.suffix or '.pt'}")


def main(argv: list[str] | None = None) -> Path:
    """Run LoRA recovery from a JSON config; returns the output folder."""
    parser = argparse.ArgumentParser(description="LoRA recovery of a (pruned) model; see the module docstring.")
    parser.add_argument("--config", required=True, help="JSON run config")
    parser.add_argument("--save-state-dict", metavar="PATH",
                        help="also write each rank's merged state dict to PATH-rank<r>.pt (checks that ranks agree)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    run, cfg = read_config(args.config)

    accelerator = make_accelerator(cfg)
    model, tokenizer = load_model(run["model_dir"], device=str(accelerator.device))
    teacher = load_model(run["teacher_dir"], device=str(accelerator.device))[0] if run["teacher_dir"] else None
    windows = build_windows(run, cfg, tokenizer, accelerator.num_processes)
    peft_model = attach_lora(model, cfg)
    stats = train_lora(peft_model, windows, cfg, teacher=teacher, accelerator=accelerator,
                       progress=not args.no_progress, heldout_windows=build_heldout(run, cfg, tokenizer))
    # every rank merges (cheap) so each can dump what it holds; only the main process writes the checkpoint
    merged = merge_lora(peft_model)
    if args.save_state_dict:
        dest = _rank_path(args.save_state_dict, accelerator.process_index)
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in merged.state_dict().items()}, dest)
    out = resolve_checkpoint_dir(run["out_dir"])
    if accelerator.is_main_process:
        summary = {k: v for k, v in stats.items() if k != "history"}
        summary["num_processes"] = accelerator.num_processes
        extra = {"recovery": cfg.to_dict(), "recovery_stats": summary, "recovered_from": str(run["model_dir"])}
        out = save_pruned(merged, tokenizer, out, plan=getattr(merged, "pruning_plan", None), extra=extra)
        write_history_csv(stats["history"], out / LOSS_FILE)
        write_text_atomic(out / STATS_FILE, json.dumps(summary, indent=1))
        print(f"LoRA recovery: {stats['steps']} steps, held-out loss {stats['heldout_loss_before']:.4f} -> "
              f"{stats['heldout_loss_after']:.4f}, "
              f"{stats['tokens_per_s']:.0f} tokens/s; saved {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def launch_command(config_path: str | Path, n_processes: int,
                   launch_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Return the `accelerate launch --multi_gpu` command that runs this module on `n_processes` ranks."""
    # this interpreter's accelerate, not whichever `accelerate` is first on PATH
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_processes),
            *launch_args, "-m", "pruning_utils.recovery.launch", "--config", str(config_path), "--no-progress"]


def _spec_for_ranks(spec: str) -> str:
    """Return a model spec the launched ranks resolve as this process does: a checkpoint name becomes its folder."""
    folder = resolve_checkpoint_dir(spec)
    return str(folder.resolve()) if folder.is_dir() else str(spec)


def recover_data_parallel(model_dir: str, out_name: str, cfg: RecoveryConfig, *, text_source: str = "embedded",
                          seed: int = 0, teacher_dir: str | None = None, n_gpus: int | None = None,
                          config_path: str | Path | None = None, n_windows: int | None = None,
                          instruction_jsonl: str | None = None, n_heldout: int = 8, heldout_seed: int | None = None,
                          device: str | None = None, dtype=None, launch_args: list[str] | tuple[str, ...] = (),
                          env: dict[str, str] | None = None, windows: torch.Tensor | None = None,
                          heldout_windows: torch.Tensor | None = None):
    """Run LoRA recovery of `model_dir` on `n_gpus` ranks (default: every visible GPU); returns `(merged_model, stats)`.

    Writes the run config to `config_path` (default: a temporary file), launches this module under
    `accelerate launch --multi_gpu`, then loads the merged checkpoint `out_name` (a bare name lands under
    models/) and its statistics, with `history` read back from the loss curve, so the result reads like
    `recovery.recover`'s. `launch_args` go to `accelerate launch` (e.g. `--main_process_port`). `windows` /
    `heldout_windows` (e.g. self-distillation or self-generated text, which the ranks cannot rebuild from a
    source name) are saved beside the config and read by every rank instead.
    """
    import pandas as pd

    n = n_gpus if n_gpus is not None else torch.cuda.device_count()
    if n < 1:
        raise ValueError(f"data-parallel recovery needs at least one process, got n_gpus={n}; "
                         "on a machine without GPUs use recovery.recover(...) in-process")
    out = resolve_checkpoint_dir(out_name)
    # folders as absolute paths: the ranks must find what this process calls models/<name>, whatever their env says
    run = {"model_dir": _spec_for_ranks(model_dir), "out_dir": str(out.resolve()), "recovery": cfg.to_dict(),
           "text_source": text_source, "instruction_jsonl": instruction_jsonl, "n_windows": n_windows, "seed": seed,
           "n_heldout": n_heldout, "heldout_seed": heldout_seed,
           "teacher_dir": _spec_for_ranks(teacher_dir) if teacher_dir else None}
    if config_path is None:
        config_path = Path(tempfile.mkdtemp(prefix="lora-launch-")) / "config.json"
    config_path = Path(config_path)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    for key, tensor in (("windows_path", windows), ("heldout_path", heldout_windows)):
        if tensor is not None:
            run[key] = str((config_path.parent / f"{config_path.stem}-{key[:-5]}.pt").resolve())
            torch.save(tensor, run[key])
    config_path.write_text(json.dumps(run, indent=1))
    cmd = launch_command(config_path, n, launch_args)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"data-parallel LoRA recovery failed (exit {proc.returncode}); its output is above. "
                           f"Re-run by hand to debug: {' '.join(cmd)}")
    stats = json.loads((out / STATS_FILE).read_text())
    history = pd.read_csv(out / LOSS_FILE)
    stats["history"] = [(int(s), float(loss), float(lr))
                        for s, loss, lr in history[["step", "loss", "lr"]].itertuples(index=False)]
    merged, _ = load_pruned(out, device=device, dtype=dtype)
    return merged, stats


if __name__ == "__main__":
    main()
