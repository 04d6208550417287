"""Perplexity after LoRA recovery of one saved pruned model, for several recovery budgets and learning rates.

Issue 6 asks for S3 (heads 9 -> 6 and MLP 1536 -> 1152, -25% non-embedding) at PPL <= 16 after "the default
recovery of the recovery stage". This script trains the same LoRA recipe as notebook 04 (peft, distillation from
the unpruned model, calibration split only, at most one epoch, merged) for each `--steps` x `--lrs` setting on a
fresh copy of `models/<name>/`, and scores the merged model on the whole evaluation text. The chosen default of
notebook 04 is the cheapest setting that meets the target. Writes results/ablation_studies/recovery_budget.csv.

Usage: python3 -m benchmarks.recovery_budget --name mix_pruned --steps 16,32 --lrs 1e-3,2e-3
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import results
from pruning_utils.recovery import lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="mix_pruned", help="pruned checkpoint under models/")
    ap.add_argument("--model", default="smollm2-135m", help="the unpruned model (teacher, tokenizer)")
    ap.add_argument("--steps", default="16,32")
    ap.add_argument("--lrs", default="1e-3,2e-3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--loss", default="distill", choices=lora.LOSSES)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--out", default=str(paths.ablation_dir() / "recovery_budget.csv"))
    args = ap.parse_args()
    torch.manual_seed(0)

    teacher, tok = load_model(args.model, device="cpu", dtype="float32")
    pruned, _ = load_pruned(args.name, device="cpu", dtype="float32")
    before = read_checkpoint_meta(args.name)["extra"]
    chunks = sources.eval_chunks(tok, seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens)
    steps = [int(s) for s in args.steps.split(",")]
    # the same windows for every run (a shorter run sees a prefix of them), drawn like notebook 04 (seed 1)
    train = sources.calibration_windows(tok, n_samples=max(steps) * args.batch, seq_len=args.seq_len, seed=1)
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for n in steps:
            cfg = lora.RecoveryConfig(r=args.rank, alpha=2 * args.rank, lr=lr, max_steps=n, batch_size=args.batch,
                                          seq_len=args.seq_len, loss=args.loss, temperature=args.temperature)
            t0 = time.perf_counter()
            merged, stats = lora.recover(copy.deepcopy(pruned), tok, train[:n * args.batch], cfg,
                                             teacher=None if args.loss == "lm" else teacher)
            ppl = metrics.perplexity(merged, chunks, progress=False)
            rows.append(dict(model=args.name, steps=stats["steps"], lr=lr, rank=args.rank, loss=args.loss,
                             temperature=args.temperature, tokens_seen=stats["tokens_seen"],
                             ppl_before=before["ppl"], ppl_after=ppl["ppl"], eval_tokens=ppl["tokens"],
                             train_minutes=stats["minutes"], total_minutes=(time.perf_counter() - t0) / 60,
                             train_tokens_per_s=stats["tokens_per_s"]))
            print(f"{args.name}: lr {lr:g}, {stats['steps']} steps ({stats['tokens_seen']} tokens) -> ppl "
                  f"{ppl['ppl']:.3f} (before {before['ppl']:.3f}; {stats['minutes']:.1f} min training)", flush=True)
            del merged
            table = pd.DataFrame(rows)
            out = results.write_csv(table, args.out)  # after every run: a long sweep stopped early keeps its rows
    print(table.round(3).to_markdown(index=False))
    print(f"wrote {out}; {metrics.environment_info(teacher)}")


if __name__ == "__main__":
    main()
