"""LoRA recovery of a saved pruned model by what it trains on and how (issue 11): which recovery keeps answers.

Configurations (loss on data), each the recipe of notebook 04 (peft LoRA r 8, the default steps and learning
rate, at most one epoch, merged) on a fresh copy of `models/<name>/`:
- lm on text: next-token loss on calibration windows (the text source, another seed);
- distill on text: KL to the unpruned model on the same windows;
- distill on selfdistill: KL to the unpruned model on its own greedy answers to training prompts (never the
  judge's prompts) - self-data distillation;
- distill on selfdistill+text: half of each.
Each merged model is measured like every variant: in-domain perplexity, fidelity perplexity (held-out samples of
the unpruned model), KL to the unpruned model on the evaluation windows, and semantic retention of its greedy
answers to the judge's held-out prompts (all-MiniLM-L6-v2 cosine to the unpruned model's answers, 95% bootstrap
interval; ROUGE-L F1 and BERTScore F1 on the same MiniLM, `evaluation.answer_overlap`). The row `none` is the model
before recovery.

Writes results/ablation_studies/recovery_sources.csv. Usage:
    python3 -m benchmarks.recovery_sources --names mix_pruned,head_pruned [--configs lm:text,distill:selfdistill]
"""
from __future__ import annotations

import argparse
import copy

import pandas as pd

from pruning_utils import paths
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta
from pruning_utils.pipeline import profiles, results
from pruning_utils.recovery import lora
from pruning_utils.recovery.bench import RecoveryBench, recovery_config

CONFIGS = "lm:text,distill:text,distill:selfdistill,distill:selfdistill+text"
D = profiles.DEFAULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", default="mix_pruned", help="pruned checkpoints under models/, comma-separated")
    ap.add_argument("--configs", default=CONFIGS, help="loss:data pairs, comma-separated")
    ap.add_argument("--model", default=D["MODEL"])
    ap.add_argument("--text-source", default=D["TEXT_SOURCE"])
    ap.add_argument("--steps", type=int, default=D["RECOVERY_STEPS"])
    ap.add_argument("--lr", type=float, default=D["LORA_LR"])
    ap.add_argument("--n-prompts", type=int, default=D["N_PROMPTS"])
    ap.add_argument("--seed", type=int, default=D["SEED"])
    ap.add_argument("--out", default=str(paths.ablation_dir() / "recovery_sources.csv"))
    args = ap.parse_args()
    bench = RecoveryBench(D, args.model, args.text_source, args.n_prompts, args.seed)
    rows = []

    def measure(model, name: str, loss: str, source: str, stats: dict | None, known: dict | None = None) -> None:
        rows.append(dict(model=name, loss=loss, data=source, **bench.measure(model, name, stats, known)))
        print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
        results.write_csv(pd.DataFrame(rows), args.out)  # after every row: a stopped sweep keeps what it measured

    for name in args.names.split(","):
        pruned, _ = load_pruned(name, device="cpu", dtype="float32")
        measure(pruned, name, "none", "none", None, known=read_checkpoint_meta(name)["extra"])
        for pair in args.configs.split(","):
            loss, source = pair.split(":")
            cfg = recovery_config(D, args.steps, args.lr, loss, args.seed)
            train = bench.windows(source)(args.steps * cfg.batch_size)
            merged, stats = lora.recover(copy.deepcopy(pruned), bench.tok, train, cfg,
                                         teacher=None if loss == "lm" else bench.base, heldout_windows=bench.heldout)
            measure(merged, name, loss, source, stats)
            del merged
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
