"""Perplexity at fixed pruned shapes: every importance criterion x reconstruction, against published peers (issue 6).

Shapes (uniform: every layer alike, GQA groups equal), with peer perplexities and our targets:
- S1: MLP 1536 -> 1152 in every layer (mlp rate 0.25); FLAP 14.1, Taylor 15.0; target <= 13.5
- S2: 9 -> 6 query heads, one per KV group (head rate 0.2 rounds to 1 per group); FLAP 26.6; target <= 20
- S3: S1 + S2 (-25% non-embedding); FLAP 35.7, LLM-Pruner 50.1; target <= 25

Two passes keep the grid affordable on a CPU: (1) every criterion x reconstruction mode is *screened* on the
first `--screen-tokens` evaluation tokens; (2) the best `--full-top` recipes per shape and the peer-like
recipes (magnitude/none, fluctuation/bias-or-lstsq = FLAP-like, taylor/none = LLM-Pruner-like) are scored on
the whole evaluation text. A full score reuses the screen windows' NLL (each window is scored on its own, so
the sum over windows is exact) and only evaluates the rest. One-shot reconstructions share ONE Gram collection
on the unpruned model. Extras, screened then scored in full: S3 with heads and neurons from the best S2 / S1
criteria, a ridge sweep of the best refit per shape, S3 refit sequentially (plain, and chasing the unpruned
model's output, `--orders chase`; off by default: 20 minutes for a worse result), and S3 under `global`
allocation at the same non-embedding count. Issue 15 adds the `obs` criterion (heads and neurons removed in the
order of least reconstruction error left after the refit, `pruning_utils.prune.obs`; computed here from the shared Grams
when the saved scores lack it, its cost in the JSON) and the `search` allocation (`pruning_utils.prune.search`:
per-layer counts under the exact parameter budget, scored by KL to the dense model on held-out calibration windows),
with the held-out KL of the search and its uniform start and the latency of both. Full rows also carry the fidelity
perplexity (held-out text sampled from the unpruned model, `sources.fidelity_chunks`). Torch-Pruning itself
(`benchmarks/torch_pruning_peer.py`: its own Taylor scores and dependency-graph surgery, no refit) is scored in
full at every shape as a side-by-side peer row.

Calibration and evaluation follow the default profile's `TEXT_SOURCE` (calibration windows from the mixture,
in-domain evaluation on its text part), so the saved scores of notebook 00 match the windows used here.

Writes results/ablation_studies/quality_benchmark.csv (columns in `COLUMNS`) and quality_benchmark.json
(environment, settings, peers, timings). Usage: python3 -m benchmarks.quality [--screen-tokens 4096 --full-top 2]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import time
from dataclasses import dataclass, replace

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.arch import decoder_layers
from pruning_utils.model.loading import load_model
from pruning_utils.model.surgery import apply_plan
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.pipeline import results
from pruning_utils.prune import allocation, importance, obs, reconstruction
from pruning_utils.prune.scores import Scores, load_scores

SHAPES = {"S1": dict(head_rate=0.0, mlp_rate=0.25), "S2": dict(head_rate=0.2, mlp_rate=0.0),
          "S3": dict(head_rate=0.2, mlp_rate=0.25)}
PEERS = {"S1": {"FLAP": 14.1, "Taylor": 15.0}, "S2": {"FLAP": 26.6},
         "S3": {"FLAP": 35.7, "LLM-Pruner": 50.1}}
TARGETS = {"S1": 13.5, "S2": 20.0, "S3": 25.0}
TP_PREFIX = "torch-pruning:"  # criterion of the Torch-Pruning peer rows, e.g. torch-pruning:taylor
CRITERIA = ["random", "magnitude", "activation", "fluctuation", "taylor", "tfidf", "tfidf_topic", "semantic",
            "semantic_refit", "mix", "obs"]
COLUMNS = ["shape", "criterion", "reconstruction", "allocation", "order", "ridge_ratio", "role", "screen",
           "eval_tokens", "ppl", "fidelity_ppl", "kl_heldout", "params_non_embedding", "reduction_pct", "target_ppl",
           "build_s", "eval_s", "prefill_ms", "decode_tokens_per_s", "calibration_source", "load_avg"]


@dataclass(frozen=True)
class Recipe:
    """How one pruned variant is made. `criterion` 'a+b' scores heads by a and neurons by b."""

    shape: str
    criterion: str
    reconstruction: str
    allocation: str = "uniform"  # uniform | global (z-scored per layer) | global-sum (share of the layer's total)
    # | search (per-layer counts searched against the dense model's KL, `pruning_utils.prune.search`)
    order: str = "one-shot"  # one-shot: Grams of the unpruned model | sequential: after earlier refits | chase:
    # sequential, refit toward the unpruned model's output (absorbs upstream error)
    ridge: float = 1e-2
    role: str = "grid"

    def key(self) -> tuple:
        """Return what makes two recipes build the same model (the role is only a label)."""
        return (self.shape, self.criterion, self.reconstruction, self.allocation, self.order,
                self.ridge if self.reconstruction == "lstsq" else None)


def make_plan(model, scores: dict[str, Scores], r: Recipe, searched: dict | None = None):
    """Return the plan of a recipe; `global` plans remove as many heads / neurons as the uniform plan does.

    `search` plans come from `searched` (recipe key -> `search.SearchResult`), filled by `Bench.search`."""
    head_crit, _, neuron_crit = r.criterion.partition("+")
    rates = SHAPES[r.shape]
    if r.allocation == "search":
        return searched[r.key()].plan
    uniform = allocation.plan_both(model, scores[head_crit], neuron_scores=scores[neuron_crit or head_crit], **rates)
    if r.allocation == "uniform":
        return uniform
    # the uniform rate 0.2 rounds to 1 of 3 heads per group: give global the effective rates, so counts match
    prov = uniform.provenance
    return allocation.plan_both(
        model, scores[head_crit], neuron_scores=scores[neuron_crit or head_crit], allocation="global",
        head_rate=prov["heads"]["effective_rate"], mlp_rate=prov["neurons"]["effective_rate"],
        normalize="sum" if r.allocation == "global-sum" else "zscore")


def build(model, plan, r: Recipe, grams, windows: torch.Tensor):
    """Return a pruned copy of `model` made by the recipe (the original stays intact)."""
    clone = copy.deepcopy(model)
    if r.reconstruction == "none":
        return apply_plan(clone, plan)
    if r.order in ("sequential", "chase"):
        return reconstruction.prune_and_reconstruct(clone, plan, windows, r.reconstruction, sequential=True,
                                                    ridge_ratio=r.ridge, chase=r.order == "chase")
    return reconstruction.prune_and_reconstruct(clone, plan, None, r.reconstruction, sequential=False,
                                                ridge_ratio=r.ridge, stats=grams)


def supported_modes(model) -> list[str]:
    """Return the reconstruction modes this model's layers take (`bias` only where o_proj and down_proj have one)."""
    layer = decoder_layers(model)[0]
    has_bias = all(reconstruction.target_module(layer, n).bias is not None for n in reconstruction.TARGETS)
    return [m for m in reconstruction.MODES if m != "bias" or has_bias]


