"""Searching per-layer budgets against the dense model: how many heads / neurons each layer loses (issue 15).

A score-based `global` allocation ranks units across layers by normalised scores and did not beat `uniform`
(quality benchmark); this searches the per-layer counts against the real objective instead. A candidate is one
count per layer: query heads removed per KV group (every group of a layer loses the same number, so GQA stays
regular) and MLP neurons removed (moved in units of `group`, so kept widths stay on the uniform width's grid).
Which heads / neurons go inside a layer follows the criterion's scores (e.g. `obs`, whose removal paths are
prefix-consistent). Its fitness is the mean per-token KL(dense || candidate) on held-out windows.

Search: a seeded (1+1) evolutionary hill-climb from the uniform counts. A mutation makes 1-3 moves, each keeping
the removed parameters exactly equal: a head round (one head per KV group) moved from one layer to another,
`group` neurons moved from one layer to another, or, where a head round costs a whole number of neuron groups,
a head round traded for that many neuron groups. A mutation is kept when it lowers the KL.

Candidates are cheap: one working copy of the model keeps full shapes with removed columns zeroed (which computes
exactly what the sliced model does); a layer's refit o_proj / down_proj for a given count comes from the one-shot
Grams (`reconstruction.reconstruct_linear`, cached per layer and count); the KL pass restarts at the first layer a
mutation changed, from the cached hidden states of the current best.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from pruning_utils.model import calibration
from pruning_utils.model.arch import (
    HEAD_INPUT,
    NEURON_INPUT,
    decoder_layers,
    head_channels,
    head_dim,
    layer_shapes,
    unit_costs,
)
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramStats
from pruning_utils.prune import allocation
from pruning_utils.prune.reconstruction import reconstruct_linear, target_module
from pruning_utils.prune.scores import Scores


class SearchError(ValueError):
    """Raised for an impossible budget or missing statistics."""


@dataclass
class Counts:
    """Per layer: query heads removed per KV group, MLP neurons removed."""

    heads: list[int]
    neurons: list[int]

    def key(self) -> tuple:
        return tuple(self.heads), tuple(self.neurons)

    def copy(self) -> "Counts":
        return Counts(list(self.heads), list(self.neurons))


@dataclass
class SearchResult:
    """The best plan found, the uniform plan it started from, their KLs and the search history."""

    plan: PruningPlan
    uniform: PruningPlan
    kl: float
    kl_uniform: float
    history: pd.DataFrame
    seconds: float
    counts: Counts = field(default_factory=lambda: Counts([], []))


def kept_indices(scores: Scores, li: int, shape, heads_removed: int, neurons_removed: int
                 ) -> tuple[list[int], list[int]]:
    """Return the kept query heads (the lowest-scored `heads_removed` of every KV group go) and kept neurons of a
    layer, sorted."""
    g = shape.n_heads // shape.n_kv_heads
    order = scores.heads[li].view(shape.n_kv_heads, g).argsort(dim=1, stable=True)
    heads = sorted(k * g + int(i) for k in range(shape.n_kv_heads) for i in order[k, heads_removed:])
    neurons = sorted(scores.neurons[li].argsort(stable=True)[neurons_removed:].tolist())
    return heads, neurons


def plan_from_counts(model, scores: Scores, counts: Counts, allocation_name: str = "search") -> PruningPlan:
    """Return the plan removing, per layer, the lowest-scored heads of every KV group and the lowest neurons."""
    shapes = layer_shapes(model)
    if len(counts.heads) != len(shapes) or len(counts.neurons) != len(shapes):
        raise SearchError(f"counts name {len(counts.heads)} / {len(counts.neurons)} layers, "
                          f"the model has {len(shapes)}")
    heads, neurons = {}, {}
    for li, s in enumerate(shapes):
        g = s.n_heads // s.n_kv_heads
        r, n = counts.heads[li], counts.neurons[li]
        if not 0 <= r < g or not 0 <= n < s.intermediate:
            raise SearchError(f"layer {li}: removing {r} of {g} heads per group / {n} of {s.intermediate} neurons")
        kept_h, kept_n = kept_indices(scores, li, s, r, n)
        if r:
            heads[li] = kept_h
        if n:
            neurons[li] = kept_n
    uniform = len(set(counts.heads)) == 1 and len(set(counts.neurons)) == 1
    return allocation.build_plan(model, scores, "uniform" if uniform else allocation_name, heads=heads, neurons=neurons,
                            provenance={"counts": {"heads_removed_per_group": list(counts.heads),
                                                   "neurons_removed": list(counts.neurons)}})


def counts_of(plan: PruningPlan, model) -> Counts:
    """Return the per-layer counts of a plan (heads removed per KV group, neurons removed)."""
    shapes = layer_shapes(model)
    return Counts([(s.n_heads - len(plan.kept_heads(li))) // s.n_kv_heads for li, s in enumerate(shapes)],
                  [s.intermediate - len(plan.kept_neurons(li)) for li, s in enumerate(shapes)])


def removed_params(model, counts: Counts) -> int:
    """Return the parameters the counts remove (a head's and a neuron's own parameters, `arch.unit_costs`)."""
    hd, total = head_dim(model), 0
    for li, (layer, s) in enumerate(zip(decoder_layers(model), layer_shapes(model))):
        head_cost, neuron_cost = unit_costs(layer, hd)
        total += counts.heads[li] * s.n_kv_heads * head_cost + counts.neurons[li] * neuron_cost
    return total


class _Candidates:
    """A working copy whose layers are set to counts (refit columns, zeros elsewhere) and scored by KL."""

    def __init__(self, model, scores: Scores, grams: Mapping[tuple[int, str], GramStats], windows: Tensor,
                 ridge_ratio: float, batch_size: int):
        self.model, self.scores, self.grams, self.ridge = model, scores, grams, ridge_ratio
        self.work = copy.deepcopy(model).eval()
        self.shapes, self.hd = layer_shapes(model), head_dim(model)
        self.cache: dict[tuple[int, str, int], Tensor] = {}
        self.state: list[tuple[int, int]] = [(0, 0)] * len(self.shapes)
        self.inputs = calibration.capture_layer_inputs(self.work, windows, batch_size)
        with torch.no_grad():  # the dense reference and the hidden states entering every layer, per batch
            self.ref, self.hidden = [], []
            for b, h in enumerate(self.inputs.hidden):
                per_layer = [h]
                for j, layer in enumerate(decoder_layers(self.work)):
                    per_layer.append(calibration.run_layer(layer, per_layer[-1], self.inputs.calls[j][b]))
                self.hidden.append(per_layer)
                self.ref.append(F.log_softmax(calibration.logits_from_hidden(self.work, per_layer[-1]).float(), -1))

    def _weight(self, li: int, name: str, count: int) -> tuple[Tensor, Tensor | None]:
        """Return the full-shape refit (weight, bias) of a layer's o_proj / down_proj at a count (cached)."""
        key = (li, name, count)
        if key not in self.cache:
            module = target_module(decoder_layers(self.model)[li], name)
            bias = None if module.bias is None else module.bias.detach().clone()
            if count == 0:
                self.cache[key] = module.weight.detach().clone(), bias
                return self.cache[key]
            heads, neurons = kept_indices(self.scores, li, self.shapes[li], *((count, 0) if name == HEAD_INPUT
                                                                                 else (0, count)))
            keep = head_channels(heads, self.hd) if name == HEAD_INPUT else torch.tensor(neurons)
            new_w, new_b = reconstruct_linear(module.weight, module.bias, keep, self.grams[(li, name)], "lstsq",
                                              self.ridge)
            full = torch.zeros_like(module.weight)
            full[:, keep.to(full.device)] = new_w
            self.cache[key] = full, new_b
        return self.cache[key]

    @torch.no_grad()
    def set(self, counts: Counts) -> int:
        """Write the counts into the working copy; return the first layer that changed (len(layers) if none)."""
        first = len(self.shapes)
        work_layers = decoder_layers(self.work)
        for li, want in enumerate(zip(counts.heads, counts.neurons)):
            if self.state[li] == want:
                continue
            first = min(first, li)
            for name, count, old in ((HEAD_INPUT, want[0], self.state[li][0]),
                                     (NEURON_INPUT, want[1], self.state[li][1])):
                if count != old:
                    module = target_module(work_layers[li], name)
                    weight, bias = self._weight(li, name, count)
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
            self.state[li] = want
        return first

    @torch.no_grad()
    def kl(self, start: int) -> float:
        """Return the mean per-token KL(dense || working copy), recomputing from layer `start` (see `accept`)."""
        total, tokens = 0.0, 0
        layers = decoder_layers(self.work)
        self.pending = (start, [])
        for b in range(len(self.hidden)):
            h, new = self.hidden[b][start], []
            for j in range(start, len(layers)):
                h = calibration.run_layer(layers[j], h, self.inputs.calls[j][b])
                new.append(h)
            self.pending[1].append(new)
            logp = F.log_softmax(calibration.logits_from_hidden(self.work, h).float(), -1)
            ref = self.ref[b]
            total += float((ref.exp() * (ref - logp)).sum())
            tokens += ref.shape[0] * ref.shape[1]
        return total / tokens

    def accept(self) -> None:
        """Keep the hidden states of the last `kl` pass as those of the current best."""
        start, new = self.pending
        for b, states in enumerate(new):
            self.hidden[b][start + 1:] = states


