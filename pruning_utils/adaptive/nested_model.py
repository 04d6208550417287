"""Nested pruning levels from one set of weights, switched per prompt, and a KV-cache budget.

`NestedModel(model, scores)` reorders, in place, the query heads of every KV group and the MLP neurons of every layer
by importance, so that every level keeps a *prefix*: the projections become `PrefixLinear`s that multiply by the view
`weight[:k]` (q/gate/up rows) or `weight[:, :k]` (o/down columns). A switch only sets those sizes (and, for a level
that skips layers, the decoder layer list): no copy, no mask, smaller matmuls, the same storage for every level.

Query heads are stored rank-major (the best head of every group, then the second best, ...), so a prefix keeps the same
number of heads in each KV group; `PrefixLinear` turns its output back into the group-major order the attention code
expects (`repeat_kv`: query head i reads KV head i // group) and o_proj's input into rank-major again.

A level's logits equal those of the model `surgery` builds from the same kept indices (tests/test_adaptive.py);
the full level equals the original up to fp32 summation order (heads and neurons are summed in importance order), and
`unnest()` puts the original layout and modules back, bit for bit.

Serving (notebook 05): the unpruned model prefills the prompt once (`prefill`; its last logits are the controller's
entropy feature) and the chosen level decodes on from a copy of that cache (`decode(prefilled=...)`; every level
that keeps all layers, `shares_prefill`), so the first new token is the unpruned model's and the feature costs no
extra forward.

KV-cache budget (`kv:W` levels): a sliding window with attention sinks (StreamingLLM): after every forward the cache
keeps its first `KV_SINK_TOKENS` tokens and the last W; keys keep the positions they were rotated with.

Refit per level (`grams=`, one-shot Gram statistics of the unpruned model from `reconstruction.collect_grams`): every
o_proj / down_proj width a level uses gets its own least-squares refit of the kept columns (the `lstsq` mode of
`reconstruction`, the same function), stored as one extra [out, width] matrix per layer and width, so a refit level's
logits equal those of `reconstruction.prune_and_reconstruct` with the same kept indices; the memory it costs is in
`memory()`.

INT8 level (`int8`, CPU or CUDA): a torchao INT8 copy of the unpruned model (`quantize.quantize_int8`, weight-only
or dynamic) with its MLP neurons in the nested order; the input embedding and the MLP projections it keeps in fp32
(`keep_fp32`) share the fp32 model's storage. Switching to it only changes which model `active` returns.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pruning_utils.model.arch import (
    decoder_layers,
    head_channels,
    head_dim,
    layer_shape,
    proj,
    set_decoder_layers,
    set_layer_index,
    set_mlp_width,
    set_proj,
    set_query_heads,
)
from pruning_utils.model.linears import is_int8_tensor
from pruning_utils.prune.scores import Scores, shape_mismatch

KV_SINK_TOKENS = 4  # first tokens every window keeps: attention mass piles up on them (StreamingLLM)
LEVEL_KINDS = ("none", "kv", "heads", "ffn", "layers", "int8")


# ------------------------------------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class Level:
    """One pruning level: fractions of query heads / MLP neurons / decoder layers removed, and a KV window (0: none)."""

    name: str
    heads: float = 0.0
    ffn: float = 0.0
    layers: float = 0.0
    kv: int = 0
    int8: bool = False


def parse_levels(text: str) -> list[Level]:
    """Return the levels of 'none,kv:24,ffn:0.3,heads:0.34+ffn:0.5,layers:0.2' (the first must be 'none')."""
    levels = []
    for spec in [s.strip() for s in str(text).split(",") if s.strip()]:
        values: dict = {}
        for part in spec.split("+"):
            kind, _, amount = part.partition(":")
            if kind == "int8" and amount == "":
                values["int8"] = True
                continue
            if kind not in LEVEL_KINDS or (kind in ("none", "int8")) != (amount == ""):
                raise ValueError(f"bad level part '{part}' in '{spec}'; write kind:amount with kind one of "
                                 f"{', '.join(LEVEL_KINDS[1:])} (e.g. ffn:0.3, kv:24), or 'none'")
            if kind == "none":
                continue
            value = int(amount) if kind == "kv" else float(amount)
            if (kind == "kv" and value < 1) or (kind != "kv" and not 0 <= value < 1):
                raise ValueError(f"level '{spec}': {kind} must be " + ("a window of >= 1 tokens" if kind == "kv"
                                                                       else "a removed fraction in [0, 1)"))
            values[kind] = value
        if values.get("int8") and len(values) > 1:
            raise ValueError(f"level '{spec}': int8 is a level of its own (the quantized unpruned model); "
                             "it does not combine with kv / heads / ffn / layers")
        levels.append(Level(spec, **values))
    if not levels or levels[0] != Level("none"):
        raise ValueError(f"levels '{text}' must start with 'none' (the unpruned model every prompt is restored to)")
    if len({lv.name for lv in levels}) != len(levels):
        raise ValueError(f"levels '{text}' repeat a level")
    return levels


# --------------------------------------------------------------------------------------------- prefix linears


class PrefixLinear(nn.Module):
    """A Linear whose active part is a prefix of its weight: the first `size` output rows or input columns.

    `groups=(n_kv, head_dim)` marks q_proj / o_proj stored rank-major: the output (q) or input (o) is permuted
    between rank-major and the attention code's group-major head order.
    """

    def __init__(self, linear: nn.Linear, axis: str, groups: tuple[int, int] | None = None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: no copy
        self.axis, self.groups = axis, groups
        self.full = linear.weight.shape[0 if axis == "rows" else 1]
        self.size = self.full
        self.refits: dict[int, tuple[Tensor, Tensor | None]] = {}  # cols only: width -> refit (weight, bias)

    @property
    def out_features(self) -> int:
        return self.size if self.axis == "rows" else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.size if self.axis == "cols" else self.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.axis == "cols":
            if self.groups:
                x = _swap_heads(x, self.groups, to_rank_major=True)
            fit = self.refits.get(self.size)
            if fit is not None:
                return F.linear(x, fit[0], fit[1])
            return F.linear(x, self.weight[:, :self.size], self.bias)
        y = F.linear(x, self.weight[:self.size], None if self.bias is None else self.bias[:self.size])
        return _swap_heads(y, self.groups, to_rank_major=False) if self.groups else y

    def linear(self) -> nn.Linear:
        """Return a plain nn.Linear holding the active part (a copy; used to compare with surgery)."""
        w = self.weight[:self.size] if self.axis == "rows" else self.weight[:, :self.size]
        b = self.bias
        if self.axis == "cols" and self.size in self.refits:
            w, b = self.refits[self.size][0], self.refits[self.size][1] if self.bias is not None else None
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None, dtype=w.dtype, device=w.device)
        out.weight.data.copy_(w)
        if self.bias is not None:
            out.bias.data.copy_(b[:self.size] if self.axis == "rows" else b)
        return out


def _swap_heads(x: Tensor, groups: tuple[int, int], to_rank_major: bool) -> Tensor:
    n_kv, hd = groups
    per_group = x.shape[-1] // (n_kv * hd)
    if per_group == 1 or n_kv == 1:
        return x  # one head per group (or one group): both orders agree
    shape = (per_group, n_kv, hd) if not to_rank_major else (n_kv, per_group, hd)
    return x.unflatten(-1, shape).transpose(-3, -2).flatten(-3)


# ------------------------------------------------------------------------------------------------ nested model


class NestedModel:
    """A model whose heads and neurons were reordered by importance so that each `Level` is a prefix slice.

    `scores` (one criterion, higher = more important; of this model's own heads and neurons, so a pruned checkpoint's
    are `scores.restrict_scores` of its source model's) orders heads within each KV group and neurons within each
    layer; `layer_scores` (one value per layer, higher = more important) chooses the layers a `layers:` level skips
    (never the first or the last). The model is changed in place; `unnest()` undoes it.
    """

    def __init__(self, model, scores: Scores, levels: list[Level] | str = "none", layer_scores: Tensor | None = None,
                 grams=None, ridge_ratio: float = 1e-2, int8_kw: dict | None = None):
        self.model = model
        self.levels = {lv.name: lv for lv in (parse_levels(levels) if isinstance(levels, str) else levels)}
        self.hd = head_dim(model)
        self.layers = list(decoder_layers(model))
        cfg = model.config
        self._config = {k: getattr(cfg, k, None) for k in ("num_attention_heads", "intermediate_size",
                                                           "num_hidden_layers", "layer_types", "max_window_layers")}
        self.shapes = [layer_shape(layer, self.hd) for layer in self.layers]
        problem = shape_mismatch(scores, [s.n_heads for s in self.shapes], [s.intermediate for s in self.shapes])
        if problem:
            raise ValueError(f"scores '{scores.criterion}' do not fit the model ({problem}); for a pruned checkpoint, "
                             "restrict the scores of the model it was pruned from with "
                             "scores.restrict_scores(scores, model.pruning_plan)")
        self.head_order, self.neuron_order = [], []
        for li, shape in enumerate(self.shapes):
            group = shape.n_heads // shape.n_kv_heads
            s = scores.heads[li].float()
            ranked = [sorted(range(g * group, (g + 1) * group), key=lambda h: (-s[h].item(), h))
                      for g in range(shape.n_kv_heads)]
            self.head_order.append([ranked[g][r] for r in range(group) for g in range(shape.n_kv_heads)])
            self.neuron_order.append(torch.argsort(-scores.neurons[li].float(), stable=True))
        from pruning_utils.measure.metrics import trim_heap

        self.int8_model = self._build_int8(int8_kw or {}) if any(lv.int8 for lv in self.levels.values()) else None
        for layer, shape, heads, neurons in zip(self.layers, self.shapes, self.head_order, self.neuron_order):
            self._install(layer, shape, heads, neurons)
        trim_heap()  # the INT8 copy's per-layer up-casts and the reordered weights leave freed heap resident
        if self.int8_model is not None:
            self._share_fp32()
        if layer_scores is not None and len(layer_scores) != len(self.layers):
            raise ValueError(f"layer_scores has {len(layer_scores)} values, the model {len(self.layers)} layers")
        self.layer_scores = layer_scores
        if any(lv.layers for lv in self.levels.values()) and layer_scores is None:
            raise ValueError("a 'layers:' level needs layer_scores (e.g. depth.score_layers(model, windows).scores)")
        self.current = "none"
        self.refit_s = self._refit(grams, ridge_ratio) if grams is not None else 0.0

    @torch.no_grad()
    def _build_int8(self, int8_kw: dict):
        """Return the INT8 copy of the unpruned model, its MLP neurons in the nested order (the same function); the
        lookup table stays the fp32 model's (shared), so only the linears are quantized. Built one layer at a time
        (`quantize_int8_by_layer`) unless smoothing runs the whole copy on calibration windows."""
        from pruning_utils.compress.quantize import INT8_MODE, quantize_int8, quantize_int8_by_layer

        def reorder(li: int, layer) -> None:
            order = self.neuron_order[li]
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                lin = proj(layer, name)
                lin.weight.data = lin.weight.data.index_select(dim, order)
                if dim == 0 and lin.bias is not None:
                    lin.bias.data = lin.bias.data.index_select(0, order)

        if int8_kw.get("smooth_windows") is None:
            return quantize_int8_by_layer(self.model, int8_kw.get("mode", INT8_MODE),
                                          int8_kw.get("keep_fp32", ()), prepare=reorder)
        import copy

        m8 = copy.deepcopy(self.model)
        for li, layer in enumerate(decoder_layers(m8)):
            reorder(li, layer)
        m8 = quantize_int8(m8, inplace=True, **{"embedding": False, **int8_kw})  # mode / smoothing / fp32 projections
        m8.set_input_embeddings(self.model.get_input_embeddings())  # shared, not copied
        return m8

    def _fp32_pairs(self):
        """Yield (INT8-copy module, nested PrefixLinear) of the MLP projections the INT8 copy keeps in fp32."""
        for layer8, layer in zip(decoder_layers(self.int8_model), self.layers):
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin8 = proj(layer8, name)
                if not is_int8_tensor(lin8.weight):
                    yield lin8, proj(layer, name)

    @torch.no_grad()
    def _share_fp32(self) -> None:
        """Point the INT8 copy's unchanged fp32 projections at the nested model's weights (no second copy)."""
        for lin8, full in self._fp32_pairs():
            if lin8.weight.shape == full.weight.shape and torch.equal(lin8.weight, full.weight) and \
                    (lin8.bias is None or torch.equal(lin8.bias, full.bias)):
                lin8.weight, lin8.bias = full.weight, full.bias

    @torch.no_grad()
    def _refit(self, grams, ridge_ratio: float) -> float:
        """Store the lstsq refit of o_proj / down_proj at every width a level uses (module docstring); seconds."""
        from pruning_utils.model.stats import GramStats
        from pruning_utils.prune.reconstruction import reconstruct_linear

        t0 = time.perf_counter()
        pruned = [lv for lv in self.levels.values() if not lv.int8]
        for li, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            head_sizes = {self.heads_per_group(lv, li) * shape.n_kv_heads * self.hd for lv in pruned}
            for name, order, sizes in (("o_proj", head_channels(self.head_order[li], self.hd), head_sizes),
                                       ("down_proj", self.neuron_order[li], {self.width(lv, li) for lv in pruned})):
                pl = proj(layer, name)
                sizes.discard(pl.full)
                if not sizes:
                    continue
                if (li, name) not in grams:
                    raise ValueError(f"grams lack ({li}, '{name}'); collect them with "
                                     "reconstruction.collect_grams(model, windows) on the unpruned model")
                st = grams[(li, name)]
                nested = GramStats(st.gram[order][:, order], st.sum[order], st.count)  # in the nested column order
                for size in sorted(sizes):
                    w, b = reconstruct_linear(pl.weight, pl.bias, torch.arange(size), nested, "lstsq", ridge_ratio)
                    pl.refits[size] = (w.contiguous(), b)
        return time.perf_counter() - t0

    @property
    def active(self):
        """Return the model that serves the active level (the INT8 copy for `int8`, else the nested model)."""
        return self.int8_model if self.levels[self.current].int8 else self.model

    def _install(self, layer, shape, heads: list[int], neurons: Tensor) -> None:
        rows = head_channels(heads, self.hd)
        groups = (shape.n_kv_heads, self.hd)
        with torch.no_grad():
            for name, axis, idx in (("q_proj", "rows", rows), ("o_proj", "cols", rows), ("gate_proj", "rows", neurons),
                                    ("up_proj", "rows", neurons), ("down_proj", "cols", neurons)):
                lin = proj(layer, name)
                lin.weight.data = lin.weight.data.index_select(0 if axis == "rows" else 1, idx)
                if axis == "rows" and lin.bias is not None:
                    lin.bias.data = lin.bias.data.index_select(0, idx)
                set_proj(layer, name, PrefixLinear(lin, axis, groups if name in ("q_proj", "o_proj") else None))

    # ------------------------------------------------------------------------------------------ what a level keeps

    def heads_per_group(self, level: Level, li: int) -> int:
        """Return the query heads per KV group a level keeps in layer `li` (at least one)."""
        group = self.shapes[li].n_heads // self.shapes[li].n_kv_heads
        return max(1, group - round(level.heads * group))

    def width(self, level: Level, li: int) -> int:
        """Return the MLP neurons a level keeps in layer `li` (at least one)."""
        full = self.shapes[li].intermediate
        return max(1, full - round(level.ffn * full))

    def active_layers(self, level: Level) -> list[int]:
        """Return the decoder layers a level runs (the first and the last always)."""
        n = len(self.layers)
        drop = min(round(level.layers * n), max(n - 2, 0))
        if not drop:
            return list(range(n))
        middle = sorted(range(1, n - 1), key=lambda i: (float(self.layer_scores[i]), i))
        return sorted(set(range(n)) - set(middle[:drop]))

    def kept(self, name: str) -> dict:
        """Return `{heads, neurons, layers}`: the original indices a level keeps (what `surgery` needs to build it)."""
        level = self.levels[name]
        heads, neurons = {}, {}
        for li, shape in enumerate(self.shapes):
            heads[li] = sorted(self.head_order[li][:self.heads_per_group(level, li) * shape.n_kv_heads])
            neurons[li] = sorted(self.neuron_order[li][:self.width(level, li)].tolist())
        return {"heads": heads, "neurons": neurons, "layers": self.active_layers(level)}

    # ---------------------------------------------------------------------------------------------- switching

    def switch(self, name: str) -> float:
        """Make level `name` the active one; returns the seconds the switch took."""
        if name not in self.levels:
            raise KeyError(f"unknown level '{name}'; known: {', '.join(self.levels)}")
        t0 = time.perf_counter()
        level = self.levels[name]
        if level.int8:  # the fp32 model goes back to its full level; the INT8 copy serves
            level = self.levels["none"]
        for li, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            n_heads = self.heads_per_group(level, li) * shape.n_kv_heads
            proj(layer, "q_proj").size = proj(layer, "o_proj").size = n_heads * self.hd
            set_query_heads(layer, n_heads, shape.n_kv_heads)
            width = self.width(level, li)
            for n in ("gate_proj", "up_proj", "down_proj"):
                proj(layer, n).size = width
            set_mlp_width(layer, width)
        self._set_layers(self.active_layers(level))
        self.current = name
        return time.perf_counter() - t0

    def restore(self) -> float:
        """Switch back to the unpruned level; returns the seconds it took."""
        return self.switch("none")

    def _set_layers(self, active: list[int]) -> None:
        cfg = self.model.config
        if len(decoder_layers(self.model)) == len(active) == len(self.layers):
            return
        set_decoder_layers(self.model, nn.ModuleList([self.layers[i] for i in active]))
        for new, old in enumerate(active):  # the KV cache is indexed by position in the list
            set_layer_index(self.layers[old], new)
        cfg.num_hidden_layers = len(active)
        if self._config["layer_types"] is not None:
            cfg.layer_types = [self._config["layer_types"][i] for i in active]
        if self._config["max_window_layers"] is not None:
            cfg.max_window_layers = min(self._config["max_window_layers"], len(active))

    def shares_prefill(self, name: str | None = None) -> bool:
        """Return whether a level (default the active one) can decode on from the unpruned model's prompt cache: every
        level that keeps all decoder layers (the cache holds one entry per layer)."""
        return not self.levels[name or self.current].layers

    def kv_window(self, name: str | None = None) -> int:
        """Return the KV-cache window of a level (0: no cap); default the active level."""
        return self.levels[name or self.current].kv

    def unnest(self):
        """Put the original head / neuron order and plain nn.Linear modules back (bit-exact); returns the model."""
        self.restore()
        with torch.no_grad():
            if self.int8_model is not None:  # it keeps the nested order: give it back its own copy of shared weights
                for lin8, full in self._fp32_pairs():
                    if lin8.weight is full.weight:
                        lin8.weight = nn.Parameter(full.weight.detach().clone(), requires_grad=False)
                        if full.bias is not None:
                            lin8.bias = nn.Parameter(full.bias.detach().clone(), requires_grad=False)
            for li, layer in enumerate(self.layers):
                inv_heads = head_channels(torch.argsort(torch.tensor(self.head_order[li])).tolist(), self.hd)
                inv_neurons = torch.argsort(self.neuron_order[li])
                for name, axis in (("q_proj", "rows"), ("o_proj", "cols"), ("gate_proj", "rows"), ("up_proj", "rows"),
                                   ("down_proj", "cols")):
                    pl = proj(layer, name)
                    inv = inv_heads if name in ("q_proj", "o_proj") else inv_neurons
                    w, b = pl.weight, pl.bias
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
                    lin.weight = w
                    lin.bias = b
                    w.data = w.data.index_select(0 if axis == "rows" else 1, inv)
                    if axis == "rows" and b is not None:
                        b.data = b.data.index_select(0, inv)
                    set_proj(layer, name, lin)
        for k, v in self._config.items():
            if v is not None:
                setattr(self.model.config, k, v)
        return self.model

    def memory(self) -> dict:
        """Return the model's parameter bytes and what the nesting adds
        (index tensors only: the views share storage)."""
        every = list(self.model.parameters()) + [p for layer in self.layers for p in layer.parameters()]  # skipped too
        params = {p.data_ptr(): p.numel() * p.element_size() for p in every}
        extra = sum(o.numel() * o.element_size() for o in self.neuron_order) + sum(8 * len(h) for h in self.head_order)
        refit = sum(t.numel() * t.element_size() for layer in self.layers for name in ("o_proj", "down_proj")
                    for fit in getattr(proj(layer, name), "refits", {}).values() for t in fit if t is not None)
        int8 = 0
        if self.int8_model is not None:
            from pruning_utils.measure.metrics import model_bytes

            shared = {p.data_ptr() for p in self.model.parameters()}
            int8 = model_bytes(self.int8_model) - sum(p.numel() * p.element_size() for p in self.int8_model.parameters()
                                                      if not is_int8_tensor(p) and p.data_ptr() in shared)
        total = sum(params.values())
        return {"param_bytes": total, "nesting_bytes": extra, "refit_bytes": refit, "int8_bytes": int8,
                "overhead_ratio": (total + extra + refit + int8) / total}


# ------------------------------------------------------------------------------------------- decoding with a budget


def cache_bytes(cache) -> int:
    """Return the bytes held by a DynamicCache's keys and values."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, Tensor))


def trim_cache(cache, window: int, sinks: int = KV_SINK_TOKENS) -> None:
    """Keep the first `sinks` and the last `window` cached tokens of every layer (in place)."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, Tensor) and keys.shape[-2] > sinks + window:
            layer.keys = torch.cat([keys[..., :sinks, :], keys[..., -window:, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :sinks, :], layer.values[..., -window:, :]], dim=-2)


def cache_kw(model) -> str:
    """Return the name of the keyword under which the model's forward takes its KV cache."""
    import inspect

    # transformers 5.x renames `past_key_values` to `cache` (the old name warns from 5.2x on)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill(model, prompt_ids: Tensor) -> dict:
    """Run the prompt [1, n] through `model` once: `{cache, logits, seconds}` (last position's logits) for `decode`.

    Notebook 05 prefills every prompt with the unpruned model: its logits give the first-token entropy feature, and
    the level chosen from it decodes on from that cache (`decode(prefilled=...)`), so the feature costs no forward.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    logits = model(input_ids=prompt_ids.to(next(model.parameters()).device), **{cache_kw(model): cache},
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return {"cache": cache, "logits": logits, "seconds": time.perf_counter() - t0, "length": prompt_ids.shape[1]}


def prefilled_cache(prefilled: dict):
    """Return a copy of a `prefill`'s cache to decode on from (the original stays reusable)."""
    import copy

    return copy.deepcopy(prefilled["cache"])


@torch.inference_mode()
def decode(model, prompt_ids: Tensor, max_new_tokens: int = 32, kv_window: int = 0, eos_token_id: int | None = None,
           forced: Tensor | None = None, prefilled: dict | None = None) -> dict:
    """Greedy decode of one prompt [1, n] with an optional KV window; with `forced` tokens, score them instead.

    Returns `ids` (new tokens), `seconds`, `tokens_per_s`, `cache_tokens_max`, `cache_bytes_max` and, when `forced`
    is given, `nll` (mean negative log-likelihood of the forced tokens) and `ppl`. The prompt is prefilled at once,
    then the cache is trimmed to the window before every further step. `prefilled` (from `prefill`, possibly by
    another model of the same architecture) replaces the prefill: a copy of its cache is used and its seconds are
    counted in `seconds`, so the first new token is the prefilling model's.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    kw = cache_kw(model)
    steps = max_new_tokens if forced is None else forced.shape[-1]
    pos = ids.shape[1]
    out_ids, nll, peak_tokens, peak_bytes = [], 0.0, 0, 0
    t0 = time.perf_counter()
    if prefilled is not None:
        if prefilled["length"] != pos:
            raise ValueError(f"the prefilled cache holds {prefilled['length']} prompt tokens, the prompt has {pos}")
        cache, logits = prefilled_cache(prefilled), prefilled["logits"]
        t0 -= prefilled["seconds"]
    else:
        cache = DynamicCache()
        logits = model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(steps):
        if forced is not None:
            token = forced[..., step].reshape(1, 1).to(device)
            nll -= F.log_softmax(logits.float(), -1)[0, token.item()].item()
        else:
            token = logits.argmax(-1, keepdim=True)
            out_ids.append(token.item())
            if eos_token_id is not None and token.item() == eos_token_id:
                break
        if kv_window:
            trim_cache(cache, kv_window)
        peak_tokens = max(peak_tokens, cache.get_seq_length())
        peak_bytes = max(peak_bytes, cache_bytes(cache))
        if step == steps - 1:
            break  # the last token's logits are not needed
        logits = model(input_ids=token, **{kw: cache}, use_cache=True,
                       position_ids=torch.tensor([[pos]], device=device)).logits[:, -1]
        pos += 1
    seconds = time.perf_counter() - t0
    n = len(out_ids) if forced is None else steps
    result = {"ids": out_ids, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9),
              "cache_tokens_max": peak_tokens, "cache_bytes_max": peak_bytes}
    if forced is not None:
        result.update(nll=nll / max(steps, 1), ppl=math.exp(nll / max(steps, 1)))
    return result
