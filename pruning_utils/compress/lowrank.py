"""Low-rank factorisation: a Linear W [out, in] becomes Linear(in, r, no bias) then Linear(r, out, W's bias).

The factors come from a truncated SVD of W·T, T a per-input scaling undone in the first factor (W ≈ B A,
A = Σ½ Vᵀ T⁻¹, B = U Σ½):
- `plain`: T = I, the best rank-r approximation of W itself;
- `asvd` (ASVD): T = diag(‖X_j‖), the RMS of input channel j over calibration tokens, so channels that carry
  large activations are approximated best;
- `whiten` (SVD-LLM): T with T Tᵀ = G, the input second moment E[x xᵀ] (SVD-LLM takes its Cholesky factor), which
  makes the truncation minimise the output error E‖(W − B A) x‖² exactly.
Statistics are streamed Grams (`stats.GramStats`), one layer at a time (`layer_grams`). The rank is given, derived
from a parameter budget (`rank_for_params`), or read off the spectrum by a rule of `RANK_RULES` (`choose_rank`):
`rmt` (`edge_rank`: singular values above the Marchenko–Pastur bulk edge of a noise fit), `gavish_donoho` (their
optimal hard threshold for unknown noise) or `energy` (the fraction of Σ s² kept), each with a `k_min` floor.

A factorised projection is a `LowRankLinear` (an `nn.Sequential` that still reports in/out features, so shape
readers keep working); it is not loadable by a stock config: evaluate it in memory, or save its state dict.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from pruning_utils.model.arch import PROJECTIONS, decoder_layers, proj, set_proj
from pruning_utils.model.calibration import run_layer, walk_layers
from pruning_utils.model.linears import LowRankLinear
from pruning_utils.model.stats import GramCollector, GramStats


def check_rank(rank: int, out_features: int, in_features: int) -> int:
    """Return `rank` as an int, or raise naming the valid range for a [out, in] matrix."""
    full = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is invalid for a {out_features}x{in_features} matrix: choose an integer in "
                         f"[1, {full}] (full rank {full}; "
                         f"above {out_features * in_features // (out_features + in_features)}"
                         " the two factors hold more parameters than the matrix)")
    return int(rank)


def rank_for_params(out_features: int, in_features: int, target_params: int) -> int:
    """Return the largest rank whose two factors hold at most `target_params` weights (at least 1, at most full)."""
    if target_params <= 0:
        raise ValueError(f"target_params={target_params} must be positive: the weights the two factors may hold")
    return max(1, min(min(out_features, in_features), int(target_params) // (out_features + in_features)))


def _mp_median(beta: float) -> float:
    """Return the median of the Marchenko–Pastur law of aspect ratio beta <= 1 (eigenvalues of X Xᵀ / n, unit noise)."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    x = np.linspace(lo, hi, 20001)
    dens = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * beta * np.maximum(x, 1e-12))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    return float(np.interp(0.5 * cdf[-1], cdf, x))


def noise_sigma(singular_values: Tensor, shape: tuple[int, int]) -> float:
    """Return the noise level σ of an m x n matrix from its median singular value (Gavish–Donoho)."""
    m, n = sorted(shape)
    return float(singular_values.median()) / math.sqrt(n * _mp_median(m / n))


def edge_rank(singular_values: Tensor, shape: tuple[int, int]) -> int:
    """Return how many singular values of an m x n matrix exceed the bulk edge σ(√m + √n) (clamped to [1, full])."""
    edge = noise_sigma(singular_values, shape) * (math.sqrt(shape[0]) + math.sqrt(shape[1]))
    return max(1, min(int((singular_values > edge).sum()), singular_values.numel()))


def rmt_rank(weight: Tensor) -> int:
    """Return the number of singular values above the Marchenko–Pastur bulk edge of a noise fit (at least 1)."""
    return edge_rank(torch.linalg.svdvals(weight.detach().double().cpu()), tuple(weight.shape))


