"""One adapter table for every supported decoder family.

All supported families (Llama, Mistral, Qwen2, Qwen3) share module names
(`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`); they differ only in
biases, QK-norm and config fields, which this table records once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ArchSpec:
    """What differs between families; surgery reads these flags instead of branching per family."""

    model_type: str
    qkv_bias_field: str | None  # config field turning on q/k/v biases (None: fixed by `qkv_bias_default`)
    qkv_bias_default: bool
    o_bias_follows_qkv: bool  # Llama's `attention_bias` also puts a bias on o_proj; Qwen2's does not
    mlp_bias_field: str | None
    qk_norm: bool  # per-head RMSNorm shared by all heads: needs no slicing


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "attention_bias", False, True, "mlp_bias", False),
    "mistral": ArchSpec("mistral", None, False, False, None, False),
    "qwen2": ArchSpec("qwen2", None, True, False, None, False),
    "qwen3": ArchSpec("qwen3", "attention_bias", False, True, None, True),
}


class UnsupportedArchitectureError(ValueError):
    """Raised for a model family whose surgery is not implemented."""


def arch_of(model_or_config) -> ArchSpec:
    """Return the adapter entry of a model or config, or raise naming the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(Llama-2/3.x, SmolLM, TinyLlama, Mistral, Qwen2.5, Qwen3). Pick a model of one of these families."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model) -> nn.ModuleList:
    """Return the list of decoder layers of a causal LM (or of its inner base model)."""
    arch_of(model)
    base = getattr(model, "model", model)
    return base.layers


def head_dim(model) -> int:
    """Return the attention head dimension, read from the first layer (it never changes with pruning)."""
    return decoder_layers(model)[0].self_attn.head_dim


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer as its weights say (the weights are the source of truth)."""

    n_heads: int
    n_kv_heads: int
    intermediate: int


def layer_shapes(model) -> list[LayerShape]:
    """Return the per-layer query heads, KV heads and MLP width read from the weight matrices."""
    hd = head_dim(model)
    shapes = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        shapes.append(
            LayerShape(
                n_heads=attn.q_proj.out_features // hd,
                n_kv_heads=attn.k_proj.out_features // hd,
                intermediate=mlp.up_proj.out_features,
            )
        )
    return shapes


def is_uniform(shapes: list[LayerShape]) -> bool:
    """Return True when every layer has the same shape (the condition for stock `from_pretrained`)."""
    return len(set(shapes)) <= 1
