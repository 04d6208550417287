"""Encoder classifiers (BERT family): head / neuron / layer surgery, masking, low-rank and INT8.

The decoder modules' contract holds here too: a pruned model's logits equal those of the unpruned model with the
same parts masked (`masked`) to 1e-5 in fp32. What differs is what a head owns: its `head_dim` rows of query, key
and value (and biases) and its columns of the attention output dense (there is no GQA); a neuron owns one row of
intermediate.dense and one column of output.dense. Module paths come from `encoder.arch` (`ENCODER_PATHS`, `ENCODERS`).
Checkpoints: `encoder.checkpoint`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from pruning_utils.encoder.arch import (
    ENCODER_HEAD_INPUT,
    ENCODER_NEURON_INPUT,
    encoder_arch_of,
    encoder_head_dim,
    encoder_layer_shapes,
    encoder_layers,
    encoder_proj,
    set_encoder_heads,
    set_encoder_layers,
    set_encoder_proj,
)
from pruning_utils.model.hooks import bypass_output, channel_mask, hooks
from pruning_utils.model.plan import PlanMismatchError, PruningPlan
from pruning_utils.model.surgery import SurgeryError, sliced_linear

# ---------------------------------------------------------------------------------------------------- surgery


def _check_kept(keep: list[int], n: int, what: str, layer: int) -> list[int]:
    keep = sorted(int(i) for i in keep)
    if not keep:
        raise SurgeryError(f"layer {layer}: every {what} would be removed; keep at least one or drop the layer")
    if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
        raise SurgeryError(f"layer {layer}: kept {what}s must be distinct indices in [0, {n})")
    return keep


def prune_heads(model, kept: dict[int, list[int]]):
    """Keep only the given heads per layer (query / key / value rows, attention-output columns); returns model."""
    hd = encoder_head_dim(model)
    layers = encoder_layers(model)
    for li, keep in kept.items():
        layer = layers[li]
        n = encoder_proj(layer, "query").out_features // hd
        keep = _check_kept(keep, n, "head", li)
        if len(keep) == n:
            continue
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
        for name in ("query", "key", "value"):
            set_encoder_proj(layer, name, sliced_linear(encoder_proj(layer, name), rows=rows))
        set_encoder_proj(layer, "attn_out", sliced_linear(encoder_proj(layer, "attn_out"), cols=rows))
        set_encoder_heads(layer, len(keep), hd)
    return model


def prune_neurons(model, kept: dict[int, list[int]]):
    """Keep only the given intermediate neurons per layer (intermediate rows, output columns); returns model."""
    layers = encoder_layers(model)
    for li, keep in kept.items():
        layer = layers[li]
        width = encoder_proj(layer, "intermediate").out_features
        keep = _check_kept(keep, width, "neuron", li)
        if len(keep) == width:
            continue
        idx = torch.tensor(keep)
        set_encoder_proj(layer, "intermediate", sliced_linear(encoder_proj(layer, "intermediate"), rows=idx))
        set_encoder_proj(layer, "output", sliced_linear(encoder_proj(layer, "output"), cols=idx))
    _sync_config(model)
    return model


def drop_layers(model, kept_layers: list[int]):
    """Keep only the given encoder layers; returns model."""
    layers = encoder_layers(model)
    kept_layers = sorted(int(i) for i in kept_layers)
    if not kept_layers:
        raise SurgeryError("cannot drop every encoder layer; keep at least one")
    if len(set(kept_layers)) != len(kept_layers) or kept_layers[0] < 0 or kept_layers[-1] >= len(layers):
        raise SurgeryError(f"kept layers must be distinct indices in [0, {len(layers)})")
    set_encoder_layers(model, nn.ModuleList([layers[i] for i in kept_layers]))
    model.config.num_hidden_layers = len(kept_layers)
    _sync_config(model)
    return model


def _sync_config(model) -> None:
    """Write a uniform intermediate width into the config (head counts stay: BERT derives head size from them)."""
    widths = {s.intermediate for s in encoder_layer_shapes(model)}
    if len(widths) == 1:
        model.config.intermediate_size = widths.pop()


def apply_plan(model, plan: PruningPlan):
    """Apply a plan in place (heads, neurons, then layers) after checking it fits the model; returns the model."""
    plan.validate()
    shapes = encoder_layer_shapes(model)
    if ([s.n_heads for s in shapes] != list(plan.base_heads)
            or [s.intermediate for s in shapes] != list(plan.base_intermediate)):
        raise PlanMismatchError(f"the plan was made for an encoder with heads {plan.base_heads} and widths "
                                f"{plan.base_intermediate}, this one has {[s.n_heads for s in shapes]} and "
                                f"{[s.intermediate for s in shapes]}; recompute the plan on this model")
    from pruning_utils.model.surgery import apply_removals
    return apply_removals(model, plan, prune_heads, prune_neurons, drop_layers)


def identity_plan(model) -> PruningPlan:
    """Return the plan that keeps everything of an encoder (the base of `uniform_plan`)."""
    encoder_arch_of(model)
    return PruningPlan.identity(encoder_layer_shapes(model), getattr(model.config, "name_or_path", ""))


@contextmanager
def masked(model, heads: dict[int, Iterable[int]] | None = None, neurons: dict[int, Iterable[int]] | None = None,
           layers: Iterable[int] | None = None) -> Iterator[None]:
    """Zero the given heads' (attention-output input channels) and neurons' outputs and bypass the given layers."""
    specs = []
    layer_list = encoder_layers(model)
    hd = encoder_head_dim(model)

    def zero(mask):
        return lambda mod, args: (args[0] * mask,) + tuple(args[1:])

    for li, removed in (heads or {}).items():
        o = encoder_proj(layer_list[li], ENCODER_HEAD_INPUT)
        specs.append((o, "pre", zero(channel_mask(o.in_features // hd, removed, hd, o.weight))))
    for li, removed in (neurons or {}).items():
        down = encoder_proj(layer_list[li], ENCODER_NEURON_INPUT)
        specs.append((down, "pre", zero(channel_mask(down.in_features, removed, 1, down.weight))))
    for li in layers or ():
        specs.append((layer_list[li], "forward_kw", bypass_output))
    with hooks(*specs):
        yield


# --------------------------------------------------------------------------------------- low-rank and INT8


def lowrank_encoder(model, param_ratio: float | None = None, rank: int | str | None = None,
                    projections: Iterable[str] = ("query", "key", "value", "attn_out", "intermediate", "output")
                    ) -> dict[tuple[int, str], int]:
    """Factorise the chosen projections in place (plain SVD, shared `lowrank.factorize`); returns the ranks given.

    Give one of `param_ratio` (fraction of each matrix's weights its factors may hold) or `rank` (an int or "rmt":
    singular values above the Marchenko-Pastur edge, as the RMT compressor does).
    """
    from pruning_utils.compress.lowrank import factorize, rank_for_params

    if (rank is None) == (param_ratio is None):
        raise ValueError("give exactly one of rank (an int or 'rmt') or param_ratio (fraction of weights kept)")
    ranks = {}
    for li, layer in enumerate(encoder_layers(model)):
        for name in projections:
            lin = encoder_proj(layer, name)
            r = rank if rank is not None else rank_for_params(lin.out_features, lin.in_features,
                                                             int(param_ratio * lin.weight.numel()))
            low = factorize(lin, r)
            set_encoder_proj(layer, name, low)
            ranks[(li, name)] = low.rank
    return ranks


ENCODER_INT8_MODE = "dynamic"


def quantize_encoder(model, embeddings: bool = True, mode: str = ENCODER_INT8_MODE):
    """Return a torchao INT8 copy of an encoder classifier (every nn.Linear, `quantize.quantize_int8`; CPU or CUDA).

    `embeddings`: also store the word-embedding table as INT8 (weight-only, one scale per row): in a small encoder
    such as MiniLM the vocabulary table is half the weights, so INT8 linears alone shrink the file ~1.5x only.
    `mode`: `dynamic` by default, since a classifier's batched forward is compute-bound (int8 x int8 matmuls), where
    weight-only INT8 mainly saves memory traffic (decode).
    """
    from pruning_utils.compress.quantize import quantize_int8

    encoder_arch_of(model)
    q = quantize_int8(model, mode=mode, embedding=embeddings)
    q.int8_embeddings = embeddings
    return q


def parameter_counts(model) -> dict[str, int]:
    """Return `total` and `non_embedding` parameters of an encoder classifier (INT8 weights count their values)."""
    total, embedding = 0, 0
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False)]
        n = sum(p.numel() for p in own)
        total += n
        if "Embedding" in type(m).__name__:
            embedding += n
    return {"total": total, "non_embedding": total - embedding}