def _values(singular_values) -> Tensor:
    """Return singular values (a tensor, array or list) as a 1-D float64 CPU tensor."""
    s = (singular_values.detach().double().cpu() if isinstance(singular_values, Tensor)
         else torch.as_tensor(np.asarray(singular_values, dtype=np.float64)))
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"singular values must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
    return s


def energy_rank(singular_values, threshold: float = 0.995) -> int:
    """Return the smallest r whose top-r singular values hold `threshold` of Σ s² (at least 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise ValueError(f"energy threshold {threshold} is invalid: choose a fraction in (0, 1] of Σ s² to keep "
                         "(1.0 keeps the full numerical rank)")
    s = _values(singular_values).sort(descending=True).values
    cum = (s * s).cumsum(0)
    # cum is non-decreasing, so the values still short of the target are a prefix; the rank is one past it
    return max(1, min(int((cum < threshold * cum[-1]).sum()) + 1, s.numel()))


def gd_omega(beta: float) -> float:
    """Return Gavish & Donoho's (2014) published fit of ω(β), the hard threshold over the median singular value."""
    return 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43


def gavish_donoho_rank(singular_values, shape: tuple[int, int]) -> int:
    """Return how many singular values of an m x n matrix exceed ω(β)·median(s), β = min/max (at least 1).

    The optimal hard threshold for unknown noise (Gavish & Donoho 2014); `singular_values` must be all min(m, n)
    of them, since the noise level is read off their median.
    """
    s = _values(singular_values)
    m, n = sorted(int(d) for d in shape)
    tau = gd_omega(m / n) * float(np.median(s.numpy()))  # numpy's median averages the middle pair, as theirs does
    return max(1, min(int((s > tau).sum()), s.numel()))


def apply_k_min(rank: int, k_min: int, full: int) -> int:
    """Return `rank` raised to at least `k_min`, or raise when `k_min` is not in [1, full]."""
    if isinstance(k_min, bool) or not isinstance(k_min, numbers.Integral) or not 1 <= k_min <= full:
        raise ValueError(f"k_min={k_min} is invalid: choose an integer in [1, {full}] (the full rank)")
    return max(int(rank), int(k_min))


def _rule_energy(s: Tensor, shape: tuple[int, int], threshold: float) -> int:
    return energy_rank(s, threshold)


def _rule_gavish_donoho(s: Tensor, shape: tuple[int, int], threshold: float) -> int:
    return gavish_donoho_rank(s, shape)


def _rule_rmt(s: Tensor, shape: tuple[int, int], threshold: float) -> int:
    return edge_rank(s, shape)


RANK_RULES: dict[str, Callable[[Tensor, tuple[int, int], float], int]] = {
    "energy": _rule_energy, "gavish_donoho": _rule_gavish_donoho, "gd": _rule_gavish_donoho, "rmt": _rule_rmt,
}


def choose_rank(weight_or_singular_values, rule: str, shape: tuple[int, int] | None = None,
                threshold: float = 0.995, k_min: int = 1) -> int:
    """Return the rank a rule of `RANK_RULES` reads off a matrix (or its singular values), at least `k_min`.

    A 2-D input is the matrix itself (`shape`, if given, must match); a 1-D input is all min(m, n) singular values of an
    m x n matrix, and needs `shape`. `threshold` is the energy rule's fraction of Σ s².
    """
    if rule not in RANK_RULES:
        raise ValueError(f"unknown rank rule '{rule}'; known: {', '.join(RANK_RULES)}")
    x = weight_or_singular_values
    x = x.detach().double().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    if x.ndim == 2:
        if shape is not None and tuple(shape) != tuple(x.shape):
            raise ValueError(f"shape {tuple(shape)} does not match the matrix's shape {tuple(x.shape)}")
        shape, s = tuple(x.shape), torch.linalg.svdvals(x)
    elif x.ndim == 1:
        if shape is None:
            raise ValueError("singular values alone need the matrix's shape (m, n): pass shape=")
        shape, s = (int(shape[0]), int(shape[1])), _values(x)
        if s.numel() != min(shape):
            raise ValueError(f"got {s.numel()} singular values for a {shape[0]}x{shape[1]} matrix: give all "
                             f"{min(shape)} (the noise rules read their median)")
    else:
        raise ValueError(f"give a matrix [out, in] or its singular values, got a {x.ndim}-D input")
    full = min(shape)
    apply_k_min(1, k_min, full)  # a bad k_min fails before the rule runs
    return apply_k_min(RANK_RULES[rule](s, shape, threshold), k_min, full)


