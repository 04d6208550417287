"""The encoder adapter (BERT family): module access and what a head / neuron owns, in one table.

Encoders own different things from decoders (a head owns its Q, K and V rows; no GQA), live under other module
names, and are classifiers, so decoder code refuses them (`model.arch.arch_of`) and encoder code refuses decoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from torch import Tensor

from pruning_utils.model.arch import ARCHITECTURES, LayerShape, UnsupportedArchitectureError, row_sums

ENCODER_PATHS: dict[str, str] = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense",
}
ENCODER_HEAD_ROWS, ENCODER_HEAD_COLS = ("query", "key", "value"), ("attn_out",)
ENCODER_NEURON_ROWS, ENCODER_NEURON_COLS = ("intermediate",), ("output",)
ENCODER_HEAD_INPUT, ENCODER_NEURON_INPUT = "attn_out", "output"  # the projections whose inputs heads / neurons are


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder family: where its layers and self-attention live (projection paths: `ENCODER_PATHS`)."""

    model_type: str
    layers: str = "encoder.layer"  # under `model.base_model`
    self_attention: str = "attention.self"


# RoBERTa is BERT with other embeddings: the same modules under `model.roberta`, so it is one more row
ENCODERS: dict[str, EncoderSpec] = {"bert": EncoderSpec("bert"), "roberta": EncoderSpec("roberta")}


def encoder_arch_of(model_or_config) -> EncoderSpec:
    """Return the encoder adapter entry of a model or config, or raise naming the supported encoder families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"'{model_type}' is a decoder (causal LM), and this is the encoder classifier path; prune it with the "
            "decoder pipeline (notebooks 00-06, pruning_utils.model.surgery)")
    if model_type not in ENCODERS:
        raise UnsupportedArchitectureError(
            f"unsupported encoder architecture '{model_type}'; supported: {', '.join(sorted(ENCODERS))} "
            "(BERT, MiniLM, RoBERTa sequence classifiers). Pick a model of one of these families.")
    return ENCODERS[model_type]


def _attr_path(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def encoder_layers(model) -> nn.ModuleList:
    """Return the list of transformer layers of an encoder classifier."""
    return _attr_path(model.base_model, encoder_arch_of(model).layers)


def set_encoder_layers(model, layers: nn.ModuleList) -> None:
    """Replace the encoder's layer list."""
    parent, _, attr = encoder_arch_of(model).layers.rpartition(".")
    setattr(_attr_path(model.base_model, parent) if parent else model.base_model, attr, layers)


def encoder_proj(layer: nn.Module, name: str) -> nn.Module:
    """Return the projection `name` (query, key, value, attn_out, intermediate, output) of an encoder layer."""
    if name not in ENCODER_PATHS:
        raise KeyError(f"unknown encoder projection '{name}'; known: {', '.join(ENCODER_PATHS)}")
    return _attr_path(layer, ENCODER_PATHS[name])


def set_encoder_proj(layer: nn.Module, name: str, linear: nn.Module) -> None:
    """Put `linear` in place of the projection `name` of an encoder layer."""
    parent, _, attr = ENCODER_PATHS[name].rpartition(".")
    setattr(_attr_path(layer, parent), attr, linear)


def encoder_self_attention(layer: nn.Module) -> nn.Module:
    """Return an encoder layer's self-attention block (the one holding query / key / value)."""
    return _attr_path(layer, ENCODERS["bert"].self_attention)


def encoder_head_dim(model) -> int:
    """Return the attention head size (hidden / heads of the source config; surgery never changes it)."""
    return int(encoder_self_attention(encoder_layers(model)[0]).attention_head_size)


def set_encoder_heads(layer: nn.Module, n_heads: int, hd: int) -> None:
    """Update the self-attention bookkeeping after query / key / value were sliced to `n_heads` heads."""
    attn = encoder_self_attention(layer)
    attn.num_attention_heads, attn.all_head_size = n_heads, n_heads * hd  # the forward reshapes with -1 heads


def encoder_layer_shapes(model) -> list[LayerShape]:
    """Return per-layer heads (K/V heads = heads: no GQA) and intermediate width read from the weights."""
    hd = encoder_head_dim(model)
    out = []
    for layer in encoder_layers(model):
        heads = encoder_proj(layer, "query").out_features // hd
        out.append(LayerShape(heads, heads, encoder_proj(layer, "intermediate").out_features))
    return out


def encoder_owned_sums(layer: nn.Module, hd: int, value: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Return `value` of the parameters each head [n_heads] / neuron [intermediate] of an encoder layer owns, summed."""
    n_heads = encoder_proj(layer, "query").out_features // hd
    heads = sum(row_sums(encoder_proj(layer, n), value).view(n_heads, hd).sum(1) for n in ENCODER_HEAD_ROWS)
    heads = heads + sum(value(encoder_proj(layer, n).weight).float().view(-1, n_heads, hd).sum((0, 2))
                        for n in ENCODER_HEAD_COLS)
    neurons = sum(row_sums(encoder_proj(layer, n), value) for n in ENCODER_NEURON_ROWS)
    neurons = neurons + sum(value(encoder_proj(layer, n).weight).float().sum(0) for n in ENCODER_NEURON_COLS)
    return heads, neurons
