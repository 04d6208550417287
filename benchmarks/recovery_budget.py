"""The recovery budget curve: what notebook 04's recovery buys per training step, on text it never trained on too.

The default recipe of notebook 04 (peft LoRA r 8 merged, distillation: KL to the unpruned model's full
distribution, on `RECOVERY_DATA` = the unpruned model's own answers to training prompts plus calibration text, at
most one epoch) is run on a fresh copy of `models/<name>/` (S3, `mix_pruned`, by default) for each budget of
`--steps`, each budget its own run with its own warm-up and cosine schedule (what a user choosing that budget gets).
Every model, and the pruned one before recovery (steps 0), is measured like every variant: in-domain perplexity,
fidelity perplexity (held-out samples of the unpruned model), held-out perplexity (general English prose that no
calibration, search or training ever sees), KL to the unpruned model, semantic retention of its greedy answers to
the judge's prompts (all-MiniLM-L6-v2 cosine with its 95% bootstrap interval, ROUGE-L, BERTScore on the same MiniLM).
A run is reproducible from `--seed` (the windows, the LoRA initialisation and the order are seeded).

At most one epoch: the embedded text's calibration split holds 350 windows of 256 tokens, so the default data
(44 self-distillation windows + text windows, TEXT_SOURCE's share of them embedded) caps a budget: near 120 steps of
batch 4 at a 75%-embedded mixture, more at the half-embedded default; a budget beyond what the data holds is refused
before any training.
Writes results/ablation_studies/recovery_budget.csv (merged by budget: a stopped sweep keeps what it measured)
and the default S3's curve, results/benchmarks/recovery_budget.png.

`--profile thorough --models DIR` recovers the thorough profile's S3 instead (its checkpoint from a thorough run of
stages 02-03 into DIR, see benchmarks/thorough_profile.py) under that profile's recovery settings; its rows are
labelled `thorough:mix_pruned`, beside the default S3's in the same table.
Usage: python3 -m benchmarks.recovery_budget [--name mix_pruned] [--steps 16,32,64,120] [--lr 2e-3] [--temperature 1]
           [--profile thorough --models DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pruning_utils import paths
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta
from pruning_utils.pipeline import plots, profiles, results
from pruning_utils.recovery.bench import RecoveryBench, budget_curve, recovery_config

D = profiles.DEFAULTS
PLOT = "recovery_budget.png"
# rows merged by these: a run of other budgets keeps the measured ones
KEY = ["model", "loss", "data", "lr", "temperature", "steps"]


def save_curve(table: pd.DataFrame, model: str = "mix_pruned") -> Path:
    """Save the curve of `model`'s rows of a recovery_budget table (the unpruned model from baseline.csv); return
    its path."""
    rows = table[table["model"] == model]
    if rows.empty:
        raise SystemExit(f"the table has no rows of '{model}' (it holds {', '.join(sorted(set(table['model'])))})")
    baseline = pd.read_csv(paths.ablation_dir() / "baseline.csv").iloc[0].to_dict()
    return results.save_plot(plots.budget_curve(rows, baseline), paths.results_dir() / "benchmarks" / PLOT)


def label(name: str, profile: str) -> str:
    """Return the `model` cell of a row: the checkpoint's name, prefixed by a profile other than the default."""
    return name if profile == "default" else f"{profile}:{name}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.recovery_budget", description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="mix_pruned", help="pruned checkpoint under models/")
    ap.add_argument("--steps", default="16,32,64,120", help="optimizer-step budgets, comma-separated")
    ap.add_argument("--lr", type=float, default=D["LORA_LR"])
    ap.add_argument("--loss", default=D["RECOVERY_LOSS"])
    ap.add_argument("--temperature", type=float, default=D["RECOVERY_TEMPERATURE"], help="of the distillation KL")
    ap.add_argument("--data", default=D["RECOVERY_DATA"])
    ap.add_argument("--model", default=D["MODEL"])
    ap.add_argument("--text-source", default=D["TEXT_SOURCE"])
    ap.add_argument("--n-prompts", type=int, default=D["N_PROMPTS"])
    ap.add_argument("--seed", type=int, default=D["SEED"])
    ap.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES),
                    help="whose recovery settings (LoRA rank, batch, window length, distillation temperature) train")
    ap.add_argument("--models", help="folder holding the checkpoint (default: models/, or PRUNING_MODELS_DIR)")
    ap.add_argument("--out", default=str(paths.ablation_dir() / "recovery_budget.csv"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the curve of the written table, train nothing")
    args = ap.parse_args(argv)
    if args.plot_only:
        print(f"wrote {save_curve(pd.read_csv(args.out))}")
        return
    steps = [int(s) for s in args.steps.split(",")]
    if not steps or min(steps) < 1:
        raise SystemExit(f"--steps must be positive step counts, e.g. 16,32,64,120 (got '{args.steps}')")
    if args.models:
        if not (Path(args.models) / args.name).is_dir():
            raise SystemExit(f"no checkpoint '{args.name}' under {args.models}: run stages 02-03 into that folder "
                             "first (benchmarks/thorough_profile.py shows how)")
        paths.MODELS_DIR = Path(args.models)  # every reader below, caches included, looks there
    P = profiles.PROFILES[args.profile]
    pruned, _ = load_pruned(args.name, device="cpu", dtype="float32")
    bench = RecoveryBench(P, args.model, args.text_source, args.n_prompts, args.seed)
    known = read_checkpoint_meta(args.name)["extra"]
    params = dict(P, RECOVERY_TEMPERATURE=args.temperature)
    name = label(args.name, args.profile)
    config = lambda n: recovery_config(params, n, args.lr, args.loss, args.seed)  # noqa: E731
    # a budget beyond one epoch of the training text fails here, before any training (saying how many fit)
    bench.windows(args.data)(max(steps) * config(max(steps)).batch_size)
    rows: list[dict] = []

    def measure(model, stats: dict | None) -> dict:
        row = dict(model=name, loss=args.loss, data=args.data, lr=args.lr, temperature=args.temperature,
                   **bench.measure(model, name, stats, known=None if stats else known))
        rows.append(row)
        print(pd.DataFrame([row]).round(3).to_string(index=False), flush=True)
        results.write_csv(results.merge_rows(pd.DataFrame(rows), args.out, KEY), args.out)
        return row

    budget_curve(pruned, bench.base, bench.windows(args.data), steps, config, measure, heldout_windows=bench.heldout)
    table = pd.read_csv(args.out)
    if args.profile == "default":
        print(f"wrote {save_curve(table, name)}")
    cols = ["steps", "tokens_seen", "ppl", "fidelity_ppl", "heldout_ppl", "semantic_cosine", "train_minutes"]
    print(table[table["model"] == name][cols].round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
