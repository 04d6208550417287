"""Importance of encoder heads / neurons on a classification task, uniform plans, and the lstsq refit.

One registry `ENCODER_CRITERIA` (same signature, `Scores` as the decoder criteria return). Statistics are streamed
over the non-padding tokens of calibration batches; criteria that need a loss use the classification loss, and
`semantic` scores a head by the KL divergence of the predicted class distribution when that head alone is masked
(neurons: the Taylor estimate of the same loss). The refit is `reconstruction.reconstruct_linear` (lstsq, ridge),
applied layer by layer on the already refit earlier layers (SparseGPT-style sequential calibration).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from pruning_utils.encoder import surgery
from pruning_utils.encoder.arch import (
    ENCODER_HEAD_INPUT,
    ENCODER_NEURON_INPUT,
    encoder_arch_of,
    encoder_head_dim,
    encoder_layer_shapes,
    encoder_layers,
    encoder_owned_sums,
    encoder_proj,
)
from pruning_utils.encoder.tasks import batches, inputs_only
from pruning_utils.model.hooks import hooks
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramStats, Moments
from pruning_utils.prune.reconstruction import refit_in_place
from pruning_utils.prune.scores import Scores


@contextmanager
def token_inputs(modules: dict, fn: Callable[[object, Tensor], None]) -> Iterator[dict]:
    """Call `fn(key, x)` with each module's input at non-padding tokens [n_tokens, in]; set `cell['mask']` per batch."""
    cell: dict = {"mask": None}

    def hook(key):
        def pre(mod, args):
            x = args[0]
            m = cell["mask"]
            fn(key, x[m.bool()] if m is not None else x.reshape(-1, x.shape[-1]))
        return pre

    with hooks(*[(m, "pre", hook(k)) for k, m in modules.items()]):
        yield cell


def _forward_all(model, tokenizer, df: pd.DataFrame, batch_size: int, max_length: int,
                 cell: dict | None = None) -> None:
    with torch.no_grad():
        for batch in batches(tokenizer, df, batch_size, max_length):
            if cell is not None:
                cell["mask"] = batch["attention_mask"]
            model(**inputs_only(batch))


def _moments(model, tokenizer, df, batch_size, max_length) -> dict:
    layers = encoder_layers(model)
    modules = {(li, n): encoder_proj(layer, n) for li, layer in enumerate(layers)
               for n in (ENCODER_HEAD_INPUT, ENCODER_NEURON_INPUT)}
    stats = {k: Moments(m.in_features, m.weight.device) for k, m in modules.items()}
    with token_inputs(modules, lambda k, x: stats[k].add(x[None])) as cell:
        _forward_all(model, tokenizer, df, batch_size, max_length, cell)
    return stats


def _from_channels(model, stats: dict, channel: Callable[[Moments, Tensor], Tensor], name: str) -> Scores:
    hd = encoder_head_dim(model)
    heads, neurons = [], []
    for li, layer in enumerate(encoder_layers(model)):
        o, d = encoder_proj(layer, ENCODER_HEAD_INPUT), encoder_proj(layer, ENCODER_NEURON_INPUT)
        heads.append(channel(stats[(li, ENCODER_HEAD_INPUT)], o.weight).view(-1, hd).sum(1))
        neurons.append(channel(stats[(li, ENCODER_NEURON_INPUT)], d.weight))
    return Scores(heads, neurons, name)


def _col_norm(w: Tensor) -> Tensor:
    return w.detach().float().norm(dim=0).cpu()


# ----------------------------------------------------------------------------------------------- criteria


