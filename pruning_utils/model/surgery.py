"""Structural surgery: remove query heads (Q + O only), MLP neurons and decoder layers, in place.

The contract, checked by tests: a pruned model's logits equal those of the unpruned model
with the same parts masked (`hooks.masked`) to 1e-5 in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pruning_utils.model.arch import (
    arch_of,
    decoder_layers,
    head_channels,
    head_dim,
    is_uniform,
    layer_shape,
    layer_shapes,
    proj,
    set_decoder_layers,
    set_layer_index,
    set_mlp_width,
    set_proj,
    set_query_heads,
)
from pruning_utils.model.plan import PlanMismatchError, PruningPlan


class SurgeryError(ValueError):
    """Raised when a requested removal would break the model (an empty KV group, unequal groups, ...)."""


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """Return a new Linear keeping the given output rows and input columns (bias follows the rows)."""
    w = linear.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data if rows is None else linear.bias.data.index_select(0, rows.to(w.device))
        new.bias.data.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def check_gqa_heads(kept: list[int], n_heads: int, n_kv: int, layer: int) -> None:
    """Raise SurgeryError unless every KV group keeps the same, non-zero number of query heads."""
    group = n_heads // n_kv
    if len(set(kept)) != len(kept) or min(kept, default=0) < 0 or max(kept, default=0) >= n_heads:
        raise SurgeryError(f"layer {layer}: kept heads must be distinct indices in [0, {n_heads})")
    counts = [sum(1 for h in kept if h // group == g) for g in range(n_kv)]
    if min(counts) == 0:
        raise SurgeryError(
            f"layer {layer}: every head of a KV group would be removed (kept per group: {counts}); "
            "keep at least one query head per KV group, or lower the head rate"
        )
    if len(set(counts)) != 1:
        raise SurgeryError(
            f"layer {layer}: KV groups must keep equal numbers of query heads (GQA), got {counts}; "
            f"remove the same number of heads from each of the {n_kv} groups"
        )


def prune_heads(model, kept: dict[int, list[int]]):
    """Keep only the given query heads per layer (slices q_proj rows and o_proj columns; K/V untouched);
    returns model."""
    arch_of(model)
    hd = head_dim(model)
    layers = decoder_layers(model)
    for li, keep in kept.items():
        layer = layers[li]
        shape = layer_shape(layer, hd)
        keep = sorted(int(h) for h in keep)
        check_gqa_heads(keep, shape.n_heads, shape.n_kv_heads, li)
        if len(keep) == shape.n_heads:
            continue
        channels = head_channels(keep, hd)
        set_proj(layer, "q_proj", sliced_linear(proj(layer, "q_proj"), rows=channels))
        set_proj(layer, "o_proj", sliced_linear(proj(layer, "o_proj"), cols=channels))
        set_query_heads(layer, len(keep), shape.n_kv_heads)
    _sync_config(model)
    return model


def prune_neurons(model, kept: dict[int, list[int]]):
    """Keep only the given MLP channels per layer (gate/up rows, down columns); returns model."""
    arch_of(model)
    layers = decoder_layers(model)
    for li, keep in kept.items():
        layer = layers[li]
        width = proj(layer, "up_proj").out_features
        keep = sorted(int(n) for n in keep)
        if not keep:
            raise SurgeryError(f"layer {li}: every MLP neuron would be removed; keep at least one or drop the layer")
        if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= width:
            raise SurgeryError(f"layer {li}: kept neurons must be distinct indices in [0, {width})")
        if len(keep) == width:
            continue
        idx = torch.tensor(keep)
        for name in ("gate_proj", "up_proj"):
            set_proj(layer, name, sliced_linear(proj(layer, name), rows=idx))
        set_proj(layer, "down_proj", sliced_linear(proj(layer, "down_proj"), cols=idx))
        set_mlp_width(layer, len(keep))
    _sync_config(model)
    return model


def drop_layers(model, kept_layers: list[int]):
    """Keep only the given decoder layers, renumbering KV-cache indices and per-layer config lists; returns model."""
    arch_of(model)
    layers = decoder_layers(model)
    kept_layers = sorted(int(i) for i in kept_layers)
    if not kept_layers:
        raise SurgeryError("cannot drop every decoder layer; keep at least one")
    if len(set(kept_layers)) != len(kept_layers) or kept_layers[0] < 0 or kept_layers[-1] >= len(layers):
        raise SurgeryError(f"kept layers must be distinct indices in [0, {len(layers)})")
    new_layers = nn.ModuleList([layers[i] for i in kept_layers])
    for new_idx, layer in enumerate(new_layers):
        set_layer_index(layer, new_idx)
    set_decoder_layers(model, new_layers)
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept_layers]
    cfg.num_hidden_layers = len(kept_layers)
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, len(kept_layers))
    _sync_config(model)
    return model


def _sync_config(model) -> None:
    """Write uniform shapes back into the config; non-uniform shapes stay in the weights
    (the checkpoint records them)."""
    shapes = layer_shapes(model)
    if is_uniform(shapes):
        model.config.num_attention_heads = shapes[0].n_heads
        model.config.intermediate_size = shapes[0].intermediate


def apply_plan(model, plan: PruningPlan):
    """Apply a plan in place (heads, then neurons, then layers), check it fits the model, and return the model."""
    plan.validate()
    shapes = layer_shapes(model)
    have_heads, have_width = [s.n_heads for s in shapes], [s.intermediate for s in shapes]
    if have_heads != list(plan.base_heads) or have_width != list(plan.base_intermediate):
        raise PlanMismatchError(
            "the plan was made for a model with query heads per layer "
            f"{_short(plan.base_heads)} and MLP widths {_short(plan.base_intermediate)}, but this model has "
            f"{_short(have_heads)} and {_short(have_width)}; recompute the plan on this model "
            "(or load the model it was made for)"
        )
    return apply_removals(model, plan, prune_heads, prune_neurons, drop_layers)


def apply_removals(model, plan: PruningPlan, heads, neurons, layers):
    """Apply a checked plan with a family's surgery functions (decoder here, encoder in `encoder.py`); record it."""
    heads(model, {li: plan.kept_heads(li) for li in plan.heads})
    neurons(model, {li: plan.kept_neurons(li) for li in plan.neurons})
    if plan.layers is not None:
        layers(model, plan.kept_layers())
    earlier = getattr(model, "pruning_plan", None)
    model.pruning_plan = plan.composed_with(earlier) if earlier is not None else plan
    return model


def _short(values: list[int]) -> str:
    return f"[{values[0]}]x{len(values)}" if len(set(values)) == 1 else str(values)
