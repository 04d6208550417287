"""The namesake criterion against fluctuation at fixed shapes, per calibration source (issue 34).

`semantic_refit` (pruning_utils/prune/importance.py) scores a head by the KL of the model's next-token predictions
after removing it AND refitting o_proj, exactly; `fluctuation` (FLAP's) was the saved recipe's head criterion before
it (EARLIER_RECIPE: fluctuation heads, calibration 'embedded:0.75+selfgen:0.25', 64 windows). Both are cut at the
quality benchmark's uniform shapes with the default recipe otherwise (one-shot lstsq refit at `--ridge`, RIDGE_RATIO,
from the Grams of `--n-calib` windows of the `--source` calibration mixture, REFIT_CALIB as in notebooks 02 / 03;
the criteria are scored on N_CALIB windows of it, as in notebook 00):
- S1: MLP 1536 -> 1152 (neurons by the criterion: semantic_refit's second-order estimate vs MAIN_MLP_CRITERION);
- S2: 9 -> 6 query heads (heads by the criterion);
- S3: S2's heads by the criterion and S1's neurons by MAIN_MLP_CRITERION (the saved recipe's shape).
Every variant is measured like every variant row: in-domain `ppl` on the whole evaluation text, `fidelity_ppl`,
`heldout_ppl` (general English prose), KL to the unpruned model. The scores are notebook 00's
(results/importance/, computed with TEXT_SOURCE and the default SEMANTIC_REFIT_WINDOWS, SEMANTIC_SEQ_LEN and
RIDGE_RATIO) when `--source` is TEXT_SOURCE, else computed here with the same settings.

The saved recipe (MAIN_HEAD_CRITERION at TEXT_SOURCE) replaced EARLIER_RECIPE because it is at least as good
in-domain AND on fidelity at S2 and S3 (issue 34's rule); this table is the evidence, rows of other sources beside.
Writes results/ablation_studies/semantic_refit.csv, merged by (shape, criterion, calibration_source, n_calib,
ridge_ratio): a run of one source or window count keeps the rows of the others. Usage:
python3 -m benchmarks.semantic_refit [--shapes S2,S3] [--source embedded:0.75+selfgen:0.25] [--n-calib 64]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import heldout, sources
from pruning_utils.measure.variants import measure_variant, pruned_copy
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import results
from pruning_utils.pipeline.profiles import DEFAULTS
from pruning_utils.prune import allocation, importance, reconstruction
from pruning_utils.prune.scores import load_scores

# the saved recipe's heads before issue 34: criterion, calibration source, refit windows, ridge
EARLIER_RECIPE = ("fluctuation", "embedded:0.75+selfgen:0.25", 64, 1e-2)
KEY = ["shape", "criterion", "calibration_source", "n_calib", "ridge_ratio"]
SHAPES = {"S1": dict(head_rate=0.0, mlp_rate=0.25), "S2": dict(head_rate=0.2, mlp_rate=0.0),
          "S3": dict(head_rate=0.2, mlp_rate=0.25)}


def plan_for(model, scores: dict, shape: str, criterion: str, mlp_criterion: str):
    """Return the uniform plan of `shape`: heads by `criterion`; neurons by `criterion` at S1 (the only thing cut
    there), by `mlp_criterion` otherwise (the saved recipe's neurons)."""
    rates = SHAPES[shape]
    neurons = criterion if not rates["head_rate"] else mlp_criterion
    return allocation.plan_both(model, scores[criterion], neuron_scores=scores[neurons], **rates)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULTS["MODEL"])
    ap.add_argument("--shapes", default="S1,S2,S3")
    ap.add_argument("--criteria", default="fluctuation,semantic_refit")
    ap.add_argument("--scores", default=str(paths.results_dir() / "importance"))
    ap.add_argument("--source", default=DEFAULTS["TEXT_SOURCE"],
                    help="calibration source of the scores, Grams and refit; another than TEXT_SOURCE recomputes the "
                         "scores here (notebook 00's are the default source's)")
    ap.add_argument("--n-calib", type=int, default=DEFAULTS["REFIT_CALIB"],
                    help="calibration windows of the Grams and the refit (notebooks 02 / 03: REFIT_CALIB); scores "
                         "computed here use N_CALIB windows, as notebook 00's")
    ap.add_argument("--ridge", type=float, default=DEFAULTS["RIDGE_RATIO"], help="ridge of the refit")
    ap.add_argument("--out", default=str(paths.ablation_dir() / "semantic_refit.csv"))
    args = ap.parse_args(argv)
    d = DEFAULTS
    torch.manual_seed(d["SEED"])
    model, tok = load_model(args.model)
    windows = sources.calibration_windows(tok, args.source, n_samples=args.n_calib, seq_len=d["CALIB_SEQ_LEN"],
                                          seed=d["SEED"], model=model)
    chunks = sources.eval_chunks(tok, d["TEXT_SOURCE"], seq_len=d["EVAL_SEQ_LEN"], max_tokens=d["EVAL_MAX_TOKENS"])
    sets = dict(fidelity_chunks=sources.fidelity_chunks(model, tok, n_tokens=d["FIDELITY_TOKENS"], seed=d["SEED"]),
                heldout_chunks=heldout.heldout_chunks(tok, n_tokens=d["HELDOUT_TOKENS"]), reference_model=model)
    criteria = args.criteria.split(",")
    scores = {}
    if args.source == d["TEXT_SOURCE"]:  # notebook 00's scores are the default source's
        try:
            scores = {c: s for c, s in load_scores(args.scores).items() if c in criteria + [d["MAIN_MLP_CRITERION"]]}
        except FileNotFoundError:
            pass
    missing = list(dict.fromkeys(c for c in criteria + [d["MAIN_MLP_CRITERION"]] if c not in scores))
    if missing:
        print(f"computing {missing} (not in {args.scores})", flush=True)
        score_windows = sources.calibration_windows(tok, args.source, n_samples=d["N_CALIB"],
                                                    seq_len=d["CALIB_SEQ_LEN"], seed=d["SEED"], model=model)
        scores.update(importance.compute_importance(
            model, score_windows, missing, seed=d["SEED"], semantic_max_windows=d["SEMANTIC_MAX_WINDOWS"],
            semantic_seq_len=d["SEMANTIC_SEQ_LEN"], refit_windows=d["SEMANTIC_REFIT_WINDOWS"],
            refit_ridge=d["RIDGE_RATIO"]))
    grams = reconstruction.collect_grams(model, windows)
    base = measure_variant(model, chunks, variant="baseline", source_model=args.model, **sets)
    rows = [dict(base, shape="baseline", calibration_source="none", build_s=0.0)]
    for shape in args.shapes.split(","):
        for crit in criteria:
            t0 = time.perf_counter()
            plan = plan_for(model, scores, shape, crit, d["MAIN_MLP_CRITERION"])
            pruned = pruned_copy(model, plan, windows, reconstruction="lstsq", stats=grams, sequential=False,
                                 ridge_ratio=args.ridge)
            build_s = time.perf_counter() - t0
            label = crit if not (SHAPES[shape]["head_rate"] and SHAPES[shape]["mlp_rate"]) else \
                f"{crit}+{d['MAIN_MLP_CRITERION']}"
            row = measure_variant(pruned, chunks, variant=f"{shape}-{crit}@{args.source}/{args.n_calib}w",
                                  source_model=args.model,
                                  reference=base,
                                  criterion=label, allocation="uniform", reconstruction="lstsq",
                                  head_rate_requested=SHAPES[shape]["head_rate"],
                                  mlp_rate_requested=SHAPES[shape]["mlp_rate"], **sets)
            rows.append(dict(row, shape=shape, calibration_source=args.source, n_calib=args.n_calib,
                             ridge_ratio=args.ridge, build_s=round(build_s, 1)))
            # after every row: a stopped run keeps what it measured
            results.write_csv(results.merge_rows(pd.DataFrame(rows), args.out, KEY), args.out)
            print(f"{shape} {label:28s} ppl {row['ppl']:7.2f}  fidelity {row['fidelity_ppl']:7.2f}  "
                  f"heldout {row['heldout_ppl']:7.2f}  kl {row['kl_to_baseline']:.4f}", flush=True)
            del pruned
    table = pd.DataFrame(rows[1:])
    print(table.pivot_table(index="criterion", columns="shape", values=["ppl", "fidelity_ppl", "heldout_ppl"])
          .round(2).to_string())


if __name__ == "__main__":
    main()
