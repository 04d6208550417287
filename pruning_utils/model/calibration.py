"""Layer-wise calibration, the one home of it: batching windows, capturing what each decoder layer is called with,
running one layer on captured inputs, replaying the rest of the model, and stopping a forward early.

Importance (head ablations) and reconstruction (one-shot and sequential refits) both build on these. Walking the
model layer by layer (`walk_layers`) keeps one layer's statistics alive at a time, whatever the depth: a caller
collects what it needs inside a layer, moves it off the device, and the walk feeds the layer's outputs on.

Offload mode: the walks take a compute `device`. The model then stays where it was loaded (the host), the
embeddings run there, and each decoder layer is moved to `device` for its turn only (`on_device`) and back to
its home afterwards, so the device holds one layer's weights plus the calibration windows' hidden states.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from pruning_utils.model.arch import base_model, decoder_layers, final_norm, lm_head
from pruning_utils.model.hooks import hooks
from pruning_utils.model.stats import GramCollector, GramStats


class StopForward(Exception):
    """Raised by a hook to skip the rest of a forward pass once the needed statistics are in."""


def _stop(*_):
    raise StopForward


def model_device(model) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def to_device(obj, device: torch.device | str | None):
    """Return `obj` with every tensor in it (nested tuples, lists, dicts) moved to `device` (None: unchanged)."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def on_device(module: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """Move `module` to `device` for the block, then every parameter and buffer back to its home device, even on error.

    Changes made inside the block (a refit) travel back with the weights; `device=None` leaves the module alone.
    """
    if device is None:
        yield module
        return
    tensors = [*module.parameters(), *module.buffers()]
    homes = [t.device for t in tensors]
    target = torch.device(device)
    if all(h == target for h in homes):
        yield module
        return
    # moved outside inference mode: weights created inside it could never again take part in autograd (LoRA)
    try:
        with torch.inference_mode(False), torch.no_grad():
            module.to(target)
        yield module
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for t, home in zip(tensors, homes):
                if t.device != home:
                    t.data = t.data.to(home)


def batches(windows: Tensor, batch_size: int, device: torch.device | None = None) -> Iterator[Tensor]:
    """Yield consecutive batches of token windows [n, seq_len], moved to `device`."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be token ids [n, seq_len], got shape {tuple(windows.shape)}")
    batch_size = max(1, int(batch_size))
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size].to(device) if device is not None else windows[start:start + batch_size]


def forward_until(model, ids: Tensor, last: nn.Module | None = None):
    """Run the decoder stack (no LM head) on `ids`, stopping after module `last` when given;
    returns its output or None."""
    # the inner model skips lm_head: logits over a large vocabulary would cost as much as the layers
    specs = [(last, "forward", _stop)] if last is not None else []
    with hooks(*specs):
        try:
            return base_model(model)(input_ids=ids, use_cache=False)
        except StopForward:
            return None


def stream_inputs(model, windows: Tensor, modules: Mapping[Hashable, nn.Module],
                  add: Callable[[Hashable, Tensor], None], batch_size: int = 4,
                  stop_after: nn.Module | None = None) -> None:
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


def capture_layer_inputs(model, windows: Tensor, batch_size: int = 4, device: torch.device | str | None = None
                         ) -> LayerInputs:
    """Return the hidden states entering layer 0 and every layer's call arguments, per batch, on `device`.

    The embeddings run where the model is; `device` (offload mode's compute device) is where the captured
    tensors go, the model's device by default.
    """
    home = model_device(model)
    # masks can differ per layer (sliding-window layers), so every layer's call is recorded; the catchers make
    # this pass cost only the embeddings
    with torch.no_grad(), _catching(model) as stores:
        for ids in batches(windows, batch_size, home):
            base_model(model)(input_ids=ids, use_cache=False)
    return LayerInputs([to_device(h, device) for h, _, _ in stores[0]],
                       [[to_device((a, kw), device) for _, a, kw in store] for store in stores])