def random(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return uniform random scores (seeded): the baseline a criterion must beat."""
    g = torch.Generator().manual_seed(seed)
    shapes = encoder_layer_shapes(model)
    return Scores([torch.rand(s.n_heads, generator=g) for s in shapes],
                  [torch.rand(s.intermediate, generator=g) for s in shapes], "random", {"seed": seed})


def magnitude(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return the L1 norm of the weights each head (Q, K, V rows + biases, output columns) / neuron owns."""
    hd = encoder_head_dim(model)
    with torch.no_grad():
        sums = [encoder_owned_sums(layer, hd, torch.abs) for layer in encoder_layers(model)]
    return Scores([h.cpu() for h, _ in sums], [n.cpu() for _, n in sums], "magnitude")


def activation(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return Wanda-style scores ||X_j||_2 x ||W[:, j]||_2 at the attention-output / output inputs (heads: summed)."""
    stats = _moments(model, tokenizer, df, batch_size, max_length)
    return _from_channels(model, stats, lambda m, w: m.sq_norm().sqrt() * _col_norm(w), "activation")


def fluctuation(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return FLAP scores: variance of input channel j over tokens x ||W[:, j]||^2
    (heads: summed over their channels)."""
    stats = _moments(model, tokenizer, df, batch_size, max_length)
    return _from_channels(model, stats, lambda m, w: m.variance() * _col_norm(w) ** 2, "fluctuation")


def taylor(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return |sum of w * dL/dw| over the weights a head / neuron owns, L the classification loss over `df`."""
    model.zero_grad(set_to_none=True)
    for batch in batches(tokenizer, df, batch_size, max_length):
        (model(**batch).loss * len(batch["labels"]) / len(df)).backward()
    hd = encoder_head_dim(model)
    with torch.no_grad():
        sums = [encoder_owned_sums(layer, hd, lambda p: p * p.grad) for layer in encoder_layers(model)]
    model.zero_grad(set_to_none=True)
    return Scores([h.abs().cpu() for h, _ in sums], [n.abs().cpu() for _, n in sums], "taylor")


def semantic(model, tokenizer, df, batch_size=32, max_length=64, seed=0) -> Scores:
    """Return heads: mean KL(full || head masked) of the predicted class distribution; neurons: Taylor scores."""
    encoded = list(batches(tokenizer, df, batch_size, max_length))

    def log_probs() -> list[Tensor]:
        with torch.no_grad():
            return [F.log_softmax(model(**inputs_only(b)).logits.float(), -1) for b in encoded]

    full = log_probs()
    heads = []
    for li, s in enumerate(encoder_layer_shapes(model)):
        per = torch.zeros(s.n_heads)
        for h in range(s.n_heads):
            with surgery.masked(model, heads={li: [h]}):
                ablated = log_probs()
            per[h] = sum(F.kl_div(a, f, log_target=True, reduction="sum") for f, a in zip(full, ablated)) / len(df)
        heads.append(per)
    neurons = taylor(model, tokenizer, df, batch_size, max_length, seed).neurons
    return Scores(heads, neurons, "semantic",
                  {"heads": "KL of class distribution, one head masked", "neurons": "taylor"})


ENCODER_CRITERIA: dict[str, Callable[..., Scores]] = {
    "random": random, "magnitude": magnitude, "activation": activation, "fluctuation": fluctuation,
    "taylor": taylor, "semantic": semantic,
}


def encoder_importance(model, tokenizer, df: pd.DataFrame, criterion: str, batch_size: int = 32,
                       max_length: int = 64, seed: int = 0) -> Scores:
    """Return the scores of the named criterion over the calibration frame `df` (higher = more important)."""
    encoder_arch_of(model)
    if criterion not in ENCODER_CRITERIA:
        raise ValueError(f"unknown encoder criterion '{criterion}'; known: {', '.join(ENCODER_CRITERIA)}")
    was = model.training
    model.eval()
    try:
        scores = ENCODER_CRITERIA[criterion](model, tokenizer, df, batch_size, max_length, seed)
    finally:
        model.train(was)
    scores.provenance = {"examples": len(df), "max_length": max_length, "seed": seed, **scores.provenance}
    return scores


# ------------------------------------------------------------------------------------------ plans and refits


def _top(x: Tensor, n_keep: int) -> list[int]:
    return sorted(torch.argsort(x.float(), descending=True, stable=True)[:n_keep].tolist())


def uniform_plan(model, scores: Scores, head_rate: float = 0.0, mlp_rate: float = 0.0) -> PruningPlan:
    """Return a plan removing round(rate x n) of the lowest-scored heads and neurons in every layer (stock-shaped)."""
    for name, r in (("head_rate", head_rate), ("mlp_rate", mlp_rate)):
        if not 0 <= r < 1:
            raise ValueError(f"{name}={r} must be in [0, 1): the fraction removed in every layer")
    plan = surgery.identity_plan(model)
    for li, s in enumerate(encoder_layer_shapes(model)):
        n_h, n_m = s.n_heads - round(head_rate * s.n_heads), s.intermediate - round(mlp_rate * s.intermediate)
        if n_h < s.n_heads:
            plan.heads[li] = _top(scores.heads[li], max(1, n_h))
        if n_m < s.intermediate:
            plan.neurons[li] = _top(scores.neurons[li], max(1, n_m))
    plan.criterion, plan.allocation, plan.head_rate, plan.mlp_rate = scores.criterion, "uniform", head_rate, mlp_rate
    return plan


def prune_and_reconstruct(model, plan: PruningPlan, tokenizer, df: pd.DataFrame | None, mode: str = "lstsq",
                          batch_size: int = 32, max_length: int = 64, ridge_ratio: float = 1e-2):
    """Refit each pruned attention-output / output dense on calibration tokens, layer by layer, then cut; returns model.

    Removed channels are zeroed first in the full-shape layer (the function the pruned model computes), so each
    Gram sees the earlier layers as they will be after surgery. `mode='none'` only cuts.
    """
    hd = encoder_head_dim(model)
    if mode != "none":
        if df is None:
            raise ValueError(f"reconstruction mode '{mode}' needs calibration examples; pass df or use mode='none'")
        layers = encoder_layers(model)
        for li in sorted(set(plan.heads) | set(plan.neurons)):
            targets = []
            if li in plan.heads:
                keep = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in plan.kept_heads(li)])
                targets.append((ENCODER_HEAD_INPUT, keep))
            if li in plan.neurons:
                targets.append((ENCODER_NEURON_INPUT, torch.tensor(plan.kept_neurons(li))))
            for name, keep in targets:  # attention output first: the output dense's inputs depend on it
                module = encoder_proj(layers[li], name)
                gram = GramStats.empty(module.in_features)
                with token_inputs({name: module}, lambda k, x: gram.add(x)) as cell:
                    _forward_all(model, tokenizer, df, batch_size, max_length, cell)
                refit_in_place(module, keep, gram, mode, ridge_ratio)
    return surgery.apply_plan(model, plan)
