"""The one adapter between the project and a model family: module access, what a head / neuron owns, stock configs.

Every other module reaches a projection through `proj(layer, "o_proj")`, the layer list through
`decoder_layers(model)`, and so on; module paths are spelled in this file only. The supported families
(Llama, Mistral, Qwen2, Qwen3) share module names and differ in biases, QK-norm and config validation, which
the table `ARCHITECTURES` records once. Adding a family whose modules are named the same = adding a row;
one with other names = adding a row and a `PATHS` entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

# where each projection lives inside a decoder layer
PATHS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "q_proj"), "k_proj": ("self_attn", "k_proj"), "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"), "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
PROJECTIONS = tuple(PATHS)
ATTENTION, MLP = "self_attn", "mlp"


@dataclass(frozen=True)
class ArchSpec:
    """What differs between families, read by `stock_config` (the rules for writing a loadable config)."""

    model_type: str
    bias_fields: tuple[str, ...]  # config fields that put biases on projections (a pruned config keeps them)
    heads_divide_hidden: bool  # the config class refuses hidden_size % num_attention_heads != 0
    # a family whose stock class computes the same function when this one's config refuses a head count
    # (only without biases: Mistral has none)
    unbiased_twin: str | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", ("attention_bias", "mlp_bias"), heads_divide_hidden=True, unbiased_twin="mistral"),
    "mistral": ArchSpec("mistral", (), heads_divide_hidden=False),
    "qwen2": ArchSpec("qwen2", (), heads_divide_hidden=False),  # q/k/v biases are built in, not a config field
    "qwen3": ArchSpec("qwen3", ("attention_bias",), heads_divide_hidden=False),  # QK-norm is per head_dim: no slicing
}


class UnsupportedArchitectureError(ValueError):
    """Raised for a model family whose surgery is not implemented."""


def arch_of(model_or_config) -> ArchSpec:
    """Return the adapter entry of a model or config, or raise naming the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(Llama-2/3.x, SmolLM, TinyLlama, Mistral, Qwen2.5, Qwen3). Pick a model of one of these families; "
            "an encoder classifier (BERT family) is pruned by pruning_utils.encoder.surgery (notebook 07_encoder_glue, "
            "profile `encoder`)")
    return ARCHITECTURES[model_type]


# ----------------------------------------------------------------------------------------------- module access


def base_model(model) -> nn.Module:
    """Return the decoder stack without the LM head (`model.model` of a causal LM)."""
    return getattr(model, "model", model)


def decoder_layers(model) -> nn.ModuleList:
    """Return the list of decoder layers of a causal LM (or of its inner base model)."""
    arch_of(model)
    return base_model(model).layers


def set_decoder_layers(model, layers: nn.ModuleList) -> None:
    """Replace the decoder layer list."""
    base_model(model).layers = layers


def final_norm(model) -> nn.Module:
    """Return the norm applied after the last decoder layer."""
    return base_model(model).norm


def lm_head(model) -> nn.Module:
    """Return the output projection to the vocabulary."""
    return model.get_output_embeddings()


def attention(layer: nn.Module) -> nn.Module:
    """Return a decoder layer's attention block."""
    return getattr(layer, ATTENTION)


def mlp(layer: nn.Module) -> nn.Module:
    """Return a decoder layer's MLP block."""
    return getattr(layer, MLP)


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    """Return a decoder layer's pre-attention and pre-MLP norms."""
    return [layer.input_layernorm, layer.post_attention_layernorm]


def proj(layer: nn.Module, name: str) -> nn.Linear:
    """Return the projection `name` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) of a layer."""
    if name not in PATHS:
        raise KeyError(f"unknown projection '{name}'; known: {', '.join(PROJECTIONS)}")
    block, attr = PATHS[name]
    return getattr(getattr(layer, block), attr)


def set_proj(layer: nn.Module, name: str, linear: nn.Linear) -> None:
    """Put `linear` in place of the projection `name` of a layer."""
    block, attr = PATHS[name]
    setattr(getattr(layer, block), attr, linear)


def set_layer_index(layer: nn.Module, index: int) -> None:
    """Renumber a layer after layers were dropped: the KV cache is indexed by it, stale indices read another's keys."""
    attention(layer).layer_idx = index
    if hasattr(layer, "layer_idx"):
        layer.layer_idx = index


def set_query_heads(layer: nn.Module, n_heads: int, n_kv_heads: int) -> None:
    """Update the attention block's head bookkeeping after q_proj / o_proj were sliced to `n_heads` heads."""
    attn = attention(layer)
    # sorted kept heads stay contiguous per group, so repeat_kv's head -> group mapping still holds
    attn.num_key_value_groups = n_heads // n_kv_heads
    if hasattr(attn, "num_heads"):
        attn.num_heads = n_heads


def set_mlp_width(layer: nn.Module, width: int) -> None:
    """Update the MLP block's bookkeeping after it was sliced to `width` channels."""
    block = mlp(layer)
    if hasattr(block, "intermediate_size"):
        block.intermediate_size = width


def head_dim(model) -> int:
    """Return the attention head dimension, read from the first layer (it never changes with pruning)."""
    return attention(decoder_layers(model)[0]).head_dim


# ------------------------------------------------------------------------------------------ shapes and ownership


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer as its weights say (the weights are the source of truth)."""

    n_heads: int
    n_kv_heads: int
    intermediate: int


def layer_shape(layer: nn.Module, hd: int) -> LayerShape:
    """Return one layer's query heads, KV heads and MLP width read from its weight matrices."""
    return LayerShape(proj(layer, "q_proj").out_features // hd, proj(layer, "k_proj").out_features // hd,
                      proj(layer, "up_proj").out_features)


