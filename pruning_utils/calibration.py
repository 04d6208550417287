"""Layer-wise calibration, the one home of it: batching windows, capturing what each decoder layer is called with,
running one layer on captured inputs, replaying the rest of the model, and stopping a forward early.

Importance (head ablations) and reconstruction (one-shot and sequential refits) both build on these. Walking the
model layer by layer (`walk_layers`) keeps one layer's statistics alive at a time, whatever the depth: a caller
collects what it needs inside a layer, moves it off the device, and the walk feeds the layer's outputs on.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .arch import base_model, decoder_layers, final_norm, lm_head
from .hooks import hooks
from .stats import GramCollector, GramStats


class StopForward(Exception):
    """Raised by a hook to skip the rest of a forward pass once the needed statistics are in."""


def _stop(*_):
    raise StopForward


def model_device(model) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def batches(windows: Tensor, batch_size: int, device: torch.device | None = None) -> Iterator[Tensor]:
    """Yield consecutive batches of token windows [n, seq_len], moved to `device`."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be token ids [n, seq_len], got shape {tuple(windows.shape)}")
    batch_size = max(1, int(batch_size))
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size].to(device) if device is not None else windows[start:start + batch_size]


def forward_until(model, ids: Tensor, last: nn.Module | None = None):
    """Run the decoder stack (no LM head) on `ids`, stopping after module `last` when given; returns its output or None."""
    # the inner model skips lm_head: logits over a large vocabulary would cost as much as the layers
    specs = [(last, "forward", _stop)] if last is not None else []
    with hooks(*specs):
        try:
            return base_model(model)(input_ids=ids, use_cache=False)
        except StopForward:
            return None


def stream_inputs(model, windows: Tensor, modules: Mapping[Hashable, nn.Module], add: Callable[[Hashable, Tensor], None],
                  batch_size: int = 4, stop_after: nn.Module | None = None) -> None:
    """Call `add(key, input)` with the input of every module in `modules` over full forward passes of the windows."""
    def hook(key):
        return lambda mod, args: add(key, args[0])

    device = model_device(model)
    with torch.no_grad(), hooks(*[(m, "pre", hook(k)) for k, m in modules.items()]):
        for ids in batches(windows, batch_size, device):
            forward_until(model, ids, stop_after)


def run_layer(layer: nn.Module, hidden: Tensor, call: tuple) -> Tensor:
    """Return the hidden states a decoder layer outputs for `hidden`, called with the captured (args, kwargs)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_of(layer: nn.Module, module: nn.Module, hidden: Tensor, call: tuple) -> Tensor:
    """Return the input `module` receives when `layer` runs on `hidden` (the layer stops there)."""
    got = []

    def grab(_, args):
        got.append(args[0])
        raise StopForward

    with hooks((module, "pre", grab)):
        try:
            run_layer(layer, hidden, call)
        except StopForward:
            pass
    return got[0]


def layer_input_grams(layer: nn.Module, module: nn.Linear, hidden: list[Tensor], calls: list) -> GramStats:
    """Return the `GramStats` of `module`'s input over the cached batches, running `layer` only up to `module`."""
    with GramCollector({0: module}) as col, hooks((module, "pre", _stop)):
        for h, call in zip(hidden, calls):
            try:
                run_layer(layer, h, call)
            except StopForward:
                pass
    return col.stats[0]


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records what the layer would be called with and passes hidden states on."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


@contextmanager
def _catching(model) -> Iterator[list[list]]:
    """Swap every decoder layer for a `_Catcher` (SparseGPT's trick), restoring the real layers on exit."""
    layer_list = decoder_layers(model)
    saved = list(layer_list)
    stores: list[list] = [[] for _ in saved]
    try:
        for i, store in enumerate(stores):
            layer_list[i] = _Catcher(store)
        yield stores
    finally:
        for i, layer in enumerate(saved):
            layer_list[i] = layer


@dataclass
class LayerInputs:
    """What enters layer 0 per batch (`hidden`) and, per layer, the (args, kwargs) each batch calls it with."""

    hidden: list[Tensor]
    calls: list[list[tuple]]


