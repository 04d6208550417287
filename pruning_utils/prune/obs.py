"""Choosing what to remove by the reconstruction error it leaves after the refit (OBS-style, progressive).

For a refit target (o_proj after heads, down_proj after neurons) with weight W [out, in] and the one-shot Gram
G = Σ x xᵀ of its input, let H = G + λI (λ = ridge_ratio · mean diag G, as in `reconstruction`). Refitting the
kept columns after removing the channel set R minimises E = tr((W - W̃) H (W - W̃)ᵀ) over W̃ with W̃[:, R] = 0, and
from the current (already refit) weights the removal of R costs

    ΔE(R) = tr(W_R (H⁻¹_RR)⁻¹ W_Rᵀ)        (H⁻¹: the inverse restricted to the channels still kept)

with the optimal update W ← W − W_R (H⁻¹_RR)⁻¹ H⁻¹_R,: and H⁻¹ ← H⁻¹ − H⁻¹_:,R (H⁻¹_RR)⁻¹ H⁻¹_R,: (the Schur
complement, i.e. the inverse over the channels left). Removal is progressive: score every candidate, take the
cheapest, update W and H⁻¹, score again. Because E is quadratic, the weights after any number of steps equal the
joint ridge refit of the channels left, so the final weights still come from `reconstruction.reconstruct_linear`
(`lstsq`); this module only decides *which* channels go, from the same Gram matrices (no extra model pass).

Candidates: a head is its `head_dim` input channels of o_proj; removal goes in rounds that take one head from every
KV group (the cheapest left in each group, re-scored after each pick), so GQA groups stay equal at every round. A
neuron is one input channel of down_proj; `step` neurons go per update (the `step` cheapest, removed jointly with
their exact joint cost; step 1 is exact greedy). A layer with an output bias gets the constant channel of
`reconstruction` appended (never removed, no ridge), so the bias is refit as the `lstsq` mode does.

`obs_scores` turns the removal order into a `Scores` (criterion `obs`): a head's / neuron's score is the step at
which the path removes it (later = more important; channels the path never reaches rank above all removed ones by
their last ΔE). Any allocation then takes prefixes of the path: `uniform` takes the same count per layer, and
`search.search_budget` searches per-layer counts. The path's cumulative errors are kept in the provenance.
`reselect_keep` runs the same path on the statistics of a sequential walk (`prune_and_reconstruct(reselect=True)`),
from the chase optimum where the walk carries the unpruned model's inputs too.
With `fisher` (`fisher.output_fisher`: the loss gradient's second moment at each target's output) the costs are
tr(F ΔW H ΔWᵀ), the loss-aware metric, criterion `obs_fisher` (W ← F^½ W before the path; the refit is the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from pruning_utils.model.arch import (
    HEAD_INPUT,
    NEURON_INPUT,
    decoder_layers,
    head_channels,
    head_dim,
    layer_shapes,
    proj,
)
from pruning_utils.model.stats import GramStats, cross_with_constant_channel, with_constant_channel
from pruning_utils.prune.fisher import metric_root
from pruning_utils.prune.scores import Scores


class ObsError(ValueError):
    """Raised when the statistics do not fit the layer or the request is impossible."""


@dataclass
class Path:
    """The progressive removal of one refit target: candidates in removal order and the error after each update."""

    order: list[int]  # candidate indices, first removed first
    errors: list[float] = field(default_factory=list)  # cumulative ΔE after each update (a round / a step)
    sizes: list[int] = field(default_factory=list)  # candidates removed by each update
    last: Tensor | None = None  # ΔE of every candidate at the end (inf for removed ones)


def _system(weight: Tensor, bias: Tensor | None, stats: GramStats, ridge_ratio: float,
            metric: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Return (W, H⁻¹) in float64, with the constant channel appended when the layer has a bias; with an output
    `metric` F [out, out], W is replaced by F^½ W (removal costs become tr(F ΔW H ΔWᵀ), the refit is unchanged)."""
    in_dim = weight.shape[1]
    if stats.gram.shape != (in_dim, in_dim):
        raise ObsError(f"Gram is {tuple(stats.gram.shape)} but the weight has {in_dim} input channels")
    dev = stats.gram.device
    g = stats.gram.to(torch.float64)
    w = weight.detach().to(device=dev, dtype=torch.float64)
    ridge = ridge_ratio * torch.diagonal(g).mean()
    h = g + ridge * torch.eye(in_dim, dtype=torch.float64, device=dev)
    if bias is not None:
        h, w = with_constant_channel(h, stats, w, bias)
    if metric is not None:
        if metric.shape != (w.shape[0], w.shape[0]):
            raise ObsError(f"output metric is {tuple(metric.shape)} but the weight has {w.shape[0]} outputs")
        w = metric_root(metric).to(w.device) @ w
    chol, info = torch.linalg.cholesky_ex(h)
    hinv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.pinv(h, hermitian=True)
    return w, hinv


