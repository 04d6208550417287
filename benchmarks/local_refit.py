"""What the local MLP refit buys on an S1 model (saved by the default run, or built by a criterion), per step budget
(issue 34).

`pruning_utils.prune.local_refit` moves each pruned MLP's kept gate/up rows with its down columns by Adam steps on
that layer's own output error (one-shot: the unpruned model's MLP inputs and outputs on the calibration windows).
This applies it to a fresh copy of `models/<name>/` (S1, `mlp_pruned`, by default: lstsq-refit, no local steps)
for each budget of `--steps` and measures every copy like every variant: in-domain perplexity, fidelity perplexity
(held-out samples of the unpruned model), held-out perplexity (general English prose that no calibration, search or
training ever sees) and KL to the unpruned model; steps 0 is the model as loaded (or built). The layers' mean relative
output error on the refit's held-out windows, before and after, and the minutes the steps took are kept beside.
The calibration windows, evaluation sets and seed are the default profile's (`profiles.DEFAULTS`).
`--criterion C` measures another S1 instead of a saved checkpoint: built here by the default recipe (MLP_RATE of
every layer's neurons, uniform, one-shot RECONSTRUCTION from the Grams of REFIT_CALIB windows, as notebook 03
builds `mlp_pruned`) with its neurons chosen by criterion C of notebook 00's scores (results/importance); its rows
are model `S1:C`. Writes results/ablation_studies/local_refit.csv (merged by model, steps and lr: a stopped sweep
keeps what it measured). Usage:
python3 -m benchmarks.local_refit [--name mlp_pruned | --criterion semantic_refit] [--steps 0,60] [--lr 2e-3]
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
from pruning_utils.prune import allocation, local_refit
from pruning_utils.prune.scores import load_scores

KEY = ["model", "steps", "lr"]
S1_PREFIX = "S1:"  # the model column of an S1 built here by a criterion (`--criterion`)


def criterion_scores(scores_dir, criterion: str):
    """Return notebook 00's scores of `criterion` from `scores_dir`; exit naming the stored criteria if absent."""
    scores = load_scores(scores_dir)
    if criterion not in scores:
        raise SystemExit(f"no '{criterion}' scores in {scores_dir} (it holds {', '.join(sorted(scores))}); run "
                         "notebook 00 with that criterion in CRITERIA first")
    return scores[criterion]


def build_s1(dense, windows: torch.Tensor, scores) -> torch.nn.Module:
    """Return the default recipe's S1 (MLP_RATE of every layer's neurons, uniform, one-shot RECONSTRUCTION at
    RIDGE_RATIO from the Grams of `windows`) with its neurons chosen by `scores`."""
    from pruning_utils.measure.variants import pruned_copy

    plan = allocation.plan_neurons(dense, scores, D["MLP_RATE"], allocation="uniform")
    return pruned_copy(dense, plan, windows, reconstruction=D["RECONSTRUCTION"], ridge_ratio=D["RIDGE_RATIO"])


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
    ap.add_argument("--criterion", default=None,
                    help="instead of --name: build the default recipe's S1 with neurons by this criterion")
    ap.add_argument("--scores", default=str(paths.results_dir() / "importance"),
                    help="notebook 00's scores (--criterion)")
    ap.add_argument("--steps", default="0,60", help="local steps per pruned MLP, comma-separated (0: as saved)")
    ap.add_argument("--lr", type=float, default=D["LOCAL_REFIT_LR"])
    ap.add_argument("--seed", type=int, default=D["SEED"])
    ap.add_argument("--out", default=str(paths.ablation_dir() / "local_refit.csv"))
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if not steps or min(steps) < 0:
        raise SystemExit(f"--steps must be step counts >= 0, e.g. 0,60 (got '{args.steps}')")
    dense, tok = load_model(D["MODEL"], device="cpu", dtype="float32")
    # before the calibration windows (minutes of sampling): a missing checkpoint or criterion fails at once
    if args.criterion is None:
        pruned, name = load_pruned(args.name, device="cpu", dtype="float32")[0], args.name
    else:
        scores, name = criterion_scores(args.scores, args.criterion), S1_PREFIX + args.criterion
    selfgen_kw = dict(temperature=D["SELFGEN_TEMPERATURE"], top_p=D["SELFGEN_TOP_P"], batch_size=D["SELFGEN_BATCH"])
    windows = sources.calibration_windows(tok, D["TEXT_SOURCE"], n_samples=D["REFIT_CALIB"],
                                          seq_len=D["CALIB_SEQ_LEN"], seed=args.seed, model=dense,
                                          selfgen_kw=selfgen_kw)
    if args.criterion is not None:
        pruned = build_s1(dense, windows, scores)
    sets = {"ppl": sources.eval_chunks(tok, D["TEXT_SOURCE"], seq_len=D["EVAL_SEQ_LEN"],
                                       max_tokens=D["EVAL_MAX_TOKENS"]),
            "fidelity_ppl": sources.fidelity_chunks(dense, tok, n_tokens=D["FIDELITY_TOKENS"], seed=args.seed,
                                                    selfgen_kw=selfgen_kw),
            "heldout_ppl": heldout.heldout_chunks(tok, n_tokens=D["HELDOUT_TOKENS"])}
    rows = measure_budgets(name, pruned, dense, windows, sets, steps, args.lr, args.seed)
    table = results.merge_rows(pd.DataFrame(rows), args.out, KEY)
    results.write_csv(table, args.out)
    print(table.round(4).to_markdown(index=False))


if __name__ == "__main__":
    main()
