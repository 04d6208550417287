"""Hooks as context managers that always remove themselves, and masking of heads / neurons / layers.

Masking is the reference that surgery must reproduce exactly: a masked head has its
channels zeroed at the input of `o_proj`, a masked neuron at the input of `down_proj`,
and a bypassed layer returns its input hidden states unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from pruning_utils.model.arch import HEAD_INPUT, NEURON_INPUT, decoder_layers, head_dim, proj


@contextmanager
def hooks(*specs: tuple[nn.Module, str, Callable]) -> Iterator[list]:
    """Register `(module, kind, fn)` hooks (kind: 'forward', 'pre', 'pre_kw', 'forward_kw') and remove them on exit."""
    handles = []
    try:
        for module, kind, fn in specs:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            elif kind == "forward_kw":
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
            elif kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"unknown hook kind '{kind}'; known: forward, forward_kw, pre, pre_kw")
        yield handles
    finally:
        for h in handles:
            h.remove()


def channel_mask(n: int, removed: Iterable[int], width: int, like: torch.Tensor) -> torch.Tensor:
    """Return a [n * width] mask that is 0 on the channels of the removed units and 1 elsewhere."""
    mask = torch.ones(n * width, dtype=like.dtype, device=like.device)
    for i in removed:
        mask[i * width:(i + 1) * width] = 0
    return mask


@contextmanager
def masked(model, heads: dict[int, Iterable[int]] | None = None, neurons: dict[int, Iterable[int]] | None = None,
           layers: Iterable[int] | None = None, skip_zeros: bool = False) -> Iterator[None]:
    """Zero the outputs of the given heads / neurons and bypass the given layers for the duration of the block.

    With `skip_zeros`, the zeroed channels are left out of the o_proj / down_proj sums instead of being
    added as zeros: the same function, in the summation order a pruned matrix uses, so fp32 comparisons
    see no reordering noise (which SmolLM2's large activations amplify to ~5e-5 over 30 layers).
    """
    specs = []
    layer_list = decoder_layers(model)
    hd = head_dim(model)
    for li, removed in (heads or {}).items():
        o_proj = proj(layer_list[li], HEAD_INPUT)
        specs.append(_zeroing_spec(o_proj, channel_mask(o_proj.in_features // hd, removed, hd, o_proj.weight),
                                   skip_zeros))
    for li, removed in (neurons or {}).items():
        down = proj(layer_list[li], NEURON_INPUT)
        specs.append(_zeroing_spec(down, channel_mask(down.in_features, removed, 1, down.weight), skip_zeros))
    for li in layers or ():
        specs.append((layer_list[li], "forward_kw", bypass_output))
    with hooks(*specs):
        yield


def _zeroing_spec(linear: nn.Linear, mask: torch.Tensor, skip_zeros: bool):
    if not skip_zeros:
        return (linear, "pre", lambda mod, args: (args[0] * mask,) + tuple(args[1:]))
    keep = mask.nonzero().squeeze(1)

    def hook(mod, args, output):
        return nn.functional.linear(args[0].index_select(-1, keep), mod.weight.index_select(1, keep), mod.bias)

    return (linear, "forward", hook)


def bypass_output(module, args, kwargs, output):
    """Forward hook that makes a decoder / encoder layer return its input unchanged (the layer skipped)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden
