"""LoRA recovery as a script: `python -m pruning_utils.lora_launch --config cfg.json`, or data parallel with
`accelerate launch --multi_gpu --num_processes N -m pruning_utils.lora_launch --config cfg.json`.

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
     "teacher_dir": null}                 # teacher spec for loss "distill" / "mix" (e.g. the unpruned model)

Every rank builds the same windows and trains on its shard (the prepared DataLoader); the main process
merges the adapters and saves the checkpoint with `checkpoint.save_pruned`, plus the loss curve
(recovery_loss.csv) and statistics (recovery_stats.json) in the same folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import resolve_checkpoint_dir, save_pruned
from .loading import load_model
from .recovery import RecoveryConfig, attach_lora, make_accelerator, merge_lora, train_lora, write_history_csv

KNOWN_KEYS = ("model_dir", "out_dir", "recovery", "text_source", "instruction_jsonl", "instruction_field",
              "response_field", "windows_path", "n_windows", "seed", "teacher_dir")


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
                    response_field="response", windows_path=None, n_windows=None, seed=0, teacher_dir=None)
    run = {**defaults, **run}
    return run, RecoveryConfig.from_dict(run.get("recovery", {}))


def build_windows(run: dict[str, Any], cfg: RecoveryConfig, tokenizer, n_processes: int) -> torch.Tensor:
    """Return the training windows [n, seq_len] named by the run config (identical on every rank)."""
    n = run["n_windows"] or cfg.max_steps * cfg.batch_size * cfg.grad_accum * n_processes
    if run["windows_path"]:
        windows = torch.load(run["windows_path"], weights_only=True)
    elif run["instruction_jsonl"]:
        from .recovery import instruction_windows

        windows = instruction_windows(tokenizer, run["instruction_jsonl"], cfg.seq_len,
                                      run["instruction_field"], run["response_field"])
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(run["seed"]))
        windows = windows[order]
    else:
        from .data import calibration_windows

        return calibration_windows(tokenizer, source=run["text_source"], n_samples=n, seq_len=cfg.seq_len,
                                   seed=run["seed"])
    return windows[:n]


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
                       progress=not args.no_progress)
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
        write_history_csv(stats["history"], out / "recovery_loss.csv")
        (out / "recovery_stats.json").write_text(json.dumps(summary, indent=1))
        print(f"LoRA recovery: {stats['steps']} steps, loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f}, "
              f"{stats['tokens_per_s']:.0f} tokens/s; saved {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


if __name__ == "__main__":
    main()