def capture_layer_inputs(model, windows: Tensor, batch_size: int = 4) -> LayerInputs:
    """Return the hidden states entering layer 0 and every layer's call arguments, per batch of windows."""
    device = model_device(model)
    # masks can differ per layer (sliding-window layers), so every layer's call is recorded; the catchers make
    # this pass cost only the embeddings
    with torch.no_grad(), _catching(model) as stores:
        for ids in batches(windows, batch_size, device):
            base_model(model)(input_ids=ids, use_cache=False)
    return LayerInputs([h for h, _, _ in stores[0]], [[(a, kw) for _, a, kw in store] for store in stores])


def walk_layers(model, windows: Tensor, batch_size: int = 4, last: int | None = None, bypassed: set[int] = frozenset()
                ) -> Iterator[tuple[int, nn.Module, list[Tensor], list[tuple]]]:
    """Yield `(index, layer, hidden, calls)` for layers 0..last, feeding each layer's outputs to the next.

    The outputs are computed after the caller's loop body has run, so a caller that changes layer i (a refit)
    feeds its changed outputs on: the sequential refit. A `bypassed` layer passes its input on unchanged (a
    dropped layer). One layer's inputs are alive at a time.
    """
    inputs = capture_layer_inputs(model, windows, batch_size)
    layers = decoder_layers(model)
    last = len(layers) - 1 if last is None else last
    hidden = inputs.hidden
    for li in range(last + 1):
        yield li, layers[li], hidden, inputs.calls[li]
        if li < last and li not in bypassed:
            with torch.no_grad():
                hidden = [run_layer(layers[li], h, call) for h, call in zip(hidden, inputs.calls[li])]


def layerwise_grams(model, windows: Tensor, wanted: Mapping[int, Mapping[Hashable, nn.Linear]], batch_size: int = 4,
                    storage: torch.device | str | None = None) -> dict[tuple[int, Hashable], GramStats]:
    """Return `GramStats` of the inputs of `wanted[layer][key]` modules, one decoder layer at a time.

    Each layer runs once over the captured batches with every wanted module hooked, so statistics memory is
    one layer's worth on the device; `storage` (e.g. "cpu") is where finished layers' statistics are kept.
    The result equals a full-model pass (the same layer calls on the same inputs).
    """
    out: dict[tuple[int, Hashable], GramStats] = {}
    if not wanted:
        return out
    inputs = capture_layer_inputs(model, windows, batch_size)
    layers, hidden = decoder_layers(model), inputs.hidden
    with torch.no_grad():
        for li in range(max(wanted) + 1):
            # one run per layer both collects its statistics and makes the next layer's inputs
            with GramCollector(wanted.get(li) or {}) as col:
                hidden = [run_layer(layers[li], h, call) for h, call in zip(hidden, inputs.calls[li])]
            out.update({(li, key): st if storage is None else st.to(storage) for key, st in col.stats.items()})
            del col  # else this layer's device copies live on while the next layer's are allocated
    return out


def logits_from_hidden(model, hidden: Tensor) -> Tensor:
    """Return the LM logits of the last decoder layer's hidden states (final norm, then the LM head)."""
    return lm_head(model)(final_norm(model)(hidden))


def capture_batch(model, ids: Tensor) -> tuple[Tensor, list[tuple]]:
    """Return the full model's logits for one batch and the (args, kwargs) every decoder layer was called with."""
    layers = decoder_layers(model)
    inputs: list[tuple | None] = [None] * len(layers)

    def grab(idx: int):
        def pre(mod, args, kwargs):
            inputs[idx] = (args, kwargs)
        return pre

    with hooks(*[(layer, "pre_kw", grab(j)) for j, layer in enumerate(layers)]):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, inputs


def replay(model, inputs: list[tuple], start: int) -> Tensor:
    """Return logits recomputed from the captured input of decoder layer `start` onwards (earlier layers unaffected)."""
    layers = decoder_layers(model)
    args, kwargs = inputs[start]
    hidden = args[0] if args else kwargs["hidden_states"]
    for j in range(start, len(layers)):
        a, kw = inputs[j]
        out = layers[j](hidden, *a[1:], **kw) if a else layers[j](**{**kw, "hidden_states": hidden})
        hidden = out[0] if isinstance(out, tuple) else out
    return logits_from_hidden(model, hidden)
