"""What the local MLP refit buys on a saved model of the default run, per step budget (issue 34).

`pruning_utils.prune.local_refit` moves each pruned MLP's kept gate/up rows with its down columns by Adam steps on
that layer's own output error (one-shot: the unpruned model's MLP inputs and outputs on the calibration windows).
This applies it to a fresh copy of `models/<name>/` (S1, `mlp_pruned`, by default: lstsq-refit, no local steps)
for each budget of `--steps` and measures every copy like every variant: in-domain perplexity, fidelity perplexity
(held-out samples of the unpruned model), held-out perplexity (general English prose that no calibration, search or
training ever sees) and KL to the unpruned model; steps 0 is the saved model itself. The layers' mean relative
output error on the refit's held-out windows, before and after, and the minutes the steps took are kept beside.
The calibration windows, evaluation sets and seed are the default profile's (`profiles.DEFAULTS`).
Writes results/ablation_studies/local_refit.csv (merged by model, steps and lr: a stopped sweep keeps what it
measured). Usage: python3 -m benchmarks.local_refit [--name mlp_pruned] [--steps 0,60] [--lr 2e-3]
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import heldout, sources
from pruning_utils.measure import metrics
from pruning_utils.model.checkpoint import load_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import results
from pruning_utils.pipeline.profiles import DEFAULTS as D
from pruning_utils.prune import local_refit

KEY = ["model", "steps", "lr"]


def measure_budgets(name: str, pruned, dense, windows: torch.Tensor, sets: dict[str, torch.Tensor],
                    steps: list[int], lr: float, seed: int, progress: bool = True) -> list[dict]:
    """Return one row per budget of `steps`: the quality of a copy of `pruned` refit that many steps per MLP.

    `sets` maps 'ppl' / 'fidelity_ppl' / 'heldout_ppl' to token windows; KL is measured on the 'ppl' set."""
    rows = []
    for n in steps:
        model = copy.deepcopy(pruned)
        start = time.perf_counter()
        report = local_refit.refit_mlps(model, dense, windows, steps=n, lr=lr, seed=seed, progress=progress)
        minutes = (time.perf_counter() - start) / 60
        row = dict(model=name, steps=n, lr=lr)
        for column, chunks in sets.items():
            scored = metrics.perplexity(model, chunks, progress=progress,
                                        reference=dense if column == "ppl" else None)
            row[column] = scored["ppl"]
            if column == "ppl":
                row["kl_to_baseline"] = scored["kl"]
        mean = (lambda v: sum(v) / len(v)) if report else (lambda v: float("nan"))  # steps 0: nothing measured
        row.update(layers_refit=len(report), layers_kept=sum(r.kept for r in report),
                   error_before=mean([r.error_before for r in report]),
                   error_after=mean([r.error_after for r in report]), refit_minutes=minutes,
                   load_avg=metrics.load_avg())
        rows.append(row)
        del model
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.local_refit", description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="mlp_pruned", help="pruned checkpoint of the default run under models/")
    ap.add_argument("--steps", default="0,60", help="local steps per pruned MLP, comma-separated (0: as saved)")
    ap.add_argument("--lr", type=float, default=D["LOCAL_REFIT_LR"])
    ap.add_argument("--seed", type=int, default=D["SEED"])
    ap.add_argument("--out", default=str(paths.ablation_dir() / "local_refit.csv"))
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if not steps or min(steps) < 0:
        raise SystemExit(f"--steps must be step counts >= 0, e.g. 0,60 (got '{args.steps}')")
    dense, tok = load_model(D["MODEL"], device="cpu", dtype="float32")
    pruned, _ = load_pruned(args.name, device="cpu", dtype="float32")
    selfgen_kw = dict(temperature=D["SELFGEN_TEMPERATURE"], top_p=D["SELFGEN_TOP_P"], batch_size=D["SELFGEN_BATCH"])
    windows = sources.calibration_windows(tok, D["TEXT_SOURCE"], n_samples=D["REFIT_CALIB"],
                                          seq_len=D["CALIB_SEQ_LEN"], seed=args.seed, model=dense,
                                          selfgen_kw=selfgen_kw)
    sets = {"ppl": sources.eval_chunks(tok, D["TEXT_SOURCE"], seq_len=D["EVAL_SEQ_LEN"],
                                       max_tokens=D["EVAL_MAX_TOKENS"]),
            "fidelity_ppl": sources.fidelity_chunks(dense, tok, n_tokens=D["FIDELITY_TOKENS"], seed=args.seed,
                                                    selfgen_kw=selfgen_kw),
            "heldout_ppl": heldout.heldout_chunks(tok, n_tokens=D["HELDOUT_TOKENS"])}
    rows = measure_budgets(args.name, pruned, dense, windows, sets, steps, args.lr, args.seed)
    table = results.merge_rows(pd.DataFrame(rows), args.out, KEY)
    results.write_csv(table, args.out)
    print(table.round(4).to_markdown(index=False))


if __name__ == "__main__":
    main()
