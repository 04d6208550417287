"""Calibration size sweep: how many calibration tokens the refit and the `obs` selection need (issue 15).

The default recipe's refit and the `obs` selection depend on the calibration windows only through the Gram
matrices of o_proj / down_proj inputs, which are sums over tokens. The sweep therefore grows ONE nested window set
(the default mixture: text windows and self-generated windows in the mixture's shares, each a prefix of its longest
set) and adds each size's new windows to running Grams, so every size costs only its new tokens. At each size
each shape (S3 = -25% non-embedding by default; S1 / S2 of the quality benchmark too) is cut with `obs` selection +
one-shot `lstsq` refit, and with the default criterion (`fluctuation`, scores of notebook 00, fixed) + the refit of
that size, and measured on the in-domain evaluation text and on the held-out self-generated fidelity set. Costs per
size: the new windows' self-generation (cached on disk; 0 when cached), the Gram update, the obs selection.

`obs_fisher` (loss-aware obs: costs in each target's output Fisher metric, `pruning_utils/prune/fisher.py`) takes its
Fisher once, from the first `--fisher-windows` calibration windows or from `--fisher-source` (one backward pass;
`fisher_s`).

Rows are merged into results/ablation_studies/calibration_size.csv by (shape, criterion, calibration_source,
calib_tokens, ridge_ratio, order, fisher_windows, fisher_source): a run of some shapes or sizes keeps the other
rows, each stamped with the commit that measured it.
Usage: python3 -m benchmarks.calibration_size [--sizes 16384,65536] [--shapes S1,S3] [--ridges 1e-3,1e-2]
[--orders one-shot,chase] [--criteria obs,obs_fisher --fisher-windows 64 --fisher-source selfgen]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time

import pandas as pd
import torch

from benchmarks.quality import SHAPES
from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.loading import load_model
from pruning_utils.model.stats import GramStats
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.pipeline import results
from pruning_utils.pipeline.profiles import DEFAULTS
from pruning_utils.prune import allocation, obs, reconstruction
from pruning_utils.prune.fisher import output_fisher
from pruning_utils.prune.scores import load_scores

KEY = ["shape", "criterion", "calibration_source", "calib_tokens", "ridge_ratio", "order", "fisher_windows",
       "fisher_source"]
ORDERS = ("one-shot", "sequential", "chase", "sequential-reselect", "chase-reselect")


def _add(total: dict | None, new: dict) -> dict:
    """Return running Gram statistics plus a batch's (sums over tokens add up exactly)."""
    if total is None:
        return new
    return {k: GramStats(total[k].gram + v.gram, total[k].sum + v.sum, total[k].count + v.count)
            for k, v in new.items()}


