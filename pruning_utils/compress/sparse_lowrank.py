"""Sparse + low-rank: Wanda unstructured or 2:4 sparsity, plus a low-rank fit of what the sparsity removed.

Wanda scores weight (i, j) by |W_ij| · ‖X_j‖ (the input channel's norm over calibration tokens) and removes the
lowest-scored fraction of every output row; 2:4 keeps the 2 best of every 4 consecutive inputs of a row. The
residual R = W − W_sparse is then approximated by U Vᵀ of rank r (a truncated SVD, optionally whitened by the
input Gram as in `lowrank`), as LS-PRISM-style sparse-plus-low-rank methods do, so a `SparseLowRankLinear`
computes W_sparse x + U (Vᵀ x) + b.

That is the `residual` form, which adds the factors' parameters to the sparse weight. The `svd` form (Wanda+SVD)
instead replaces W·keep by its truncated SVD, a `LowRankLinear` of the rank `lowrank` gives it (a rank, or the
fraction of the matrix's weights the factors may hold), so a checkpoint reloads as `lowrank`'s do.

The zeros are stored densely: on dense kernels unstructured sparsity saves neither time nor memory (it only
shows what the sparsity costs in quality); 2:4 runs faster only on kernels that support it (e.g. Ampere+
sparse tensor cores via `torch.sparse.to_sparse_semi_structured`), which this module does not use.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from pruning_utils.compress.lowrank import check_rank, layer_grams, lowrank_model, svd_factors
from pruning_utils.model.arch import PROJECTIONS, decoder_layers, proj, set_proj
from pruning_utils.model.linears import SparseLowRankLinear
from pruning_utils.model.stats import GramStats


def channel_norms(gram: GramStats) -> Tensor:
    """Return ‖X_j‖₂ over the calibration tokens of every input channel (the square root of the Gram's diagonal)."""
    return gram.gram.diagonal().clamp(min=0).sqrt().float().cpu()


def wanda_mask(weight: Tensor, norms: Tensor, sparsity: float) -> Tensor:
    """Return the keep-mask removing, in every output row, the `sparsity` fraction of lowest |W_ij| · ‖X_j‖."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of each row's weights removed")
    score = weight.detach().abs().float().cpu() * norms[None, :]
    n_drop = int(weight.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        keep.scatter_(1, score.argsort(dim=1)[:, :n_drop], False)
    return keep


def nm_mask(weight: Tensor, norms: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Return the N:M keep-mask (default 2:4): the `n` best |W_ij| · ‖X_j‖ of every `m` consecutive inputs of a row."""
    if weight.shape[1] % m or not 0 < n <= m:
        raise ValueError(f"{n}:{m} sparsity needs 0 < n <= m and an input width divisible by m, got {weight.shape[1]}")
    score = (weight.detach().abs().float().cpu() * norms[None, :]).view(weight.shape[0], -1, m)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(2, score.topk(n, dim=2).indices, True)
    return keep.view_as(weight)


def sparse_lowrank(linear: nn.Linear, keep: Tensor, rank: int, gram: GramStats | None = None,
                   method: str = "plain") -> SparseLowRankLinear:
    """Return W·keep plus a rank-`rank` SVD of the residual W·(1 − keep) (`method`: plain, or whiten with `gram`)."""
    w = linear.weight.detach()
    sparse = w * keep.to(w.device, w.dtype)
    if rank:
        check_rank(rank, *w.shape)
        a, b = svd_factors(w - sparse, rank, method, gram)  # residual ≈ b a
        u, v = b.to(w.dtype), a.T.to(w.dtype)
    else:
        u, v = w.new_zeros(w.shape[0], 0), w.new_zeros(w.shape[1], 0)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return SparseLowRankLinear(sparse.clone(), bias, u.to(w.device), v.to(w.device))


HYBRID_FORMS = ("residual", "svd")


def hybrid_model(model, windows: Tensor, sparsity: float | str = 0.5, rank: int | None = None,
                 projections: Iterable[str] = PROJECTIONS, layers: Iterable[int] | None = None,
                 method: str = "plain", batch_size: int = 4, form: str = "residual",
                 param_ratio: float | None = None) -> dict[tuple[int, str], float]:
    """Sparsify the chosen projections (of every layer, or of `layers`) in place (Wanda `sparsity` in [0, 1), or "2:4")
    and return the achieved sparsity of each `(layer, projection)`.

    `form` (`HYBRID_FORMS`): `residual` keeps W·keep plus a rank-`rank` SVD of the residual (none when `rank` is
    None or 0; `method`: plain, or whiten); `svd` replaces W·keep by its plain truncated SVD of rank `rank`, or of the
    rank `lowrank.lowrank_model` gives `param_ratio` (give one of the two). Statistics are taken layer by layer on
    the inputs the already-compressed earlier layers produce (`lowrank.layer_grams`; Wanda's paper takes them
    one-shot).
    """
    if form not in HYBRID_FORMS:
        raise ValueError(f"unknown hybrid form '{form}'; known: {', '.join(HYBRID_FORMS)}")
    if isinstance(sparsity, str) and sparsity != "2:4":
        raise ValueError(f"sparsity '{sparsity}' is not a pattern; give a fraction in [0, 1) or '2:4'")
    projections = list(projections)
    chosen = range(len(decoder_layers(model))) if layers is None else [int(i) for i in layers]
    if form == "residual":
        if param_ratio is not None:
            raise ValueError("param_ratio sizes the factors of form 'svd'; form 'residual' takes rank (of its "
                             "residual SVD)")
        if rank is not None and rank < 0:
            raise ValueError(f"rank={rank} must be >= 0 (0: no low-rank correction)")
    else:
        if (rank is None) == (param_ratio is None):
            raise ValueError("form 'svd' needs exactly one of rank (of the factors) or param_ratio (the fraction of "
                             "each matrix's weights they may hold)")
        if method != "plain":
            raise ValueError(f"method '{method}' whitens the residual of form 'residual'; form 'svd' takes the plain "
                             "SVD of the pruned weight")
        if param_ratio is not None and not 0 < param_ratio <= 1:
            raise ValueError(f"param_ratio={param_ratio} must be in (0, 1]: the fraction of each matrix's weights kept")
        all_layers = decoder_layers(model)
        if rank is not None:  # a bad rank fails before any projection changes
            for lin in (proj(all_layers[li], name) for li in chosen for name in projections):
                check_rank(rank, lin.out_features, lin.in_features)
    achieved = {}
    for li, layer, grams in layer_grams(model, windows, chosen, projections, batch_size):
        for name in projections:
            lin, gram = proj(layer, name), grams[name]
            norms = channel_norms(gram)
            keep = nm_mask(lin.weight, norms) if sparsity == "2:4" else wanda_mask(lin.weight, norms, sparsity)
            achieved[(li, name)] = 1 - float(keep.float().mean())
            if form == "residual":
                set_proj(layer, name, sparse_lowrank(lin, keep, rank or 0, gram, method))
            else:
                with torch.no_grad():  # Wanda-pruned in place, then factorised below
                    lin.weight.mul_(keep.to(lin.weight.device, lin.weight.dtype))
        if form == "svd":  # the pruned weights' truncated SVD, at the ranks the low-rank method gives them
            lowrank_model(model, projections, [li], rank=rank, param_ratio=param_ratio)
    return achieved