def layer_shapes(model) -> list[LayerShape]:
    """Return the per-layer query heads, KV heads and MLP width read from the weight matrices."""
    hd = head_dim(model)
    return [layer_shape(layer, hd) for layer in decoder_layers(model)]


def is_uniform(shapes: list[LayerShape]) -> bool:
    """Return True when every layer has the same shape (the condition for stock `from_pretrained`)."""
    return len(set(shapes)) <= 1


def head_channels(heads, hd: int) -> Tensor:
    """Return the o_proj input channels (= q_proj output rows) of the given heads, in order."""
    heads = [int(h) for h in heads]
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])


# What a query head owns: its head_dim rows of q_proj (and bias) and its head_dim input columns of o_proj; a
# neuron owns one row of gate_proj and up_proj (and biases) and one input column of down_proj. K/V are shared
# by a KV group and owned by no head. Magnitude, Taylor and the parameter cost of a removal all read this.
HEAD_ROWS, HEAD_COLS = ("q_proj",), ("o_proj",)
NEURON_ROWS, NEURON_COLS = ("gate_proj", "up_proj"), ("down_proj",)
HEAD_INPUT, NEURON_INPUT = "o_proj", "down_proj"  # the projection whose input channels a head / neuron is


def owned_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Return every parameter some head or neuron of the layer owns (weights and biases)."""
    out = []
    for name in HEAD_ROWS + HEAD_COLS + NEURON_ROWS + NEURON_COLS:
        lin = proj(layer, name)
        out.append(lin.weight)
        if name in HEAD_ROWS + NEURON_ROWS and lin.bias is not None:
            out.append(lin.bias)
    return out


def owned_sums(layer: nn.Module, hd: int, value: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Return `value` of each owned parameter summed per query head [n_heads] and per neuron [intermediate].

    `value` maps a parameter to a tensor of its shape (abs for magnitude, w * grad for Taylor, ones for cost).
    """
    n_heads = proj(layer, "q_proj").out_features // hd
    heads = sum(row_sums(proj(layer, n), value).view(n_heads, hd).sum(1) for n in HEAD_ROWS)
    heads = heads + sum(value(proj(layer, n).weight).float().view(-1, n_heads, hd).sum((0, 2)) for n in HEAD_COLS)
    neurons = sum(row_sums(proj(layer, n), value) for n in NEURON_ROWS)
    neurons = neurons + sum(value(proj(layer, n).weight).float().sum(0) for n in NEURON_COLS)
    return heads, neurons


def row_sums(lin: nn.Linear, value: Callable[[Tensor], Tensor]) -> Tensor:
    """Return `value` summed per output row of a linear layer, its bias included."""
    s = value(lin.weight).float().sum(1)
    return s + value(lin.bias).float() if lin.bias is not None else s


def unit_costs(layer: nn.Module, hd: int) -> tuple[int, int]:
    """Return the parameters one query head and one MLP neuron of the layer own."""
    with torch.no_grad():
        heads, neurons = owned_sums(layer, hd, torch.ones_like)
    return int(heads[0]), int(neurons[0])


# -------------------------------------------------------------------------------------------------- configs


def config_refuses_heads(config: dict, n_heads: int) -> bool:
    """Return True when the family's config class would refuse `n_heads` query heads for this hidden size."""
    return arch_of(config).heads_divide_hidden and config["hidden_size"] % n_heads != 0


def has_config_biases(config: dict) -> bool:
    """Return True when the config turns on projection biases through one of the family's bias fields."""
    return any(bool(config.get(f)) for f in arch_of(config).bias_fields)


def stock_config(config: dict, shapes: list[LayerShape], hd: int, base_heads: list[int],
                 base_intermediate: list[int]) -> tuple[dict, bool]:
    """Return the config dict of a pruned model and whether stock `from_pretrained` can build it.

    Uniform shapes give a stock config. transformers 5's `LlamaConfig` refuses a head count that does not divide
    `hidden_size` even with `head_dim` set; an unbiased Llama is then written as its twin Mistral (same function,
    `sliding_window: None`). Otherwise the shapes go to `per_layer_config` and the global fields keep the source
    model's valid sizes, the template every layer fits in.
    """
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    spec = arch_of(cfg)
    cfg["num_hidden_layers"], cfg["head_dim"] = len(shapes), hd
    n_heads = shapes[0].n_heads
    refuses = config_refuses_heads(cfg, n_heads)
    if is_uniform(shapes) and not (refuses and (has_config_biases(cfg) or spec.unbiased_twin is None)):
        cfg["num_attention_heads"], cfg["intermediate_size"] = n_heads, shapes[0].intermediate
        if refuses:
            twin = spec.unbiased_twin
            cfg.update(model_type=twin, architectures=[f"{twin.capitalize()}ForCausalLM"], sliding_window=None)
            for key in spec.bias_fields + ("pretraining_tp",):
                cfg.pop(key, None)
        return cfg, True
    cfg["num_attention_heads"], cfg["intermediate_size"] = max(base_heads), max(base_intermediate)
    cfg["per_layer_config"] = {
        str(i): {"num_attention_heads": s.n_heads, "intermediate_size": s.intermediate} for i, s in enumerate(shapes)
    }
    return cfg, False