def nested_windows(model, tok, source: str, n_max: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Return windows whose first n rows are a size-n mixture for every n that splits into whole shares, and the
    index order that interleaves the parts (text windows and self-generated windows by their shares)."""
    parts = sources.parse_mixture(source)
    counts = sources.mixture_counts(parts, n_max)
    pieces = []
    for (name, _), count in zip(parts, counts):
        if name == sources.SELFGEN:
            from pruning_utils.data.selfgen import sample_windows

            pieces.append(sample_windows(model, tok, count, seq_len, seed=seed, purpose="calibration"))
        else:
            pieces.append(sources.calibration_windows(tok, name, n_samples=count, seq_len=seq_len, seed=seed))
    # interleave: window i of part p sits where its share puts it, so every prefix keeps the mixture's shares
    keys = [(i / count, p, i) for p, count in enumerate(counts) for i in range(count)]
    order = sorted(keys)
    return torch.stack([pieces[p][i] for _, p, i in order]), counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default=DEFAULTS["TEXT_SOURCE"])
    ap.add_argument("--sizes", default="16384,32768,65536",
                    help="calibration tokens, ascending (the embedded calibration "
                    "split holds 89,839 tokens: at a 0.75 text share the mixture reaches about 119k)")
    ap.add_argument("--shapes", default="S3", help=f"comma-separated shapes of {sorted(SHAPES)}")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--fidelity-tokens", type=int, default=DEFAULTS["FIDELITY_TOKENS"])
    ap.add_argument("--orders", default="one-shot",
                    help="refits, comma-separated: one-shot (the running Grams), sequential (each layer refit on the "
                         "already pruned earlier layers), chase (sequential, toward the unpruned model's output); "
                         "-reselect: each layer's removals chosen again by OBS on the walk's statistics, same counts")
    ap.add_argument("--ridges", default="1e-2", help="comma-separated ridge ratios of the refit and the obs selection")
    ap.add_argument("--criteria", default="obs,fluctuation", help="obs (from each size's Grams), obs_fisher (obs "
                    "with costs in the output Fisher metric of the first --fisher-windows windows) and / or "
                    "fluctuation (notebook 00's saved scores), comma-separated")
    ap.add_argument("--fisher-windows", type=int, default=64, help="windows of the output Fisher of obs_fisher")
    ap.add_argument("--fisher-source", default="", help="text source of the Fisher windows (e.g. selfgen, "
                    "embedded:0.5+selfgen:0.5); default: the first calibration windows")
    ap.add_argument("--scores", default=str(PROJECT_ROOT / "results" / "importance"))
    ap.add_argument("--out", default=str(paths.ablation_dir() / "calibration_size.csv"))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or set(shapes) - set(SHAPES):
        raise SystemExit(f"--shapes takes a comma-separated subset of {sorted(SHAPES)} (got '{args.shapes}')")
    try:
        ridges = [float(r) for r in args.ridges.split(",") if r.strip()]
    except ValueError:
        ridges = []
    if not ridges or min(ridges) < 0:
        raise SystemExit(f"--ridges takes comma-separated ratios >= 0, e.g. 1e-3,1e-2 (got '{args.ridges}')")
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or set(orders) - set(ORDERS):
        raise SystemExit(f"--orders takes {', '.join(ORDERS)} (got '{args.orders}')")
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    if not criteria or set(criteria) - {"obs", "obs_fisher", "fluctuation"}:
        raise SystemExit(f"--criteria takes obs, obs_fisher and / or fluctuation (got '{args.criteria}')")
    if args.fisher_windows < 1:
        raise SystemExit(f"--fisher-windows must be >= 1 (got {args.fisher_windows})")
    if sizes != sorted(sizes) or sizes[0] < args.seq_len:
        raise SystemExit(f"--sizes must ascend and start at >= one window ({args.seq_len} tokens), got {sizes}")
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    chunks = sources.eval_chunks(tok, sources.text_parts(args.source), seq_len=args.eval_seq_len,
                              max_tokens=args.eval_max_tokens)
    held = sources.fidelity_chunks(model, tok, n_tokens=args.fidelity_tokens, seq_len=args.seq_len)
    fluct = None
    if "fluctuation" in criteria:
        try:  # the default criterion's saved scores (notebook 00, default windows); without them: obs only
            fluct = load_scores(args.scores).get("fluctuation")
        except FileNotFoundError as err:
            print(f"no fluctuation rows: {err}")
    t0 = time.perf_counter()
    windows, _ = nested_windows(model, tok, args.source, sizes[-1] // args.seq_len, args.seq_len)
    windows_s = time.perf_counter() - t0
    print(f"{len(windows)} windows ready in {windows_s:.0f} s (self-generation, cached on disk)", flush=True)
    fisher, fisher_s = None, float("nan")
    if "obs_fisher" in criteria:  # one backward pass, shared by every size and ridge
        t0 = time.perf_counter()
        fisher_windows = (sources.calibration_windows(tok, args.fisher_source, n_samples=args.fisher_windows,
                                                   seq_len=args.seq_len, model=model)
                          if args.fisher_source else windows[:args.fisher_windows])
        fisher = output_fisher(model, fisher_windows, show_progress=False)
        fisher_s = time.perf_counter() - t0
    rows, grams, done, gram_s, commit = [], None, 0, 0.0, metrics.git_commit()
    for size in sizes:
        n = size // args.seq_len
        t0 = time.perf_counter()
        grams = _add(grams, reconstruction.collect_grams(model, windows[done:n], storage="cpu"))
        gram_s += time.perf_counter() - t0
        done = n
        for ridge in ridges:
            recipes, obs_s = [("fluctuation", fluct)] if fluct is not None else [], {}
            for name, fi in (("obs", None), ("obs_fisher", fisher)):
                if name in criteria:
                    t0 = time.perf_counter()
                    recipes.insert(0, (name, obs.obs_scores(model, grams, ridge_ratio=ridge, fisher=fi,
                                                            progress=False)))
                    obs_s[name] = time.perf_counter() - t0
            for shape, (name, sc), order in itertools.product(shapes, recipes, orders):
                t0 = time.perf_counter()
                one_shot = order == "one-shot"
                pruned = reconstruction.prune_and_reconstruct(
                    copy.deepcopy(model), allocation.plan_both(model, sc, **SHAPES[shape]), windows[:n], "lstsq",
                    sequential=not one_shot, ridge_ratio=ridge, stats=grams if one_shot else None,
                    chase=order.startswith("chase"), reselect=order.endswith("-reselect"))
                refit_s = time.perf_counter() - t0
                ppl = metrics.perplexity(pruned, chunks, progress=False)["ppl"]
                fid = metrics.perplexity(pruned, held, progress=False)["ppl"]
                rows.append(dict(shape=shape, criterion=name, calibration_source=args.source,
                                 calib_tokens=n * args.seq_len, ridge_ratio=ridge, order=order, windows=n, ppl=ppl,
                                 fidelity_ppl=fid, gram_s_cumulative=round(gram_s, 1),
                                 obs_s=round(obs_s[name], 1) if name in obs_s else float("nan"),
                                 fisher_windows=args.fisher_windows if name == "obs_fisher" else 0,
                                 fisher_source=(args.fisher_source or args.source) if name == "obs_fisher" else "-",
                                 fisher_s=round(fisher_s, 1) if name == "obs_fisher" else float("nan"),
                                 refit_s=round(refit_s, 1),
                                 selfgen_and_windows_s=round(windows_s, 1),
                                 params_non_embedding=metrics.count_params(pruned)["non_embedding"],
                                 load_avg=metrics.load_avg(), commit=commit))
                # after every row: a stopped run keeps what it measured
                results.write_csv(results.merge_rows(pd.DataFrame(rows), args.out, KEY), args.out)
                print(f"{shape} {n * args.seq_len:>8} tokens  ridge {ridge:g}  {name:12s} {order:10s} ppl {ppl:7.3f}  "
                      f"fidelity {fid:7.3f}  (grams {gram_s:.0f} s so far, obs {obs_s.get(name, 0):.0f} s)", flush=True)
                del pruned
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
