"""From importance scores to a `PruningPlan`: how many heads / neurons each layer loses, and which.

Two allocations:
- `uniform`: every eligible layer loses the same fraction; for heads, every KV group of a layer
  loses the same number of query heads (round(heads_per_group * rate)), so GQA stays regular.
- `global`: scores are normalised within each layer (see `normalize`), and removal *units* are
  ranked across layers. A head unit is "the next-weakest query head of every KV group of a layer"
  (groups of a layer always keep equal sizes); a neuron unit is `multiple_of` neurons (so the kept
  width stays a multiple of it). The weakest units go first until the target is met.

`rate` is the fraction of the heads (neurons) of the *eligible* layers to remove: layers protected
by `protect_first` / `protect_last`, or outside `only_last`, are never touched. Instead of a rate, a
`target_non_embedding` parameter count can be given; it is converted to the number of heads
(neurons) whose parameters must go: a head costs 2 * hidden * head_dim (+ head_dim for a q bias),
a neuron 3 * hidden (+ 1 per gate / up bias).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from pruning_utils.model.arch import decoder_layers, head_dim, layer_shapes, unit_costs
from pruning_utils.model.plan import PruningPlan
from pruning_utils.prune.scores import Scores

ALLOCATIONS = ("uniform", "global")
NORMALIZATIONS = ("zscore", "sum", "none")


@dataclass(frozen=True)
class _Unit:
    """One removal step of a layer under global allocation."""

    score: float
    layer: int
    order: int  # the k-th unit of its layer; unit k needs unit k - 1 taken
    indices: tuple[int, ...]


def plan_heads(model, scores: Scores, rate: float = 0.0, allocation: str = "uniform", min_per_group: int = 1,
               protect_first: int = 0, protect_last: int = 0, only_last: int | None = None,
               target_non_embedding: int | None = None, normalize: str = "zscore") -> PruningPlan:
    """Return a plan removing the lowest-scoring query heads, equally in every KV group of a layer."""
    _check_common(model, scores, rate, allocation, normalize, "heads")
    shapes, hd = layer_shapes(model), head_dim(model)
    eligible = _eligible(len(shapes), protect_first, protect_last, only_last)
    base = [s.n_heads for s in shapes]
    per_head = _head_cost(model)
    if target_non_embedding is not None:
        rate = _rate_for_target(model, target_non_embedding, sum(base[li] for li in eligible), per_head, "heads")
    n_eligible = sum(base[li] for li in eligible)
    removed: dict[int, list[int]] = {}
    if rate > 0 and not eligible:
        raise ValueError("no layer is eligible for head pruning: loosen protect_first / protect_last / only_last")
    if rate > 0 and allocation == "uniform":
        for li in eligible:
            s = shapes[li]
            g = s.n_heads // s.n_kv_heads
            r = round_half_up(g * rate)
            if g - r < min_per_group:
                raise ValueError(
                    f"head rate {rate:.3f} removes {r} of {g} query heads per KV group in layer {li}, leaving fewer "
                    f"than min_per_group={min_per_group}; the largest allowed rate is {(g - min_per_group) / g:.3f}"
                )
            if r:
                removed[li] = [k * g + int(i) for k in range(s.n_kv_heads)
                              for i in scores.heads[li].view(s.n_kv_heads, g).argsort(dim=1, stable=True)[k, :r]]
    elif rate > 0:
        units = []
        for li in eligible:
            s = shapes[li]
            g = s.n_heads // s.n_kv_heads
            norm = _normalize(scores.heads[li], normalize).view(s.n_kv_heads, g)
            order = norm.argsort(dim=1, stable=True)  # weakest first inside each group
            for k in range(g - min_per_group):
                idx = tuple(int(grp * g + order[grp, k]) for grp in range(s.n_kv_heads))
                units.append(_Unit(float(norm.gather(1, order[:, k:k + 1]).mean()), li, k, idx))
        removed = _take_units(units, round_half_up(n_eligible * rate), "heads", rate, min_per_group, n_eligible)
    n_removed = sum(len(v) for v in removed.values())
    if rate > 0 and n_removed == 0:
        warnings.warn(f"head rate {rate:.3f} removes no head after rounding (effective rate 0.000); "
                      "raise the rate or use allocation='global'", stacklevel=2)
    heads = {li: sorted(set(range(base[li])) - set(r)) for li, r in sorted(removed.items())}
    return build_plan(model, scores, allocation, heads=heads, head_rate=rate, provenance={
        "kind": "heads", "requested_rate": rate, "effective_rate": n_removed / max(n_eligible, 1),
        "effective_rate_model": n_removed / sum(base), "removed": n_removed, "min_per_group": min_per_group,
        "protect_first": protect_first, "protect_last": protect_last, "only_last": only_last,
        "target_non_embedding": target_non_embedding, "normalize": normalize if allocation == "global" else None,
        "non_embedding_after": _non_embedding(model) - n_removed * per_head, "head_dim": hd,
    })


def plan_neurons(model, scores: Scores, rate: float = 0.0, allocation: str = "uniform", min_per_layer: int = 1,
                 protect_first: int = 0, protect_last: int = 0, only_last: int | None = None, multiple_of: int = 1,
                 target_non_embedding: int | None = None, normalize: str = "zscore") -> PruningPlan:
    """Return a plan removing the lowest-scoring MLP neurons; kept widths are multiples of `multiple_of`."""
    _check_common(model, scores, rate, allocation, normalize, "neurons")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    shapes = layer_shapes(model)
    eligible = _eligible(len(shapes), protect_first, protect_last, only_last)
    base = [s.intermediate for s in shapes]
    per_neuron = _neuron_cost(model)
    if target_non_embedding is not None:
        rate = _rate_for_target(model, target_non_embedding, sum(base[li] for li in eligible), per_neuron, "neurons")
    n_eligible = sum(base[li] for li in eligible)
    floor = max(min_per_layer, 1)
    removed: dict[int, list[int]] = {}
    if rate > 0 and not eligible:
        raise ValueError("no layer is eligible for neuron pruning: loosen protect_first / protect_last / only_last")
    if rate > 0 and allocation == "uniform":
        for li in eligible:
            width = base[li]
            kept = width - round_half_up(width * rate)
            if kept != width:
                kept = round_half_up(kept / multiple_of) * multiple_of
            if kept < floor:
                largest = (width - math.ceil(floor / multiple_of) * multiple_of) / width
                raise ValueError(
                    f"neuron rate {rate:.3f} keeps {kept} of {width} neurons in layer {li}, fewer than "
                    f"min_per_layer={floor}; the largest allowed rate is {max(largest, 0.0):.3f}"
                )
            if kept < width:
                removed[li] = scores.neurons[li].argsort(stable=True)[:width - kept].tolist()
    elif rate > 0:
        units = []
        for li in eligible:
            width = base[li]
            norm = _normalize(scores.neurons[li], normalize)
            order = norm.argsort(stable=True).tolist()
            # first unit trims the width down to a multiple; later units remove multiple_of each
            start, k = 0, 0
            step = width % multiple_of or multiple_of
            while width - (start + step) >= floor:
                idx = order[start:start + step]
                units.append(_Unit(float(norm[idx].mean()), li, k, tuple(idx)))
                start, k, step = start + step, k + 1, multiple_of
        removed = _take_units(units, round_half_up(n_eligible * rate), "neurons", rate, floor, n_eligible)
    n_removed = sum(len(v) for v in removed.values())
    if rate > 0 and n_removed == 0:
        warnings.warn(f"neuron rate {rate:.4f} removes no neuron after rounding (effective rate 0.000)", stacklevel=2)
    neurons = {li: sorted(set(range(base[li])) - set(r)) for li, r in sorted(removed.items())}
    return build_plan(model, scores, allocation, neurons=neurons, mlp_rate=rate, provenance={
        "kind": "neurons", "requested_rate": rate, "effective_rate": n_removed / max(n_eligible, 1),
        "effective_rate_model": n_removed / sum(base), "removed": n_removed, "min_per_layer": floor,
        "multiple_of": multiple_of, "protect_first": protect_first, "protect_last": protect_last,
        "only_last": only_last, "target_non_embedding": target_non_embedding,
        "normalize": normalize if allocation == "global" else None,
        "non_embedding_after": _non_embedding(model) - n_removed * per_neuron,
    })


def plan_both(model, scores: Scores, head_rate: float = 0.0, mlp_rate: float = 0.0, allocation: str = "uniform",
              neuron_scores: Scores | None = None, target_non_embedding: int | None = None,
              min_per_group: int = 1, min_per_layer: int = 1, multiple_of: int = 1, protect_first: int = 0,
              protect_last: int = 0, only_last: int | None = None, normalize: str = "zscore") -> PruningPlan:
    """Return one plan pruning heads and neurons (neurons scored by `neuron_scores` when given).

    With `target_non_embedding`, both kinds lose the same fraction r of their eligible parameters,
    r chosen so the removed head and neuron parameters together reach the target.
    """
    common = dict(allocation=allocation, protect_first=protect_first, protect_last=protect_last,
                  only_last=only_last, normalize=normalize)
    if target_non_embedding is not None:
        shapes = layer_shapes(model)
        eligible = _eligible(len(shapes), protect_first, protect_last, only_last)
        prunable = sum(shapes[li].n_heads * _head_cost(model) + shapes[li].intermediate * _neuron_cost(model)
                       for li in eligible)
        needed = _non_embedding(model) - target_non_embedding
        if not 0 <= needed < prunable:
            raise ValueError(f"target_non_embedding={target_non_embedding:,} needs removing {needed:,} parameters; "
                             f"heads and neurons of the eligible layers hold {prunable:,}. Pick a target in "
                             f"({_non_embedding(model) - prunable:,}, {_non_embedding(model):,}]")
        head_rate = mlp_rate = needed / prunable
    hp = plan_heads(model, scores, head_rate, min_per_group=min_per_group, **common)
    npl = plan_neurons(model, neuron_scores or scores, mlp_rate, min_per_layer=min_per_layer, multiple_of=multiple_of,
                       **common)
    n_removed = hp.provenance["removed"] * _head_cost(model) + npl.provenance["removed"] * _neuron_cost(model)
    criterion = scores.criterion if neuron_scores is None or neuron_scores.criterion == scores.criterion else \
        f"{scores.criterion}+{neuron_scores.criterion}"
    return build_plan(model, scores, allocation, heads=hp.heads, neurons=npl.neurons, head_rate=head_rate,
                 mlp_rate=mlp_rate, criterion=criterion, provenance={
                     "heads": hp.provenance, "neurons": npl.provenance, "target_non_embedding": target_non_embedding,
                     "non_embedding_after": _non_embedding(model) - n_removed})


# ----------------------------------------------------------------------------- helpers


def round_half_up(x: float) -> int:
    """Round half up (Python's round() sends 2.5 to 2, which would make 'round(g * rate)' surprising)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _check_common(model, scores: Scores, rate: float, allocation: str, normalize: str, kind: str) -> None:
    if not 0 <= rate < 1:
        raise ValueError(f"{kind} rate must be in [0, 1), got {rate}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation '{allocation}'; known: {', '.join(ALLOCATIONS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize '{normalize}'; known: {', '.join(NORMALIZATIONS)}")
    shapes = layer_shapes(model)
    per_layer = scores.heads if kind == "heads" else scores.neurons
    want = [s.n_heads if kind == "heads" else s.intermediate for s in shapes]
    got = [int(t.numel()) for t in per_layer]
    if got != want:
        raise ValueError(f"{kind} scores have sizes {got[:6]}... for a model with {want[:6]}...: "
                         "compute the scores on this very model (shapes change after pruning)")


def _eligible(n_layers: int, protect_first: int, protect_last: int, only_last: int | None) -> list[int]:
    """Return the layers that may be pruned."""
    layers = range(protect_first, n_layers - protect_last)
    if only_last is not None:
        layers = [li for li in layers if li >= n_layers - only_last]
    return list(layers)


def _normalize(x: Tensor, how: str) -> Tensor:
    """Return scores made comparable across layers: z-score (default), share of the layer's total, or unchanged."""
    x = x.float()
    if how == "zscore":  # removes each layer's scale: what is compared is how far a head sits below its layer
        std = x.std(unbiased=False)
        return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
    if how == "sum":
        total = x.abs().sum()
        return x / total if total > 0 else torch.zeros_like(x)
    return x


def _take_units(units: list[_Unit], target: int, kind: str, rate: float, floor: int,
                n_eligible: int) -> dict[int, list[int]]:
    """Return removed indices per layer: weakest units first, each only after its layer's previous unit."""
    capacity = sum(len(u.indices) for u in units)
    if target > capacity:
        raise ValueError(f"{kind} rate {rate:.3f} needs {target} of {n_eligible} removals but keeping at least {floor} "
                         f"per {'KV group' if kind == 'heads' else 'layer'} allows only {capacity}; "
                         f"the largest allowed rate is {capacity / n_eligible:.3f}")
    removed: dict[int, list[int]] = {}
    next_order: dict[int, int] = {}
    taken = 0
    for u in sorted(units, key=lambda u: (u.score, u.order, u.layer)):
        if taken >= target:
            break
        if next_order.get(u.layer, 0) != u.order:
            continue  # an earlier unit of this layer was skipped: its later units must stay
        if taken + len(u.indices) / 2 > target:  # overshoot larger than the shortfall: skip, block the layer
            next_order[u.layer] = -1
            continue
        removed.setdefault(u.layer, []).extend(u.indices)
        next_order[u.layer] = u.order + 1
        taken += len(u.indices)
    return removed


def _embedding_params(model) -> set[int]:
    ids = set()
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None:
            ids |= {id(p) for p in m.parameters()}
    return ids


def _non_embedding(model) -> int:
    """Return the parameter count without input / output embeddings."""
    emb = _embedding_params(model)
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def _head_cost(model) -> int:
    """Return the parameters one query head owns (`arch.owned_sums`: q_proj rows + bias, o_proj columns)."""
    return unit_costs(decoder_layers(model)[0], head_dim(model))[0]


def _neuron_cost(model) -> int:
    """Return the parameters one MLP neuron owns (gate and up rows + biases, a down column)."""
    return unit_costs(decoder_layers(model)[0], head_dim(model))[1]


def _rate_for_target(model, target: int, n_eligible: int, cost: int, kind: str) -> float:
    """Return the rate of eligible heads / neurons whose removal brings the non-embedding count to `target`."""
    now = _non_embedding(model)
    needed = now - int(target)
    count = round_half_up(needed / cost)
    if needed < 0 or count >= n_eligible:
        raise ValueError(f"target_non_embedding={target:,} is out of reach by pruning {kind}: the model has {now:,} "
                         f"non-embedding parameters and its eligible {kind} hold {n_eligible * cost:,}; pick a target "
                         f"in ({now - n_eligible * cost:,}, {now:,}]")
    return count / n_eligible if n_eligible else 0.0


def build_plan(model, scores: Scores, allocation: str, heads=None, neurons=None, head_rate: float = 0.0,
               mlp_rate: float = 0.0, criterion: str | None = None, provenance=None) -> PruningPlan:
    """Return the PruningPlan of given kept heads / neurons, with the allocation and rates in its provenance."""
    shapes = layer_shapes(model)
    plan = PruningPlan(
        base_heads=[s.n_heads for s in shapes], base_intermediate=[s.intermediate for s in shapes],
        heads=heads or {}, neurons=neurons or {}, source_model=str(getattr(model.config, "name_or_path", "") or ""),
        criterion=scores.criterion if criterion is None else criterion, allocation=allocation,
        head_rate=float(head_rate), mlp_rate=float(mlp_rate),
        provenance={**(provenance or {}), "scores": dict(scores.provenance)},
    )
    plan.validate()
    return plan