# ------------------------------------------------------------------------------------------ input scalings


def _second_moment(gram: GramStats) -> Tensor:
    return gram.gram / max(gram.count, 1)


def _plain(gram: GramStats | None, n: int) -> tuple[Tensor, Tensor]:
    eye = torch.eye(n, dtype=torch.float64)
    return eye, eye


def _asvd(gram: GramStats | None, n: int) -> tuple[Tensor, Tensor]:
    rms = _second_moment(_need(gram, "asvd")).diagonal().sqrt().cpu()
    rms = rms.clamp(min=1e-8 * float(rms.max().clamp(min=1e-30)))  # a dead channel must stay invertible
    return torch.diag(rms), torch.diag(1 / rms)


def _whiten(gram: GramStats | None, n: int, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    g = _second_moment(_need(gram, "whiten")).cpu()
    # any T with T Tᵀ = G whitens; the eigen form (not SVD-LLM's Cholesky) survives Grams that are rank-deficient
    # (fewer tokens than channels) or a rounding away from positive definite, with eigenvalues floored by `ridge`
    vals, vecs = torch.linalg.eigh((g + g.T) / 2)
    vals = vals.clamp(min=ridge * float(vals.clamp(min=0).mean().clamp(min=1e-30)))
    return vecs * vals.sqrt(), (vecs / vals.sqrt()).T


def _need(gram: GramStats | None, method: str) -> GramStats:
    if gram is None:
        raise ValueError(f"method '{method}' is activation-aware: give the layer's input GramStats "
                         "(lowrank.layer_grams), or use method='plain'")
    return gram


SCALINGS: dict[str, Callable[[GramStats | None, int], tuple[Tensor, Tensor]]] = {
    "plain": _plain, "asvd": _asvd, "whiten": _whiten,
}


def svd_factors(weight: Tensor, rank: int | str, method: str = "plain", gram: GramStats | None = None
                ) -> tuple[Tensor, Tensor]:
    """Return `(A [r, in], B [out, r])` with W ≈ B A, truncated in the metric of `method` (see `SCALINGS`).

    A rank rule of `RANK_RULES` ("rmt", "energy" at its default threshold, "gd") is read off W's own spectrum
    (for `plain`, from the same SVD: one SVD per matrix).
    """
    if method not in SCALINGS:
        raise ValueError(f"unknown low-rank method '{method}'; known: {', '.join(SCALINGS)}")
    rule = rank if isinstance(rank, str) and rank in RANK_RULES else None
    if rule is None:
        rank = check_rank(rank, *weight.shape)
    elif method != "plain":
        rank = choose_rank(weight, rule)  # the noise models hold for W, not for W·T
    t, t_inv = SCALINGS[method](gram, weight.shape[1])
    u, s, vh = torch.linalg.svd(weight.detach().double().cpu() @ t, full_matrices=False)
    if rule is not None and method == "plain":
        rank = choose_rank(s, rule, tuple(weight.shape))
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]) @ t_inv  # undo the scaling in the first factor
    b = u[:, :rank] * root
    return a, b


