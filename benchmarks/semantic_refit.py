"""The namesake criterion against the default one at fixed shapes: `semantic_refit` vs MAIN_HEAD_CRITERION (issue 34).

`semantic_refit` (pruning_utils/prune/importance.py) scores a head by the KL of the model's next-token predictions
after removing it AND refitting o_proj, exactly; the default recipe chooses heads by `fluctuation`. Both are cut at
the quality benchmark's uniform shapes with the default recipe otherwise (one-shot lstsq refit, RIDGE_RATIO, the
default calibration mixture and its Grams):
- S1: MLP 1536 -> 1152 (neurons by the criterion: semantic_refit's second-order estimate vs MAIN_MLP_CRITERION);
- S2: 9 -> 6 query heads (heads by the criterion);
- S3: S2's heads by the criterion and S1's neurons by MAIN_MLP_CRITERION (the saved recipe's shape).
Every variant is measured like every variant row: in-domain `ppl` on the whole evaluation text, `fidelity_ppl`,
`heldout_ppl` (general English prose), KL to the unpruned model. The scores are notebook 00's
(results/importance/, computed with the default SEMANTIC_REFIT_WINDOWS, SEMANTIC_SEQ_LEN and RIDGE_RATIO), or
computed here with the same settings when a criterion is missing there.

The saved recipe makes `semantic_refit` its head criterion only if it is at least as good as the default in-domain
AND on fidelity at S2 and S3 (issue 34); this table is the evidence either way.
Writes results/ablation_studies/semantic_refit.csv. Usage: python3 -m benchmarks.semantic_refit [--shapes S2,S3]
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
    ap.add_argument("--criteria", default=f"{DEFAULTS['MAIN_HEAD_CRITERION']},semantic_refit")
    ap.add_argument("--scores", default=str(paths.results_dir() / "importance"))
    ap.add_argument("--out", default=str(paths.ablation_dir() / "semantic_refit.csv"))
    args = ap.parse_args(argv)
    d = DEFAULTS
    torch.manual_seed(d["SEED"])
    model, tok = load_model(args.model)
    windows = sources.calibration_windows(tok, d["TEXT_SOURCE"], n_samples=d["N_CALIB"], seq_len=d["CALIB_SEQ_LEN"],
                                          seed=d["SEED"], model=model)
    chunks = sources.eval_chunks(tok, d["TEXT_SOURCE"], seq_len=d["EVAL_SEQ_LEN"], max_tokens=d["EVAL_MAX_TOKENS"])
    sets = dict(fidelity_chunks=sources.fidelity_chunks(model, tok, n_tokens=d["FIDELITY_TOKENS"], seed=d["SEED"]),
                heldout_chunks=heldout.heldout_chunks(tok, n_tokens=d["HELDOUT_TOKENS"]), reference_model=model)
    criteria = args.criteria.split(",")
    try:
        scores = {c: s for c, s in load_scores(args.scores).items() if c in criteria + [d["MAIN_MLP_CRITERION"]]}
    except FileNotFoundError:
        scores = {}
    missing = [c for c in criteria + [d["MAIN_MLP_CRITERION"]] if c not in scores]
    if missing:
        print(f"computing {missing} (not in {args.scores})", flush=True)
        scores.update(importance.compute_importance(
            model, windows, missing, seed=d["SEED"], semantic_max_windows=d["SEMANTIC_MAX_WINDOWS"],
            semantic_seq_len=d["SEMANTIC_SEQ_LEN"], refit_windows=d["SEMANTIC_REFIT_WINDOWS"],
            refit_ridge=d["RIDGE_RATIO"]))
    grams = reconstruction.collect_grams(model, windows)
    base = measure_variant(model, chunks, variant="baseline", source_model=args.model, **sets)
    rows = [dict(base, shape="baseline", build_s=0.0)]
    for shape in args.shapes.split(","):
        for crit in criteria:
            t0 = time.perf_counter()
            plan = plan_for(model, scores, shape, crit, d["MAIN_MLP_CRITERION"])
            pruned = pruned_copy(model, plan, windows, reconstruction="lstsq", stats=grams, sequential=False,
                                 ridge_ratio=d["RIDGE_RATIO"])
            build_s = time.perf_counter() - t0
            label = crit if not (SHAPES[shape]["head_rate"] and SHAPES[shape]["mlp_rate"]) else \
                f"{crit}+{d['MAIN_MLP_CRITERION']}"
            row = measure_variant(pruned, chunks, variant=f"{shape}-{crit}", source_model=args.model, reference=base,
                                  criterion=label, allocation="uniform", reconstruction="lstsq",
                                  head_rate_requested=SHAPES[shape]["head_rate"],
                                  mlp_rate_requested=SHAPES[shape]["mlp_rate"], **sets)
            rows.append(dict(row, shape=shape, build_s=round(build_s, 1)))
            results.write_csv(pd.DataFrame(rows), args.out)  # after every row: a stopped run keeps what it measured
            print(f"{shape} {label:28s} ppl {row['ppl']:7.2f}  fidelity {row['fidelity_ppl']:7.2f}  "
                  f"heldout {row['heldout_ppl']:7.2f}  kl {row['kl_to_baseline']:.4f}", flush=True)
            del pruned
    table = pd.DataFrame(rows)
    print(table.pivot_table(index="criterion", columns="shape", values=["ppl", "fidelity_ppl", "heldout_ppl"])
          .round(2).to_string())


if __name__ == "__main__":
    main()