def _costs(w: Tensor, hinv: Tensor, cols: Tensor, alive: Tensor) -> Tensor:
    """Return ΔE of removing each candidate alone (cols [n, d] channel indices), inf for those already removed."""
    out = torch.full((cols.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    idx = alive.nonzero().squeeze(1)
    live = cols[idx]
    if live.shape[1] == 1:
        c = live[:, 0]
        out[idx] = (w[:, c] ** 2).sum(0) / torch.diagonal(hinv)[c].clamp_min(1e-300)
        return out
    blocks = hinv[live[:, :, None], live[:, None, :]]  # [n, d, d]
    wc = w[:, live].permute(1, 2, 0)  # [n, d, out]
    sol = torch.linalg.solve(blocks, wc)  # [n, d, out]
    out[idx] = (wc * sol).sum((1, 2))
    return out


def _remove(w: Tensor, hinv: Tensor, r: Tensor) -> float:
    """Remove channels `r` with the optimal update of W and H⁻¹ (in place); return ΔE."""
    h_rr = hinv[r][:, r]
    w_r = w[:, r]
    sol = torch.linalg.solve(h_rr, torch.cat([w_r.T, hinv[r, :]], 1))  # [(H⁻¹_rr)⁻¹ W_rᵀ | (H⁻¹_rr)⁻¹ H⁻¹_r,:]
    a, b = sol[:, :w.shape[0]], sol[:, w.shape[0]:]
    cost = float((w_r * a.T).sum())
    w -= a.T @ hinv[r, :]
    hinv -= hinv[:, r] @ b
    w[:, r] = 0.0
    hinv[r, :] = 0.0
    hinv[:, r] = 0.0
    return cost


@torch.no_grad()
def greedy_path(weight: Tensor, bias: Tensor | None, stats: GramStats, cols: Tensor, n_updates: int,
                classes: Tensor | None = None, step: int = 1, ridge_ratio: float = 1e-2,
                metric: Tensor | None = None) -> Path:
    """Return the progressive removal path of candidates `cols` [n, d] (channel indices of the weight's inputs).

    With `classes` [n] (KV group of each head), each update is a round removing the cheapest candidate of every
    class in turn; otherwise each update removes the `step` cheapest candidates jointly. Stops after `n_updates`.
    `metric`: the output metric of the costs (`fisher.output_fisher`), identity by default.
    """
    cols = torch.as_tensor(cols, dtype=torch.long)
    n = cols.shape[0]
    per_update = step if classes is None else int(torch.unique(classes).numel())
    if n_updates * per_update >= n:
        raise ObsError(f"a path of {n_updates} updates x {per_update} removes all {n} candidates; keep at least one")
    w, hinv = _system(weight, bias, stats, ridge_ratio, metric)
    cols = cols.to(w.device)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    path, total = Path(order=[]), 0.0
    for _ in range(n_updates):
        if classes is None:
            cost = _costs(w, hinv, cols, alive)
            pick = cost.argsort(stable=True)[:step]
            total += _remove(w, hinv, cols[pick].reshape(-1))
            alive[pick] = False
            path.order.extend(int(i) for i in pick)
            path.sizes.append(len(pick))
        else:
            todo = set(torch.unique(classes).tolist())
            while todo:
                cost = _costs(w, hinv, cols, alive)
                allowed = torch.tensor([int(c) in todo for c in classes.tolist()], device=w.device)
                i = int(cost.masked_fill(~allowed, float("inf")).argmin())
                total += _remove(w, hinv, cols[i])
                alive[i] = False
                todo.discard(int(classes[i]))
                path.order.append(i)
            path.sizes.append(per_update)
        path.errors.append(total)
    path.last = _costs(w, hinv, cols, alive).cpu()
    return path


def head_candidates(n_heads: int, n_kv_heads: int, hd: int) -> tuple[Tensor, Tensor]:
    """Return every head's o_proj input channels [n_heads, hd] and its KV group [n_heads] (the path's classes)."""
    return (torch.stack([head_channels([h], hd) for h in range(n_heads)]),
            torch.arange(n_heads) // (n_heads // n_kv_heads))


def reselect_keep(weight: Tensor, bias: Tensor | None, stats: GramStats, n_remove: int, kind: str,
                  n_kv_heads: int = 1, hd: int = 1, step: int = 8, ridge_ratio: float = 1e-2) -> Tensor:
    """Return the heads (`kind` 'heads': `n_remove` per layer, equal in every KV group) or neurons to keep when
    `n_remove` go, chosen by the greedy path on `stats` (e.g. Grams taken on already pruned layers).

    Where `stats` carries cross terms with the unpruned model's inputs (`GramStats.add_paired`, the `chase` refit),
    the path starts from the chase optimum instead of W: with H = G + λI and C = Σ x x_refᵀ the chase objective
    ‖W X_ref − W' X‖² + λ‖W' − W‖² equals const + tr((W' − W*) H (W' − W*)ᵀ) with W* = W (C + λI)ᵀ H⁻¹, so the
    same progressive OBS removal from W* is exact for it.
    """
    w = weight.detach().to(device=stats.gram.device, dtype=torch.float64)
    in_dim = w.shape[1]
    if stats.cross is not None:
        g, c = stats.gram.to(torch.float64), stats.cross.to(torch.float64)
        ridge = torch.full((in_dim,), float(ridge_ratio * torch.diagonal(g).mean()), dtype=torch.float64,
                           device=g.device)
        if bias is not None:  # the constant channel (no ridge): x̃ = [x; 1], C̃ = Σ x̃ x̃_refᵀ
            g, w = with_constant_channel(g, stats, w, bias)
            c = cross_with_constant_channel(c, stats)
            ridge = torch.cat([ridge, ridge.new_zeros(1)])
        lam = torch.diag(ridge)
        w = torch.linalg.solve(g + lam, (c + lam) @ w.T).T  # W* = W (C + Λ)ᵀ H⁻¹, H symmetric
        if bias is not None:
            w, bias = w[:, :in_dim], w[:, in_dim]
    if kind == "heads":
        n = in_dim // hd  # candidates
        if n_remove % n_kv_heads:
            raise ObsError(f"{n_remove} heads cannot leave {n_kv_heads} KV groups equal")
        cols, classes = head_candidates(n, n_kv_heads, hd)
        order = greedy_path(w, bias, stats, cols, n_remove // n_kv_heads, classes, ridge_ratio=ridge_ratio).order
    elif kind == "neurons":
        n = in_dim
        step = step if -(-n_remove // step) * step < in_dim else 1
        order = greedy_path(w, bias, stats, torch.arange(in_dim)[:, None], -(-n_remove // step), step=step,
                            ridge_ratio=ridge_ratio).order
    else:
        raise ObsError(f"kind must be 'heads' or 'neurons', got '{kind}'")
    removed = set(order[:n_remove])
    return torch.tensor([c for c in range(n) if c not in removed])


def _rank_scores(path: Path, n: int) -> Tensor:
    """Return scores from a path: removal step for removed candidates, above them by final ΔE for the rest."""
    scores = torch.empty(n, dtype=torch.float32)
    scores[torch.tensor(path.order, dtype=torch.long)] = torch.arange(len(path.order), dtype=torch.float32)
    rest = torch.isfinite(path.last)
    if rest.any():
        rank = path.last[rest].argsort(stable=True).argsort().float()
        scores[rest] = len(path.order) + rank
    return scores


def layer_paths(model, grams: Mapping[tuple[int, str], GramStats], max_head_rounds: int | None = None,
                max_neuron_frac: float = 0.75, step: int = 8, ridge_ratio: float = 1e-2,
                fisher: Mapping[tuple[int, str], Tensor] | None = None,
                progress: bool = True) -> dict[int, dict[str, Path]]:
    """Return the head and neuron removal paths of every layer from one-shot Grams (`reconstruction.collect_grams`).

    Heads go up to `max_head_rounds` rounds (default: all but one head per KV group), neurons up to
    `max_neuron_frac` of the width, `step` per update. With `fisher` (`fisher.output_fisher`, same keys as the
    Grams) removal costs are measured in each target's output Fisher metric.
    """
    from pruning_utils.progress import progress as bar

    if not 0 < max_neuron_frac < 1:
        raise ObsError(f"max_neuron_frac must be in (0, 1), got {max_neuron_frac}")
    if step < 1:
        raise ObsError(f"step must be >= 1, got {step}")
    hd = head_dim(model)
    shapes = layer_shapes(model)
    out: dict[int, dict[str, Path]] = {}
    for li, layer in bar(list(enumerate(decoder_layers(model))), desc="obs paths", unit="layer", disable=not progress):
        missing = [name for name in (HEAD_INPUT, NEURON_INPUT) if (li, name) not in grams]
        if fisher is not None:
            missing += [f"{name} Fisher" for name in (HEAD_INPUT, NEURON_INPUT) if (li, name) not in fisher]
        if missing:
            raise ObsError(f"no Gram statistics for {missing} of layer {li}; collect them with "
                           "reconstruction.collect_grams(model, windows) (and fisher.output_fisher) over all layers")
        s = shapes[li]
        g = s.n_heads // s.n_kv_heads
        rounds = g - 1 if max_head_rounds is None else min(max_head_rounds, g - 1)
        o, down = proj(layer, HEAD_INPUT), proj(layer, NEURON_INPUT)
        heads, classes = head_candidates(s.n_heads, s.n_kv_heads, hd)
        metric = {name: None if fisher is None else fisher[(li, name)] for name in (HEAD_INPUT, NEURON_INPUT)}
        out[li] = {
            HEAD_INPUT: greedy_path(o.weight, o.bias, grams[(li, HEAD_INPUT)], heads, rounds, classes,
                                    ridge_ratio=ridge_ratio, metric=metric[HEAD_INPUT]),
            NEURON_INPUT: greedy_path(down.weight, down.bias, grams[(li, NEURON_INPUT)],
                                      torch.arange(s.intermediate)[:, None],
                                      int(max_neuron_frac * s.intermediate) // step,
                                      step=step, ridge_ratio=ridge_ratio, metric=metric[NEURON_INPUT]),
        }
    return out


def obs_scores(model, grams: Mapping[tuple[int, str], GramStats], ridge_ratio: float = 1e-2, step: int = 8,
               max_neuron_frac: float = 0.75, fisher: Mapping[tuple[int, str], Tensor] | None = None,
               progress: bool = True) -> Scores:
    """Return the `obs` criterion (`obs_fisher` with `fisher`): heads and neurons ranked by their step on the
    progressive removal path."""
    paths = layer_paths(model, grams, max_neuron_frac=max_neuron_frac, step=step, ridge_ratio=ridge_ratio,
                        fisher=fisher, progress=progress)
    shapes = layer_shapes(model)
    heads = [_rank_scores(paths[li][HEAD_INPUT], shapes[li].n_heads) for li in range(len(shapes))]
    neurons = [_rank_scores(paths[li][NEURON_INPUT], shapes[li].intermediate) for li in range(len(shapes))]
    return Scores(heads, neurons, "obs" if fisher is None else "obs_fisher", {
        "obs_ridge_ratio": ridge_ratio, "obs_step": step, "obs_max_neuron_frac": max_neuron_frac,
        "head_errors": [paths[li][HEAD_INPUT].errors for li in range(len(shapes))],
        "neuron_errors": [paths[li][NEURON_INPUT].errors for li in range(len(shapes))]})