class Bench:
    """Builds, screens and fully scores recipes, keeping the rows and the screen NLL sums it can reuse."""

    def __init__(self, model, scores, windows, chunks, n_screen: int, base_params: int, grams, batch_size: int,
                 fidelity=None, source: str = ""):
        self.model, self.scores, self.windows, self.grams = model, scores, windows, grams
        self.screen_chunks, self.rest_chunks = chunks[:n_screen], chunks[n_screen:]
        self.base_params, self.batch_size = base_params, batch_size
        self.fidelity, self.source = fidelity, source
        self.rows: list[dict] = []
        self.screened: dict[tuple, dict] = {}
        self.fully: set[tuple] = set()
        self.searched: dict[tuple, object] = {}  # recipe key -> search.SearchResult
        self.extra: dict[tuple, dict] = {}  # recipe key -> extra columns of its full row (KL, latency)

    def _nll(self, model, chunks) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        out = metrics.perplexity(model, chunks, batch_size=self.batch_size, progress=False)
        return out["nll"] * out["tokens"], out["tokens"], time.perf_counter() - t0

    def _row(self, r: Recipe, model, screen: bool, nll_sum: float, tokens: int, build_s: float, eval_s: float) -> dict:
        params = metrics.count_params(model)["non_embedding"]
        nan = float("nan")
        fidelity = nan
        if not screen and self.fidelity is not None:
            fidelity = metrics.perplexity(model, self.fidelity, batch_size=self.batch_size, progress=False)["ppl"]
        row = dict(shape=r.shape, criterion=r.criterion, reconstruction=r.reconstruction, allocation=r.allocation,
                   order=r.order if r.reconstruction != "none" else "", role=r.role,
                   ridge_ratio=r.ridge if r.reconstruction == "lstsq" else nan, screen=screen,
                   eval_tokens=tokens, ppl=math.exp(nll_sum / tokens), fidelity_ppl=fidelity, kl_heldout=nan,
                   params_non_embedding=params, reduction_pct=100 * (1 - params / self.base_params),
                   target_ppl=TARGETS.get(r.shape, nan), build_s=round(build_s, 1), eval_s=round(eval_s, 1),
                   prefill_ms=nan, decode_tokens_per_s=nan, calibration_source=self.source,
                   load_avg=metrics.load_avg())
        if not screen:
            row.update(self.extra.get(r.key(), {}))
        self.rows.append(row)
        print(f"  {'screen' if screen else 'FULL  '} {r.shape} {r.criterion:24s} {r.reconstruction:5s} "
              f"{r.allocation:10s} {row['order']:10s} ridge={r.ridge:g}  ppl {row['ppl']:8.3f}  "
              f"({build_s:.0f}+{eval_s:.0f} s)", flush=True)
        return row

    def _build(self, r: Recipe):
        t0 = time.perf_counter()
        if r.criterion.startswith(TP_PREFIX):  # the peer prunes with its own scores and surgery
            from benchmarks.torch_pruning_peer import prune_with_torch_pruning

            pruned = prune_with_torch_pruning(copy.deepcopy(self.model), self.windows,
                                              importance=r.criterion[len(TP_PREFIX):], **SHAPES[r.shape])
            return pruned, time.perf_counter() - t0
        plan = make_plan(self.model, self.scores, r, self.searched)
        built = build(self.model, plan, r, self.grams, self.windows)
        return built, time.perf_counter() - t0 + (self.searched[r.key()].seconds if r.allocation == "search" else 0.0)

    def search(self, r: Recipe, held, iterations: int, group: int, seed: int = 0, latency: bool = True) -> None:
        """Search the per-layer counts of a recipe (allocation 'search'), screen it, and record the held-out KL
        of the search and of its uniform start, and both models' latency, for their full rows."""
        from pruning_utils.prune.search import search_budget

        head_crit, _, neuron_crit = r.criterion.partition("+")
        if neuron_crit and neuron_crit != head_crit:
            raise ValueError("the search ranks heads and neurons by one criterion's scores")
        result = search_budget(self.model, self.scores[head_crit], self.grams, held, group=group,
                               iterations=iterations, seed=seed, ridge_ratio=r.ridge, batch_size=self.batch_size,
                               **SHAPES[r.shape])
        self.searched[r.key()] = result
        uniform = replace(r, allocation="uniform", role=r.role + "-uniform")
        self.extra[r.key()] = dict(kl_heldout=result.kl)
        self.extra[uniform.key()] = dict(kl_heldout=result.kl_uniform)
        print(f"  search {r.shape} {r.criterion}: held-out KL {result.kl_uniform:.4f} (uniform) -> {result.kl:.4f} "
              f"in {result.seconds:.0f} s, counts {result.counts}", flush=True)
        if latency:
            for rec in (r, uniform):
                built, _ = self._build(rec)
                lat = metrics.latency(built, batch_size=1, seq_len=512, new_tokens=32, repeats=3)
                self.extra[rec.key()].update(prefill_ms=lat["prefill_ms_median"],
                                             decode_tokens_per_s=lat["decode_tok_s_median"])
        self.screen(r)

    def screen(self, r: Recipe, model=None) -> dict:
        """Screen a recipe (once per recipe) and return its screen row."""
        if r.key() in self.screened:
            return self.screened[r.key()]
        pruned, build_s = (model, 0.0) if model is not None else self._build(r)
        nll_sum, tokens, eval_s = self._nll(pruned, self.screen_chunks)
        row = self._row(r, pruned, True, nll_sum, tokens, build_s, eval_s)
        self.screened[r.key()] = dict(row, nll_sum=nll_sum, recipe=r)
        return row

    def full(self, r: Recipe) -> None:
        """Score a recipe on the whole evaluation text (once per recipe), reusing its screen NLL."""
        if r.key() in self.fully:
            return
        pruned, build_s = self._build(r)
        if r.key() not in self.screened:
            self.screen(r, pruned)
        nll_sum, tokens, eval_s = self._nll(pruned, self.rest_chunks) if len(self.rest_chunks) else (0.0, 0, 0.0)
        s = self.screened[r.key()]
        self._row(r, pruned, False, s["nll_sum"] + nll_sum, s["eval_tokens"] + tokens, build_s, s["eval_s"] + eval_s)
        self.fully.add(r.key())

    def best(self, shape: str, k: int = 1, distinct: bool = False, **match) -> list[Recipe]:
        """Return the k best screened recipes of a shape whose fields equal `match` (or lie in a tuple given there).

        `distinct`: at most one recipe per criterion x reconstruction (the best ridge / order / allocation of it).
        """
        found = sorted((s for s in self.screened.values() if s["shape"] == shape and all(
            getattr(s["recipe"], f) in (v if isinstance(v, tuple) else (v,)) for f, v in match.items())),
            key=lambda s: s["ppl"])
        out, seen = [], set()
        for s in found:
            r = s["recipe"]
            if distinct and (r.criterion, r.reconstruction) in seen:
                continue
            seen.add((r.criterion, r.reconstruction))
            out.append(r)
        return out[:k]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from pruning_utils.pipeline.profiles import DEFAULTS

    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default=DEFAULTS["TEXT_SOURCE"],
                    help="calibration text source or mixture (default: the default profile's TEXT_SOURCE)")
    ap.add_argument("--fidelity-tokens", type=int, default=DEFAULTS["FIDELITY_TOKENS"],
                    help="held-out self-generated tokens of the fidelity perplexity of full rows (0: none)")
    ap.add_argument("--search-shapes", default="S3", help="shapes whose best obs recipe gets a budget search")
    ap.add_argument("--search-iterations", type=int, default=80)
    ap.add_argument("--search-windows", type=int, default=4, help="held-out calibration windows of the search KL")
    ap.add_argument("--search-group", type=int, default=32, help="neurons moved per search step")
    ap.add_argument("--scores", default=str(PROJECT_ROOT / "results" / "importance"),
                    help="folder of saved importance scores (computed here when missing or of another model)")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--shapes", default="S1,S2,S3")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument("--screen-tokens", type=int, default=4096, help="evaluation tokens of the screening pass")
    ap.add_argument("--full-top", type=int, default=2, help="best screened recipes per shape scored in full")
    ap.add_argument("--ridge", type=float, default=1e-2, help="lstsq ridge_ratio of the grid")
    ap.add_argument("--ridge-sweep", default="1e-3,3e-3",
                    help="other ridge ratios screened for the best refit per shape ('' to skip)")
    ap.add_argument("--orders", default="sequential", help="refit orders tried for the best one-shot recipe "
                    "(sequential,chase: chase took 20 min for PPL 38 in the previous run)")
    ap.add_argument("--order-shapes", default="S3", help="shapes whose best recipe is refit in those orders")
    ap.add_argument("--no-extras", action="store_true", help="skip combo, ridge sweep, sequential and allocation rows")
    ap.add_argument("--torch-pruning", default="taylor",
                    help="Torch-Pruning importances scored in full as peer rows (taylor,magnitude; '' to skip)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=str(paths.ablation_dir() / "quality_benchmark.csv"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    model, tok = load_model(args.model, device="cpu", dtype="float32")
    windows = sources.calibration_windows(tok, args.source, n_samples=args.n_calib, seq_len=args.calib_seq_len, seed=0,
                                       model=model)
    chunks = sources.eval_chunks(tok, sources.text_parts(args.source), seq_len=args.eval_seq_len,
                              max_tokens=args.eval_max_tokens)
    fidelity = (sources.fidelity_chunks(model, tok, n_tokens=args.fidelity_tokens, seq_len=args.calib_seq_len)
                if args.fidelity_tokens else None)
    n_screen = max(1, min(len(chunks), args.screen_tokens // args.eval_seq_len))
    criteria, shapes = args.criteria.split(","), args.shapes.split(",")
    modes = supported_modes(model)
    print(f"{args.model}: {len(chunks)} eval windows ({n_screen} screened), reconstruction modes {modes}", flush=True)

    t0 = time.perf_counter()
    grams = reconstruction.collect_grams(model, windows) if set(modes) - {"none"} else {}
    grams_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    wanted = [c for c in criteria if c != "obs"]
    try:
        scores = load_scores(args.scores)
        allocation.plan_both(model, scores[wanted[0] if wanted else next(iter(scores))], head_rate=0.2)  # raises
        # when made for other shapes
        missing = [c for c in wanted if c not in scores]
        score_source = args.scores
    except (FileNotFoundError, KeyError, ValueError, StopIteration) as err:
        print(f"computing importance scores ({err})", flush=True)
        scores, missing, score_source = {}, wanted, "computed"
    if missing:
        scores.update(importance.compute_importance(model, windows, missing, semantic_max_windows=2,
                                                    semantic_seq_len=128, refit_ridge=args.ridge, progress=False))
        score_source = f"{score_source} + computed {missing}" if score_source != "computed" else "computed"
    scores_s = time.perf_counter() - t0
    obs_s = 0.0
    if "obs" in criteria:  # from the same Grams: its cost is the progressive selection alone
        t0 = time.perf_counter()
        scores["obs"] = obs.obs_scores(model, grams, ridge_ratio=args.ridge, progress=False)
        obs_s = time.perf_counter() - t0
    print(f"scores {scores_s:.0f} s ({score_source}), one Gram collection {grams_s:.0f} s, obs selection "
          f"{obs_s:.0f} s", flush=True)

    base_params = metrics.count_params(model)["non_embedding"]
    bench = Bench(model, scores, windows, chunks, n_screen, base_params, grams, args.batch_size, fidelity, args.source)
    base = Recipe("baseline", "-", "none", allocation="-", role="baseline")
    t0 = time.perf_counter()  # the unpruned model needs no plan: scored directly, screen part then the rest
    nll_s, tok_s, ev_s = bench._nll(model, bench.screen_chunks)
    base_screen = bench._row(base, model, True, nll_s, tok_s, 0.0, ev_s)
    nll_r, tok_r, ev_r = bench._nll(model, bench.rest_chunks) if len(bench.rest_chunks) else (0.0, 0, 0.0)
    bench._row(base, model, False, nll_s + nll_r, tok_s + tok_r, 0.0, ev_s + ev_r)
    print(f"baseline screen ppl {base_screen['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # (1) screen the grid
    t_screen = time.perf_counter()
    for shape in shapes:
        for crit in criteria:
            for mode in modes:
                bench.screen(Recipe(shape, crit, mode, ridge=args.ridge))
    refit = "bias" if "bias" in modes else "lstsq"
    extras: list[Recipe] = []
    if not args.no_extras and refit in modes:
        # S3 from the best head criterion (S2) and the best neuron criterion (S1)
        if {"S1", "S2", "S3"} <= set(shapes):
            h = bench.best("S2", reconstruction=refit)[0].criterion
            n = bench.best("S1", reconstruction=refit)[0].criterion
            if h != n:
                bench.screen(Recipe("S3", f"{h}+{n}", refit, ridge=args.ridge, role="combo"))
        for shape in shapes:  # ridge sweep of the best refit
            top = bench.best(shape, reconstruction="lstsq", allocation="uniform")
            for ridge in [float(x) for x in args.ridge_sweep.split(",") if x] if top else []:
                bench.screen(replace(top[0], ridge=ridge, role="ridge"))
        for shape in [s for s in args.order_shapes.split(",") if s in shapes]:  # refit order of the best recipe
            best = bench.best(shape, reconstruction=refit, allocation="uniform", order="one-shot")[0]
            for order in [o for o in args.orders.split(",") if o]:
                extras.append(replace(best, order=order, role=order))
                bench.screen(extras[-1])
        if "S3" in shapes:  # the best S3 refit under global allocation at the same counts
            best3 = bench.best("S3", reconstruction=refit, allocation="uniform", order="one-shot")[0]
            for alloc in ("global", "global-sum"):
                bench.screen(replace(best3, allocation=alloc, role="allocation"))
            extras.append(replace(bench.best("S3", allocation=("global", "global-sum"))[0], role="allocation"))
    search_s = 0.0
    if not args.no_extras and "obs" in criteria and "lstsq" in modes and args.search_iterations:
        t0 = time.perf_counter()
        held = sources.calibration_windows(tok, args.source, n_samples=args.search_windows, seq_len=args.calib_seq_len,
                                        seed=1, model=model)  # another seed than the Gram windows
        for shape in [s for s in args.search_shapes.split(",") if s in shapes]:
            best_obs = bench.best(shape, criterion="obs", reconstruction="lstsq", allocation="uniform",
                                  order="one-shot")[0]
            r = replace(best_obs, allocation="search", role="search")
            bench.search(r, held, args.search_iterations, args.search_group)
            extras += [r, replace(best_obs, role="search-uniform")]
        search_s = time.perf_counter() - t0
    screen_s = time.perf_counter() - t_screen

    # (2) score in full: the best screened recipes and the peer-like ones
    t_full = time.perf_counter()
    for shape in shapes:
        for r in bench.best(shape, args.full_top, distinct=True, allocation="uniform", order="one-shot"):
            bench.full(replace(r, role="top"))
        for crit, mode, role in (("magnitude", "none", "magnitude"), ("fluctuation", refit, "FLAP-like"),
                                 ("taylor", "none", "LLM-Pruner-like")):
            if crit in criteria and mode in modes:
                bench.full(Recipe(shape, crit, mode, ridge=args.ridge, role=role))
    for r in extras:
        bench.full(r)
    for imp in [x for x in args.torch_pruning.split(",") if x]:
        if importlib.util.find_spec("torch_pruning") is None:
            print("torch-pruning is not installed: no Torch-Pruning peer rows (pip install torch-pruning==1.6.1)")
            break
        for shape in shapes:
            try:
                bench.full(Recipe(shape, TP_PREFIX + imp, "none", role="Torch-Pruning"))
            except NotImplementedError as err:  # e.g. a head layout it cannot cut to our shape
                print(f"Torch-Pruning cannot make {shape}: {err}")
    full_s = time.perf_counter() - t_full

    table = pd.DataFrame(bench.rows)[COLUMNS]
    out = results.write_csv(table, args.out)
    total_s = time.perf_counter() - t_start
    results.write_json({
        "model": args.model, "calibration": {"n_samples": args.n_calib, "seq_len": args.calib_seq_len, "seed": 0},
        "evaluation": {"seq_len": args.eval_seq_len, "max_tokens": args.eval_max_tokens, "windows": len(chunks),
                       "screen_windows": n_screen},
        "reconstruction_modes": modes, "scores": score_source, "shapes": SHAPES, "peers": PEERS, "targets": TARGETS,
        "calibration_source": args.source, "fidelity_tokens": args.fidelity_tokens,
        "search": {"shapes": args.search_shapes, "iterations": args.search_iterations, "group": args.search_group,
                   "held_out_windows": args.search_windows, "held_out_seed": 1,
                   "results": {"/".join(map(str, k[:4])): {"kl": v.kl, "kl_uniform": v.kl_uniform, "seconds": v.seconds,
                                                           "counts": {"heads": v.counts.heads,
                                                                      "neurons": v.counts.neurons}}
                               for k, v in bench.searched.items()}},
        "seconds": {"scores": scores_s, "grams": grams_s, "obs_selection": obs_s, "search": search_s,
                    "screen": screen_s, "full": full_s, "total": total_s},
        "env": metrics.environment_info(model),
    }, out.with_suffix(".json"))

    full = table[~table["screen"]].sort_values(["shape", "ppl"])
    print("\nFull evaluation:\n" + full.drop(columns=["screen", "target_ppl"]).to_markdown(index=False, floatfmt=".3f"))
    print(f"\nscreened {int(table['screen'].sum())} recipes in {screen_s:.0f} s, {len(full)} full scores in "
          f"{full_s:.0f} s, total {total_s / 60:.1f} min; wrote {out}")
    for shape in shapes:
        best = full[full["shape"] == shape].iloc[0]
        peers = ", ".join(f"{k} {v}" for k, v in PEERS[shape].items())
        print(f"{shape}: best {best['criterion']}/{best['reconstruction']} ({best['allocation']}, {best['order']}) "
              f"ppl {best['ppl']:.2f}; target {TARGETS[shape]}, peers {peers}")


if __name__ == "__main__":
    main()