def _mutate(c: Counts, rng: np.random.Generator, shapes, group: int, max_neurons: list[int],
            trade: int | None) -> Counts:
    """Return counts with 1-3 budget-preserving moves applied (see the module docstring)."""
    out = c.copy()
    n = len(shapes)
    max_heads = [s.n_heads // s.n_kv_heads - 1 for s in shapes]
    kinds = ["heads", "neurons"] + (["trade"] if trade else [])
    for _ in range(int(rng.integers(1, 4))):
        kind = kinds[int(rng.integers(len(kinds)))]
        a, b = (int(x) for x in rng.choice(n, 2, replace=False))
        if kind == "heads" and out.heads[a] < max_heads[a] and out.heads[b] > 0:
            out.heads[a] += 1
            out.heads[b] -= 1
        elif kind == "neurons" and out.neurons[a] + group <= max_neurons[a] and out.neurons[b] >= group:
            out.neurons[a] += group
            out.neurons[b] -= group
        elif kind == "trade":
            if rng.random() < 0.5 and out.heads[a] < max_heads[a] and out.neurons[b] >= trade * group:
                out.heads[a] += 1
                out.neurons[b] -= trade * group
            elif out.heads[a] > 0 and out.neurons[b] + trade * group <= max_neurons[b]:
                out.heads[a] -= 1
                out.neurons[b] += trade * group
    return out


def _trade_ratio(model, group: int) -> int | None:
    """Return how many neuron groups one head round costs when that is a whole number, for every layer alike."""
    hd, ratios = head_dim(model), set()
    for layer, s in zip(decoder_layers(model), layer_shapes(model)):
        head_cost, neuron_cost = unit_costs(layer, hd)
        round_cost, group_cost = s.n_kv_heads * head_cost, group * neuron_cost
        ratios.add(round_cost // group_cost if round_cost % group_cost == 0 else None)
    return ratios.pop() if len(ratios) == 1 else None


def search_budget(model, scores: Scores, grams: Mapping[tuple[int, str], GramStats], windows: Tensor,
                  head_rate: float = 0.2, mlp_rate: float = 0.25, group: int = 32, iterations: int = 100,
                  seed: int = 0, ridge_ratio: float = 1e-2, max_neuron_frac: float = 0.5, trade: bool = True,
                  batch_size: int = 4, progress: bool = True) -> SearchResult:
    """Return the per-layer allocation with the lowest KL to the dense model among seeded mutations of uniform.

    `windows` are held-out calibration windows (not the Gram windows). The budget is the uniform plan's removed
    parameters at `head_rate` / `mlp_rate` and is kept exactly; `max_neuron_frac` caps any layer's neuron removal.
    """
    from pruning_utils.progress import progress as bar

    if iterations < 0 or group < 1:
        raise SearchError(f"iterations must be >= 0 and group >= 1 (got {iterations}, {group})")
    t0 = time.perf_counter()
    shapes = layer_shapes(model)
    uniform = allocation.plan_both(model, scores, head_rate=head_rate, mlp_rate=mlp_rate)
    start = counts_of(uniform, model)
    max_neurons = [max(int(max_neuron_frac * s.intermediate), n) for s, n in zip(shapes, start.neurons)]
    missing = [(li, name) for li in range(len(shapes)) for name in (HEAD_INPUT, NEURON_INPUT)
               if (li, name) not in grams]
    if missing:
        raise SearchError(f"no Gram statistics for {missing[:3]}; collect them with reconstruction.collect_grams")
    budget = removed_params(model, start)
    cand = _Candidates(model, scores, grams, windows, ridge_ratio, batch_size)
    ratio = _trade_ratio(model, group) if trade else None
    rng = np.random.default_rng(seed)
    cand.set(start)
    best, best_kl = start, cand.kl(0)
    cand.accept()
    kl_uniform = best_kl
    rows = [dict(iteration=0, kl=best_kl, best_kl=best_kl, accepted=True, first_layer=0)]
    seen = {best.key()}
    for it in bar(range(1, iterations + 1), desc="budget search", unit="candidate", disable=not progress):
        trial = _mutate(best, rng, shapes, group, max_neurons, ratio)
        if trial.key() in seen:
            continue
        seen.add(trial.key())
        if removed_params(model, trial) != budget:  # every move is budget-neutral; this guards the invariant
            raise SearchError("a mutation changed the removed parameter count")
        first = cand.set(trial)
        kl = cand.kl(first)
        accepted = kl < best_kl
        if accepted:
            best, best_kl = trial, kl
            cand.accept()
        else:
            cand.set(best)
        rows.append(dict(iteration=it, kl=kl, best_kl=best_kl, accepted=accepted, first_layer=first))
    plan = plan_from_counts(model, scores, best)
    plan.provenance["search"] = {"iterations": iterations, "seed": seed, "group": group, "kl": best_kl,
                                 "kl_uniform": kl_uniform, "held_out_windows": list(windows.shape),
                                 "budget_removed_params": budget, "trade_ratio": ratio}
    return SearchResult(plan, uniform, best_kl, kl_uniform, pd.DataFrame(rows), time.perf_counter() - t0, best)


# ----------------------------------------------------------------------------- the notebooks' main plans

PLAN_ALLOCATIONS = allocation.ALLOCATIONS + ("search",)


def equal_parts(text_source: str) -> str:
    """Return the text source with every part at equal weight, e.g. 'embedded:0.75+selfgen:0.25' ->
    'embedded:0.5+selfgen:0.5': the search's KL windows hold every source alike (issue 15's over-fitting check)."""
    from pruning_utils.data.sources import parse_mixture

    parts = parse_mixture(text_source)
    return text_source if len(parts) == 1 else "+".join(f"{name}:{1 / len(parts):.6g}" for name, _ in parts)


def criterion_scores(scores: dict[str, Scores], criterion: str, model,
                     grams: Mapping[tuple[int, str], GramStats] | None = None, ridge_ratio: float = 1e-2) -> Scores:
    """Return `scores[criterion]`; `obs` (not a notebook-00 criterion: it needs the refit's Grams) is computed from
    `grams` the first time and kept in `scores`."""
    if criterion not in scores:
        if criterion != "obs":
            raise KeyError(f"no scores for criterion '{criterion}'; known: {', '.join(sorted(scores)) or 'none'} "
                           "and obs. Add it to CRITERIA of notebook 00 and re-run it")
        if grams is None:
            raise SearchError("criterion 'obs' needs the refit's Gram statistics held in memory: set GRAMS=device "
                              "or host (GRAMS=streamed keeps none)")
        from pruning_utils.prune.obs import obs_scores

        scores[criterion] = obs_scores(model, grams, ridge_ratio=ridge_ratio)
    return scores[criterion]


def main_plan(model, scores: dict[str, Scores], *, head_criterion: str | None = None,
              mlp_criterion: str | None = None, head_rate: float = 0.0, mlp_rate: float = 0.0,
              allocation_name: str = "uniform", grams: Mapping[tuple[int, str], GramStats] | None = None,
              tokenizer=None, text_source: str = "", seed: int = 0, seq_len: int = 256, windows: int = 16,
              iterations: int = 80, group: int = 32, ridge_ratio: float = 1e-2, selfgen_kw: dict | None = None,
              progress: bool = True) -> PruningPlan:
    """Return the plan of a notebook's main model: heads at `head_rate` and / or neurons at `mlp_rate`.

    `uniform` / `global` are `allocation.plan_heads` / `plan_neurons` / `plan_both`. `search` starts from uniform and
    searches the per-layer counts at its exact parameter budget (`search_budget`), scored by KL to the dense model
    on `windows` held-out windows (seed + 1) of every part of `text_source` at equal weight; heads are traded for
    neurons only when both kinds are pruned, so a head-only plan stays head-only. The search result is recorded in
    the plan's provenance."""
    if allocation_name not in PLAN_ALLOCATIONS:
        raise ValueError(f"unknown allocation '{allocation_name}'; known: {', '.join(PLAN_ALLOCATIONS)}")
    if not head_rate and not mlp_rate:
        raise ValueError("main_plan needs head_rate > 0 or mlp_rate > 0")
    if (head_rate and head_criterion is None) or (mlp_rate and mlp_criterion is None):
        raise ValueError("name the criterion of every kind pruned (head_criterion / mlp_criterion)")
    hs = criterion_scores(scores, head_criterion, model, grams, ridge_ratio) if head_rate else None
    ns = criterion_scores(scores, mlp_criterion, model, grams, ridge_ratio) if mlp_rate else None
    if allocation_name != "search":
        if hs is not None and ns is not None:
            return allocation.plan_both(model, hs, head_rate, mlp_rate, allocation=allocation_name, neuron_scores=ns)
        if hs is not None:
            return allocation.plan_heads(model, hs, head_rate, allocation=allocation_name)
        return allocation.plan_neurons(model, ns, mlp_rate, allocation=allocation_name)
    if grams is None:
        raise SearchError("ALLOCATION='search' refits every candidate from the Gram statistics: set GRAMS=device or "
                          "host (GRAMS=streamed keeps none)")
    if tokenizer is None or not text_source:
        raise SearchError("ALLOCATION='search' needs the tokenizer and the text source of its held-out KL windows")
    heads_from, neurons_from = hs or ns, ns or hs  # a kind not pruned keeps the other's scores (its count stays 0)
    joint = Scores(heads_from.heads, neurons_from.neurons, heads_from.criterion if heads_from.criterion ==
                   neurons_from.criterion else f"{heads_from.criterion}+{neurons_from.criterion}")
    from pruning_utils.data.sources import calibration_windows

    kl_source, trade = equal_parts(text_source), bool(head_rate and mlp_rate)
    held = calibration_windows(tokenizer, kl_source, n_samples=windows, seq_len=seq_len, seed=seed + 1, model=model,
                               selfgen_kw=selfgen_kw)
    res = search_budget(model, joint, grams, held, head_rate=head_rate, mlp_rate=mlp_rate, group=group,
                        iterations=iterations, seed=seed, ridge_ratio=ridge_ratio, trade=trade, progress=progress)
    res.plan.provenance["search"].update(kl_windows=kl_source, seconds=round(res.seconds, 1), trade=trade)
    res.plan.head_rate, res.plan.mlp_rate = head_rate, mlp_rate
    return res.plan
