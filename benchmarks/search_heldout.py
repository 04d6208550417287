"""What the budget search's KL windows decide, per shape: their source (calibration mixture, self-generated, every
source) and how many there are.

`benchmarks/quality.py` scores the search (`pruning_utils.prune.search`) by KL to the dense model on 4 held-out windows
of the calibration mixture (75% embedded text; its S3 rows in quality_benchmark.csv, allocation `search` beside the
uniform obs start, show what that does to in-domain and fidelity perplexity). This reruns the same search (obs scores,
one-shot lstsq refit from the default calibration Grams, same seed and iterations) for each run of `--runs` —
a shape, a number of KL windows and their source: text windows of another seed, or self-generated windows of another
seed of the calibration stream (never the fidelity stream) — and measures in-domain and fidelity perplexity of each
result next to its shape's uniform start.

Rows are merged into results/ablation_studies/search_heldout.csv by (shape, calibration source and tokens, ridge,
allocation, KL windows, window count, trade, order): a run of some of the runs keeps the other rows, each stamped
with the commit that measured it.
Usage: python3 -m benchmarks.search_heldout [--runs "S3 4 selfgen; S2 4 embedded:0.75+selfgen:0.25 no-trade"]
[--orders one-shot,sequential]
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from benchmarks.quality import SHAPES
from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import results
from pruning_utils.pipeline.profiles import DEFAULTS
from pruning_utils.prune import obs, reconstruction
from pruning_utils.prune.search import counts_of, search_budget

MIX = DEFAULTS["TEXT_SOURCE"]
# the profile's search (SEARCH_WINDOWS 16, every part of TEXT_SOURCE alike) and self-generated KL windows at S3, the
# quality benchmark's 4 mixture windows at S1 / S2 (its own S3 search is quality_benchmark.csv's `search` row)
RUNS = f"S3 16 embedded:0.5+selfgen:0.5; S3 4 selfgen; S1 4 {MIX}; S2 4 {MIX}"
KEY = ["shape", "calibration_source", "calib_tokens", "ridge_ratio", "allocation", "kl_windows", "n_kl_windows",
       "trade", "order"]
ORDERS = ("one-shot", "sequential")


def parse_runs(spec: str) -> list[tuple[str, int, str, bool]]:
    """Return (shape, windows, source, trade) of every ';'-separated 'SHAPE WINDOWS SOURCE [no-trade]' run; with
    no-trade the search moves heads between layers and neurons between layers but never trades one for the other."""
    runs = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        fields = part.split()
        if (len(fields) not in (3, 4) or fields[0] not in SHAPES or not fields[1].isdigit() or int(fields[1]) < 1
                or fields[3:] not in ([], ["no-trade"])):
            raise SystemExit(f"run '{part}' is not 'SHAPE WINDOWS SOURCE [no-trade]' with SHAPE in {sorted(SHAPES)} "
                             "and WINDOWS >= 1, e.g. 'S3 4 selfgen' or 'S2 4 embedded no-trade'")
        runs.append((fields[0], int(fields[1]), fields[2], fields[3:] != ["no-trade"]))
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default=MIX, help="calibration source (Grams and obs scores)")
    ap.add_argument("--runs", default=RUNS, help="';'-separated 'SHAPE WINDOWS SOURCE' searches")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--group", type=int, default=32, help="neurons moved per search step")
    ap.add_argument("--ridge", type=float, default=1e-3, help="the best S3 obs ridge of the quality benchmark")
    ap.add_argument("--orders", default="one-shot",
                    help="refits of every measured plan, comma-separated: one-shot (the Grams the search scored "
                         "with) and/or sequential (each layer refit on the already pruned earlier layers)")
    ap.add_argument("--eval-source", default=None, help="in-domain evaluation text (default: the text parts of "
                    "--source; a selfgen-only --source needs one, e.g. embedded)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--fidelity-tokens", type=int, default=DEFAULTS["FIDELITY_TOKENS"])
    ap.add_argument("--out", default=str(paths.ablation_dir() / "search_heldout.csv"))
    args = ap.parse_args(argv)
    runs = parse_runs(args.runs)
    if args.eval_source is None and all(name == sources.SELFGEN for name, _ in sources.parse_mixture(args.source)):
        raise SystemExit(f"--source {args.source} holds no text to evaluate in-domain perplexity on: pass "
                         "--eval-source, e.g. embedded")
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or set(orders) - set(ORDERS):
        raise SystemExit(f"--orders takes {', '.join(ORDERS)} (got '{args.orders}')")
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    windows = sources.calibration_windows(tok, args.source, n_samples=args.n_calib, seq_len=args.seq_len, seed=0,
                                       model=model)
    chunks = sources.eval_chunks(tok, args.eval_source or sources.text_parts(args.source), seq_len=args.eval_seq_len,
                              max_tokens=args.eval_max_tokens)
    fidelity = sources.fidelity_chunks(model, tok, n_tokens=args.fidelity_tokens, seq_len=args.seq_len)
    grams = reconstruction.collect_grams(model, windows)
    scores = obs.obs_scores(model, grams, ridge_ratio=args.ridge, progress=False)
    commit, rows, done_uniform = metrics.git_commit(), [], set()

    def measure(shape, allocation, plan, kl, source, n_windows, trade, search_s=0.0, counts=None):
        for order in orders:
            t0 = time.perf_counter()
            pruned = reconstruction.prune_and_reconstruct(
                copy.deepcopy(model), plan, windows, "lstsq", sequential=order == "sequential", ridge_ratio=args.ridge,
                stats=grams if order == "one-shot" else None)
            rows.append(dict(shape=shape, criterion="obs", allocation=allocation, kl_windows=source,
                             n_kl_windows=n_windows, trade=trade, order=order, kl_heldout=kl,
                             ppl=metrics.perplexity(pruned, chunks, progress=False)["ppl"],
                             fidelity_ppl=metrics.perplexity(pruned, fidelity, progress=False)["ppl"],
                             params_non_embedding=metrics.count_params(pruned)["non_embedding"],
                             search_s=round(search_s, 1), refit_s=round(time.perf_counter() - t0, 1),
                             heads_removed_per_group=" ".join(map(str, counts.heads)) if counts else "",
                             neurons_removed=" ".join(map(str, counts.neurons)) if counts else "",
                             calibration_source=args.source, calib_tokens=args.n_calib * args.seq_len,
                             ridge_ratio=args.ridge, iterations=args.iterations if allocation == "search" else 0,
                             load_avg=metrics.load_avg(), commit=commit))
            print({k: v for k, v in rows[-1].items() if k not in ("heads_removed_per_group", "neurons_removed")},
                  flush=True)
            results.write_csv(results.merge_rows(pd.DataFrame(rows), args.out, KEY), args.out)

    for shape, n_windows, held_source, trade in runs:
        held = sources.calibration_windows(tok, held_source, n_samples=n_windows, seq_len=args.seq_len, seed=1,
                                        model=model)
        t0 = time.perf_counter()
        res = search_budget(model, scores, grams, held, iterations=args.iterations, group=args.group,
                            ridge_ratio=args.ridge, trade=trade, progress=False, **SHAPES[shape])
        search_s = time.perf_counter() - t0
        if shape not in done_uniform:  # the uniform start does not depend on the KL windows; its KL does
            done_uniform.add(shape)
            measure(shape, "uniform", res.uniform, res.kl_uniform, held_source, n_windows, trade,
                    counts=counts_of(res.uniform, model))
        measure(shape, "search", res.plan, res.kl, held_source, n_windows, trade, search_s, res.counts)
    table = pd.DataFrame(rows).drop(columns=["heads_removed_per_group", "neurons_removed"])
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