def walk_layers(model, windows: Tensor, batch_size: int = 4, last: int | None = None, bypassed: set[int] = frozenset(),
                device: torch.device | str | None = None) -> Iterator[tuple[int, nn.Module, list[Tensor], list[tuple]]]:
    """Yield `(index, layer, hidden, calls)` for layers 0..last, feeding each layer's outputs to the next.

    The outputs are computed after the caller's loop body has run, so a caller that changes layer i (a refit)
    feeds its changed outputs on: the sequential refit. A `bypassed` layer passes its input on unchanged (a
    dropped layer). One layer's inputs are alive at a time. With `device` (offload mode) the yielded layer and
    tensors are on `device` and the layer returns to its home when the walk moves on.
    """
    inputs = capture_layer_inputs(model, windows, batch_size, device)
    layers = decoder_layers(model)
    last = len(layers) - 1 if last is None else last
    hidden = inputs.hidden
    for li in range(last + 1):
        with on_device(layers[li], device):
            yield li, layers[li], hidden, inputs.calls[li]
            if li < last and li not in bypassed:
                with torch.no_grad():
                    hidden = [run_layer(layers[li], h, call) for h, call in zip(hidden, inputs.calls[li])]


OFFLOAD_WINDOWS = 32  # windows per layer walk of an offloaded pass: bounds the hidden states on the device


def offload_group(batch_size: int) -> int:
    """Return the windows of one layer walk in offload mode: about `OFFLOAD_WINDOWS`, a whole number of batches (so
    the walk's batches are the batches a plain pass makes)."""
    return max(1, OFFLOAD_WINDOWS // batch_size) * batch_size

def last_hidden(model, windows: Tensor, batch_size: int = 4, device: torch.device | str | None = None
                ) -> list[Tensor]:
    """Return, per batch of `windows`, the decoder body's output after the final norm (what the LM head reads), on
    `device`: one decoder layer at a time there (offload mode), the model's own device by default."""
    last = len(decoder_layers(model)) - 1
    hidden: list[Tensor] = []
    with torch.no_grad():
        for li, layer, hidden, calls in walk_layers(model, windows, batch_size, device=device):
            if li == last:  # the walk feeds each layer's outputs to the next one: the last layer's are made here
                hidden = [run_layer(layer, h, call) for h, call in zip(hidden, calls)]
        with on_device(final_norm(model), device) as norm:
            return [norm(h) for h in hidden]


def iter_layer_grams(model, windows: Tensor, wanted: Mapping[int, Mapping[Hashable, nn.Linear]], batch_size: int = 4,
                     device: torch.device | str | None = None
                     ) -> Iterator[tuple[int, nn.Module, dict[Hashable, GramStats]]]:
    """Yield `(index, layer, {key: GramStats})` for layers 0..max(wanted), each right after the layer ran.

    The next layer's inputs are already computed when a layer is yielded, so a caller may refit that layer in
    place (a one-shot refit: every Gram still comes from the unpruned layers) and drop its statistics before
    the next layer's are made: one layer's Grams alive, whatever the depth. With `device` (offload mode) the
    layer is on `device` while yielded.
    """
    if not wanted:
        return
    inputs = capture_layer_inputs(model, windows, batch_size, device)
    layers, hidden = decoder_layers(model), inputs.hidden
    for li in range(max(wanted) + 1):
        with on_device(layers[li], device):
            # one run per layer both collects its statistics and makes the next layer's inputs
            # (the collector is built inside on_device: its accumulators go where the layer's weights are)
            with torch.no_grad(), GramCollector(wanted.get(li) or {}) as col:
                hidden = [run_layer(layers[li], h, call) for h, call in zip(hidden, inputs.calls[li])]
            stats = col.stats
            del col  # else this layer's device copies live on while the next layer's are allocated
            yield li, layers[li], stats
            del stats


def layerwise_grams(model, windows: Tensor, wanted: Mapping[int, Mapping[Hashable, nn.Linear]], batch_size: int = 4,
                    storage: torch.device | str | None = None, device: torch.device | str | None = None
                    ) -> dict[tuple[int, Hashable], GramStats]:
    """Return `GramStats` of the inputs of `wanted[layer][key]` modules, one decoder layer at a time.

    Each layer runs once over the captured batches with every wanted module hooked, so statistics memory is
    one layer's worth on the device; `storage` (e.g. "cpu") is where finished layers' statistics are kept.
    The result equals a full-model pass (the same layer calls on the same inputs). `device`: offload mode's
    compute device (the statistics then go to `storage`, or to the model's home device when it is None).
    """
    if device is not None and storage is None:
        storage = model_device(model)
    out: dict[tuple[int, Hashable], GramStats] = {}
    for li, _, stats in iter_layer_grams(model, windows, wanted, batch_size, device):
        out.update({(li, key): st if storage is None else st.to(storage) for key, st in stats.items()})
        del stats
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
