"""What the budget search's KL windows decide: held-out windows from the calibration mixture vs self-generated ones.

`benchmarks/quality.py` scores the search (`pruning_utils.search`) by KL to the dense model on held-out windows of
the calibration mixture (75% embedded text): at S3 it took in-domain PPL from 19.04 (uniform obs) to 15.30 but the
fidelity PPL (held-out self-generated text) only from 42.43 to 41.80, i.e. the allocation fits the text domain. This
reruns the same search (obs scores, one-shot lstsq refit from the default calibration Grams, same seed and
iterations) with KL windows drawn from each `--held` source — text windows of another seed, or self-generated
windows of another seed of the calibration stream (never the fidelity stream) — and measures in-domain and fidelity
perplexity of each result.

Writes results/ablation_studies/search_heldout.csv. Usage: python3 -m benchmarks.search_heldout [--held ...]
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from pruning_utils import data, metrics, obs, reconstruction, results
from pruning_utils.loading import load_model
from pruning_utils.profiles import DEFAULTS
from pruning_utils.search import search_budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default=DEFAULTS["TEXT_SOURCE"], help="calibration source (Grams and obs scores)")
    ap.add_argument("--held", default="selfgen;embedded:0.75+selfgen:0.25",
                    help="sources of the search's KL windows, separated by ';'")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--held-windows", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--ridge", type=float, default=1e-3, help="the best S3 obs ridge of the quality benchmark")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--fidelity-tokens", type=int, default=DEFAULTS["FIDELITY_TOKENS"])
    ap.add_argument("--out", default=str(results.ablation_dir() / "search_heldout.csv"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    windows = data.calibration_windows(tok, args.source, n_samples=args.n_calib, seq_len=args.seq_len, seed=0,
                                       model=model)
    chunks = data.eval_chunks(tok, data.text_parts(args.source), seq_len=args.eval_seq_len,
                              max_tokens=args.eval_max_tokens)
    fidelity = data.fidelity_chunks(model, tok, n_tokens=args.fidelity_tokens, seq_len=args.seq_len)
    grams = reconstruction.collect_grams(model, windows)
    scores = obs.obs_scores(model, grams, ridge_ratio=args.ridge, progress=False)
    rows = []
    for held_source in args.held.split(";"):
        held = data.calibration_windows(tok, held_source, n_samples=args.held_windows, seq_len=args.seq_len, seed=1,
                                        model=model)
        t0 = time.perf_counter()
        res = search_budget(model, scores, grams, held, iterations=args.iterations, ridge_ratio=args.ridge,
                            progress=False)
        search_s = time.perf_counter() - t0
        for allocation, plan, kl in (("uniform", res.uniform, res.kl_uniform), ("search", res.plan, res.kl)):
            if allocation == "uniform" and rows:
                continue  # the uniform start does not depend on the KL windows
            pruned = reconstruction.prune_and_reconstruct(copy.deepcopy(model), plan, None, "lstsq", sequential=False,
                                                          ridge_ratio=args.ridge, stats=grams)
            rows.append(dict(shape="S3", criterion="obs", allocation=allocation,
                             kl_windows=held_source,
                             kl_heldout=kl, ppl=metrics.perplexity(pruned, chunks, progress=False)["ppl"],
                             fidelity_ppl=metrics.perplexity(pruned, fidelity, progress=False)["ppl"],
                             params_non_embedding=metrics.count_params(pruned)["non_embedding"],
                             search_s=round(search_s, 1) if allocation == "search" else 0.0,
                             heads_removed_per_group=" ".join(map(str, res.counts.heads)) if allocation == "search" else "",
                             calibration_source=args.source))
            results.write_csv(pd.DataFrame(rows), args.out)
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).drop(columns=["heads_removed_per_group"]).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
