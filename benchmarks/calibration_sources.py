"""Calibration text sources and mixtures x pruned shapes: in-domain perplexity, fidelity perplexity and KL (issue 11).

For each source mixture (e.g. `embedded`, `selfgen`, `embedded:0.5+selfgen:0.5`) the default recipe of notebooks
02/03 is calibrated on its windows: `fluctuation` scores and the one-shot `lstsq` refit of o_proj / down_proj,
at three uniform shapes of the embedded model:
- S1: MLP 1536 -> 1152 (mlp rate 0.25); S2: 9 -> 6 query heads (head rate 0.2); S3: both (-25% non-embedding).
Every variant is measured on the evaluation split of the text (in-domain `ppl`), on held-out text sampled from
the unpruned model with a seed stream calibration never uses (`fidelity_ppl`), and by its mean per-token
KL(unpruned || variant) on the evaluation windows (`kl_to_baseline`). The baseline row carries the same columns.

Writes results/ablation_studies/calibration_sources.csv (variant columns of `pruning_utils.measure.variants` plus
`calibration_source`, `shape`). Usage: python3 -m benchmarks.calibration_sources [--sources a,b,...]
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
from pruning_utils.prune import allocation, importance, reconstruction

SHAPES = {"S1": dict(head_rate=0.0, mlp_rate=0.25), "S2": dict(head_rate=0.2, mlp_rate=0.0),
          "S3": dict(head_rate=0.2, mlp_rate=0.25)}
SOURCES = "embedded:0.5+selfgen:0.5;embedded;embedded:0.75+selfgen:0.25;selfgen"


def shape_plan(model, scores, shape: str):
    """Return the uniform plan of one shape from one criterion's scores (heads, neurons or both)."""
    rates = SHAPES[shape]
    plans = []
    if rates["head_rate"]:
        plans.append(allocation.plan_heads(model, scores, rates["head_rate"]))
    if rates["mlp_rate"]:
        plans.append(allocation.plan_neurons(model, scores, rates["mlp_rate"]))
    return plans[0] if len(plans) == 1 else plans[1].combined_with(plans[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="embedded", help="text of the in-domain evaluation (and of 'embedded' parts)")
    ap.add_argument("--sources", default=SOURCES, help="calibration sources / mixtures, separated by ';'")
    ap.add_argument("--shapes", default="S1,S2,S3")
    ap.add_argument("--criterion", default="fluctuation")
    ap.add_argument("--reconstruction", default="lstsq")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--fidelity-tokens", type=int, default=8192)
    ap.add_argument("--fidelity-seq-len", type=int, default=256)
    ap.add_argument("--heldout-tokens", type=int, default=4096, help="general English prose (data/heldout.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(paths.ablation_dir() / "calibration_sources.csv"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    chunks = sources.eval_chunks(tok, args.text, seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens)
    held = sources.fidelity_chunks(model, tok, n_tokens=args.fidelity_tokens, seq_len=args.fidelity_seq_len,
                                seed=args.seed)
    prose = heldout.heldout_chunks(tok, n_tokens=args.heldout_tokens)  # general English, never calibrated on
    base = measure_variant(model, chunks, variant="baseline", source_model=args.model, fidelity_chunks=held,
                           heldout_chunks=prose, reference_model=model)
    rows = [dict(base, calibration_source="", shape="baseline", build_s=0.0)]
    for source in args.sources.split(";"):
        t0 = time.perf_counter()
        windows = sources.calibration_windows(tok, source, n_samples=args.n_calib, seq_len=args.calib_seq_len,
                                           seed=args.seed, model=model)
        scores = importance.compute_importance(model, windows, [args.criterion], seed=args.seed)[args.criterion]
        grams = reconstruction.collect_grams(model, windows, which=["o_proj", "down_proj"])
        calib_s = time.perf_counter() - t0
        for shape in args.shapes.split(","):
            t1 = time.perf_counter()
            pruned = pruned_copy(model, shape_plan(model, scores, shape), windows, reconstruction=args.reconstruction,
                                 stats=grams, sequential=False)
            build_s = calib_s + time.perf_counter() - t1
            row = measure_variant(pruned, chunks, variant=f"{shape}-{source}", source_model=args.model, reference=base,
                                  criterion=args.criterion, reconstruction=args.reconstruction,
                                  head_rate_requested=SHAPES[shape]["head_rate"],
                                  mlp_rate_requested=SHAPES[shape]["mlp_rate"], fidelity_chunks=held,
                                  heldout_chunks=prose, reference_model=model)
            rows.append(dict(row, calibration_source=source, shape=shape, build_s=round(build_s, 1)))
            results.write_csv(pd.DataFrame(rows), args.out)  # after every row: a stopped run keeps what it measured
            print(f"{shape} {source:32s} ppl {row['ppl']:7.2f}  fidelity {row['fidelity_ppl']:7.2f}  "
                  f"kl {row['kl_to_baseline']:.4f}", flush=True)
            del pruned
        del grams
    table = pd.DataFrame(rows)
    results.write_csv(table, args.out)
    print(table.pivot_table(index="calibration_source", columns="shape",
                            values=["ppl", "fidelity_ppl", "kl_to_baseline"]).round(3).to_string())


if __name__ == "__main__":
    main()