def factorize(linear: nn.Linear, rank: int | str, method: str = "plain", gram: GramStats | None = None
              ) -> LowRankLinear:
    """Return a `LowRankLinear` of the given rank (or a rule of `RANK_RULES`) approximating `linear` (bias kept)."""
    a, b = svd_factors(linear.weight, rank, method, gram)
    w = linear.weight
    first = nn.Linear(a.shape[1], a.shape[0], bias=False, device=w.device, dtype=w.dtype)
    second = nn.Linear(b.shape[1], b.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return LowRankLinear(first, second)


def layer_grams(model, windows: Tensor, layers: Iterable[int], projections: Iterable[str], batch_size: int = 4
                ) -> Iterator[tuple[int, nn.Module, dict[str, GramStats]]]:
    """Yield `(index, layer, {projection: GramStats of its input})` for the chosen layers, walking the model in order.

    A caller that replaces the layer's projections in the loop body feeds the changed layer's outputs on
    (`calibration.walk_layers`), so later layers' statistics see the earlier compression (sequential, as
    SparseGPT); statistics memory is one layer's worth.
    """
    chosen, projections = sorted(set(int(i) for i in layers)), list(projections)
    if not chosen:
        return
    for li, layer, hidden, calls in walk_layers(model, windows, batch_size, last=chosen[-1]):
        if li in chosen:
            with torch.no_grad(), GramCollector({name: proj(layer, name) for name in projections}) as col:
                for h, call in zip(hidden, calls):
                    run_layer(layer, h, call)
            yield li, layer, col.stats


def lowrank_model(model, projections: Iterable[str] = PROJECTIONS, layers: Iterable[int] | None = None,
                  rank: int | str | None = None, param_ratio: float | None = None, method: str = "plain",
                  windows: Tensor | None = None, batch_size: int = 4) -> dict[tuple[int, str], int]:
    """Factorise the chosen projections in place and return the rank given to each `(layer, projection)`.

    Give exactly one of `rank` (an int, or "rmt" for `rmt_rank`) and `param_ratio` (the fraction of a matrix's
    weights its factors may hold). `asvd` / `whiten` need calibration `windows`; their Grams are taken layer by
    layer on the inputs the already-factorised earlier layers produce (`layer_grams`).
    """
    if (rank is None) == (param_ratio is None):
        raise ValueError("give exactly one of rank (an int or 'rmt') or param_ratio (fraction of weights kept)")
    if isinstance(rank, str) and rank != "rmt":
        raise ValueError(f"rank '{rank}' is not a rank rule; give an int or 'rmt'")
    if param_ratio is not None and not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio={param_ratio} must be in (0, 1]: the fraction of each matrix's weights kept")
    if method not in SCALINGS:
        raise ValueError(f"unknown low-rank method '{method}'; known: {', '.join(SCALINGS)}")
    all_layers = decoder_layers(model)
    chosen = list(range(len(all_layers))) if layers is None else [int(i) for i in layers]
    projections = list(projections)
    if isinstance(rank, numbers.Integral) or (rank is not None and rank != "rmt"):
        for li in chosen:  # every rank is checked before any projection changes: a bad rank leaves the model intact
            for name in projections:
                lin = proj(all_layers[li], name)
                check_rank(rank, lin.out_features, lin.in_features)
    if method == "plain":
        walk = ((li, all_layers[li], {}) for li in chosen)
    elif windows is None:
        raise ValueError(f"method '{method}' is activation-aware: it needs calibration windows [n, seq_len]")
    else:
        walk = layer_grams(model, windows, chosen, projections, batch_size)
    ranks = {}
    for li, layer, grams in walk:
        for name in projections:
            lin = proj(layer, name)
            if param_ratio is not None:
                r = rank_for_params(lin.out_features, lin.in_features, int(param_ratio * lin.weight.numel()))
            else:
                r = rank if rank == "rmt" else check_rank(rank, lin.out_features, lin.in_features)
            low = factorize(lin, r, method, grams.get(name))
            set_proj(layer, name, low)
            ranks[(li, name)] = low.rank
    return ranks
