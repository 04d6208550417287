"""The calibration passes importance criteria share: each runs at most once per `Passes` and serves every criterion.

- `forward_stats()`: ONE forward pass with pre-hooks on the inputs of `o_proj` / `down_proj`, streaming per-channel
  moments (and per-window sums for TF-IDF): activation, fluctuation, tfidf, tfidf_topic.
- `grad_stats()`: ONE backward pass over the windows: Taylor (w · dL/dw over what a head / neuron owns) and the
  first-order neuron half of semantic (a · dL/da at the input of `down_proj`).
- `semantic_heads()`: exact per-head ablations, replaying only the layers after the ablated one;
  `semantic_refit_heads()` the same with each head's removal followed by the closed-form lstsq refit of its o_proj.
- `grams()`: the one-shot o_proj / down_proj Grams of the windows (as `reconstruction.collect_grams`), on the host,
  for semantic_refit.
- `backward_batches()`: the backward pass itself, shared with `fisher.output_fisher`.

A criterion receives the `Passes` object explicitly (`importance.compute_importance` builds one).

Offload mode (`compute_device`, the model kept on the host): `forward_stats()` walks the model one decoder layer
at a time on the compute device (`calibration.walk_layers`), giving the same moments as the one-pass forward. The
gradient pass and the head ablations need every layer at once and refuse offload mode with what to do instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pruning_utils.model import calibration
from pruning_utils.model.arch import (
    HEAD_INPUT,
    NEURON_INPUT,
    base_model,
    decoder_layers,
    final_norm,
    head_dim,
    layer_shapes,
    owned_parameters,
    owned_sums,
    proj,
)
from pruning_utils.model.hooks import hooks, masked
from pruning_utils.model.stats import Moments
from pruning_utils.progress import progress


@dataclass
class ForwardStats:
    """Moments of the inputs of every layer's o_proj (`attn`) and down_proj (`mlp`),
    tokens and hidden sums per window."""

    attn: list[Moments]
    mlp: list[Moments]
    doc_tokens: Tensor  # [n_windows] tokens seen per window (a window is a TF-IDF document)
    doc_hidden: Tensor | None  # [n_windows, hidden] sums of last hidden states (topic clustering)


@dataclass
class Passes:
    """The passes of one importance computation over `windows` [n, seq_len]; what is needed is declared up front.

    `docs`: keep per-window channel sums (TF-IDF); `hidden`: keep per-window last hidden states (topics);
    `taylor` / `neuron_grads`: what the backward pass must produce.
    """

    model: object
    windows: Tensor
    batch_size: int = 4
    seed: int = 0
    docs: bool = False
    hidden: bool = False
    taylor: bool = False
    neuron_grads: bool = False
    down_fisher: bool = False  # the loss's Fisher at every down_proj output (semantic_refit's neurons)
    semantic_max_windows: int | None = 16
    semantic_seq_len: int | None = None
    show_progress: bool = True
    compute_device: torch.device | str | None = None  # offload mode: where each layer runs (the model stays put)
    cache: dict = field(default_factory=dict)  # criterion name -> Scores, filled by importance
    _forward: ForwardStats | None = None
    _grad: dict | None = None
    _semantic_heads: list[Tensor] | None = None
    _refit_heads: dict = field(default_factory=dict)  # (ridge_ratio, windows) -> per-layer post-refit KL
    _grams: dict | None = None

    def __post_init__(self):
        if self.windows.dim() != 2:
            raise ValueError(f"windows must be a LongTensor [n, seq_len], got shape {tuple(self.windows.shape)}")
        self.batch_size = max(1, int(self.batch_size))
        limit = self.semantic_max_windows
        if limit is not None and int(limit) < 1:
            raise ValueError(f"semantic_max_windows must be >= 1 (or None for all windows), got {limit}")
        self.device = calibration.model_device(self.model)

    def refuse_offload(self, what: str, criteria: str) -> None:
        if self.compute_device is not None:
            raise RuntimeError(
                f"{what} ({criteria}) needs the whole model on one device, which offload mode (the model on the "
                f"host, one layer at a time on {self.compute_device}) does not provide: drop {criteria} from "
                "CRITERIA, or run with OFFLOAD='off' on a device that holds the model")

    @property
    def n_semantic_windows(self) -> int:
        """Return how many windows the head ablations use."""
        n = len(self.windows)
        return n if self.semantic_max_windows is None else min(int(self.semantic_max_windows), n)

    # -- forward statistics -------------------------------------------------------------------

    @torch.inference_mode()
    def forward_stats(self) -> ForwardStats:
        """Return the moments of every o_proj / down_proj input from one forward pass (LM head skipped)."""
        if self._forward is not None:
            return self._forward
        if self.compute_device is not None:
            self._forward = self._forward_stats_offloaded()
            return self._forward
        model, dev = self.model, self.device
        shapes, hd = layer_shapes(model), head_dim(model)
        n_docs = len(self.windows)
        nd = n_docs if self.docs else 0
        attn = [Moments(s.n_heads * hd, dev, nd) for s in shapes]
        mlp = [Moments(s.intermediate, dev, nd) for s in shapes]
        doc_tokens = torch.zeros(n_docs, device=dev)
        doc_hidden = None
        current: dict[str, Tensor] = {}

        def hook(stats: Moments):
            return lambda mod, args: stats.add(args[0], current["doc"])

        specs = []
        for layer, a, m in zip(decoder_layers(model), attn, mlp):
            specs += [(proj(layer, HEAD_INPUT), "pre", hook(a)), (proj(layer, NEURON_INPUT), "pre", hook(m))]
        starts = range(0, n_docs, self.batch_size)
        with hooks(*specs):
            for start in progress(starts, desc="importance: forward statistics", disable=not self.show_progress):
                ids = self.windows[start:start + self.batch_size].to(dev)
                current["doc"] = torch.arange(start, start + len(ids), device=dev)
                out = base_model(model)(input_ids=ids, use_cache=False)  # the LM head is not needed
                doc_tokens[start:start + len(ids)] += ids.shape[1]
                if self.hidden:
                    h = out.last_hidden_state.float().sum(1)
                    if doc_hidden is None:
                        doc_hidden = torch.zeros(n_docs, h.shape[-1], device=dev)
                    doc_hidden[start:start + len(ids)] += h
        self._forward = ForwardStats(attn, mlp, doc_tokens, doc_hidden)
        return self._forward

    @torch.inference_mode()
    def _forward_stats_offloaded(self) -> ForwardStats:
        """Return `forward_stats()` computed one layer at a time on `compute_device`, the results on the host."""
        model, home, dev = self.model, self.device, self.compute_device
        shapes, hd = layer_shapes(model), head_dim(model)
        n_docs = len(self.windows)
        nd = n_docs if self.docs else 0
        starts = list(range(0, n_docs, self.batch_size))
        attn, mlp = [], []
        doc_tokens = torch.zeros(n_docs, device=home)
        for start in starts:
            doc_tokens[start:start + self.batch_size] += self.windows.shape[1]
        doc_hidden = None
        last = len(shapes) - 1
        walk = calibration.walk_layers(model, self.windows, self.batch_size, device=dev)
        for li, layer, hidden, calls in progress(walk, total=len(shapes),
                                                  desc="importance: forward statistics (offload)",
                                                  disable=not self.show_progress):
            a, m = Moments(shapes[li].n_heads * hd, dev, nd), Moments(shapes[li].intermediate, dev, nd)
            current: dict[str, Tensor] = {}
            specs = [(proj(layer, HEAD_INPUT), "pre", lambda mod, args: a.add(args[0], current["doc"])),
                     (proj(layer, NEURON_INPUT), "pre", lambda mod, args: m.add(args[0], current["doc"]))]
            outs = []
            with hooks(*specs):
                for start, h, call in zip(starts, hidden, calls):
                    current["doc"] = torch.arange(start, start + len(h), device=dev)
                    out = calibration.run_layer(layer, h, call)
                    if self.hidden and li == last:
                        outs.append((start, out))
            attn.append(a.to(home))
            mlp.append(m.to(home))
            if outs:  # last_hidden_state of the one-pass forward: the final norm of the last layer's outputs
                with calibration.on_device(final_norm(model), dev) as norm:
                    for start, out in outs:
                        h = norm(out).float().sum(1).to(home)
                        if doc_hidden is None:
                            doc_hidden = torch.zeros(n_docs, h.shape[-1], device=home)
                        doc_hidden[start:start + len(h)] += h
        return ForwardStats(attn, mlp, doc_tokens, doc_hidden)

    # -- gradient pass ------------------------------------------------------------------------

    def grad_stats(self) -> dict:
        """Return {'taylor': (heads, neurons)}, {'semantic': neurons} and/or {'down_fisher': per-layer Fisher} from one
        backward pass over the windows."""
        if self._grad is not None:
            return self._grad
        self.refuse_offload("the gradient pass", "taylor, semantic, semantic_refit and mix")
        model, dev = self.model, self.device
        layers, shapes, hd = decoder_layers(model), layer_shapes(model), head_dim(model)
        owned = [p for layer in layers for p in owned_parameters(layer)]
        params = list(model.parameters())
        saved = [(p, p.grad) for p in params]
        sem = [torch.zeros(s.intermediate, device=dev) for s in shapes]

        def grab(acc: Tensor):
            def pre(mod, args):
                x = args[0]
                if x.requires_grad:  # a * dL/da summed over tokens: the first-order loss change of zeroing a
                    def on_grad(g: Tensor, x: Tensor = x) -> None:
                        acc.add_((x.detach().float() * g.float()).sum((0, 1)))
                    x.register_hook(on_grad)
            return pre

        specs = ([(proj(layer, NEURON_INPUT), "pre", grab(acc)) for layer, acc in zip(layers, sem)]
                 if self.neuron_grads else [])
        fisher: list[Tensor | None] = [None] * len(layers)

        def out_grad(li: int):  # Σ g gᵀ of the gradient at the down_proj output (the loss's Fisher there)
            def fwd(mod, args, y):
                def on_grad(g: Tensor) -> None:
                    g = g.reshape(-1, g.shape[-1]).double()
                    if fisher[li] is None:
                        fisher[li] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device)
                    fisher[li].addmm_(g.T, g)
                if y.requires_grad:
                    y.register_hook(on_grad)
            return fwd

        if self.down_fisher:
            specs += [(proj(layer, NEURON_INPUT), "forward", out_grad(li)) for li, layer in enumerate(layers)]
        w = self.windows
        try:
            for p in params:
                p.grad = None
            with hooks(*specs):
                # Sum of per-token losses / all tokens: the accumulated gradient is that of the mean calibration loss.
                backward_batches(model, w, self.batch_size, owned if self.taylor else (),
                                 1.0 / (w.shape[0] * (w.shape[1] - 1)), "importance: gradients", self.show_progress)
            result: dict = {}
            if self.taylor:
                result["taylor"] = _taylor_from_grads(layers, hd)
            if self.neuron_grads:
                result["semantic"] = [s.abs().cpu() for s in sem]
            if self.down_fisher:  # gradients of the MEAN loss: sums of g gᵀ / tokens²
                result["down_fisher"] = [f.cpu() for f in fisher]
        finally:
            for p, grad in saved:
                p.grad = grad
        self._grad = result
        return result

    # -- head ablation ------------------------------------------------------------------------

    @torch.inference_mode()
    def semantic_heads(self) -> list[Tensor]:
        """Return per-head KL + max(dloss, 0) (nats per predicted token) from one ablated pass per head."""
        if self._semantic_heads is None:
            kl, dloss = self._head_ablations(None, self.n_semantic_windows)
            self._semantic_heads = [(k + d.clamp(min=0)).float() for k, d in zip(kl, dloss)]
        return self._semantic_heads

    def semantic_refit_heads(self, layer_refits: Callable[[int], list[tuple[Tensor, Tensor | None]]], key,
                             n_windows: int) -> list[Tensor]:
        """Return per-head KL(full || removed) per predicted token with each head's o_proj replaced in turn by
        `layer_refits(layer)[head]` (weight, bias): the head removed and the rest refit (`importance.semantic_refit`),
        over the first `n_windows` windows cut to `semantic_seq_len`; cached under `key`."""
        if key not in self._refit_heads:
            self._refit_heads[key] = [k.float() for k in self._head_ablations(layer_refits, n_windows)[0]]
        return self._refit_heads[key]

    def grams(self) -> dict:
        """Return the one-shot GramStats of every o_proj / down_proj input over the windows (computed once), kept on
        the host: the device holds one layer's at a time (a 0.5B model's are 4 GiB in fp64)."""
        if self._grams is None:
            wanted = {li: {name: proj(layer, name) for name in (HEAD_INPUT, NEURON_INPUT)}
                      for li, layer in enumerate(decoder_layers(self.model))}
            self._grams = calibration.layerwise_grams(self.model, self.windows, wanted, self.batch_size, "cpu",
                                                      self.compute_device)
        return self._grams

    @torch.inference_mode()
    def _head_ablations(self, layer_refits, n_windows: int) -> tuple[list[Tensor], list[Tensor]]:
        """Return per-head (KL, dloss) per predicted token (float64) over the first `n_windows` windows;
        `layer_refits` None: the head zeroed; else its o_proj replaced by `layer_refits(layer)[head]`."""
        what = "semantic" if layer_refits is None else "semantic_refit"
        self.refuse_offload("the exact head ablations", f"{what} and mix")
        model, dev = self.model, self.device
        shapes = layer_shapes(model)
        # one ablated replay per head: cost is heads x tokens, so CPU runs bound the tokens (semantic_seq_len)
        w = self.windows[:max(1, min(n_windows, len(self.windows))), :self.semantic_seq_len or None]
        kl = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        dloss = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        total = sum(s.n_heads for s in shapes) * math.ceil(len(w) / self.batch_size)
        layers = decoder_layers(model)
        with progress(total=total, desc=f"importance: head ablations ({what})", disable=not self.show_progress) as bar:
            for ids in calibration.batches(w, self.batch_size, dev):
                clean, inputs = calibration.capture_batch(model, ids)
                clean_lp = _log_probs(clean[:, :-1])
                clean_p = clean_lp.exp()
                targets = ids[:, 1:]
                clean_nll = -clean_lp.gather(-1, targets[..., None]).sum()
                del clean
                for li, s in enumerate(shapes):
                    # one layer's refit weights at a time: memory is one o_proj per head, not the whole model's
                    refits = None if layer_refits is None else layer_refits(li)
                    for h in range(s.n_heads):
                        if refits is None:
                            with masked(model, heads={li: [h]}):
                                logits = calibration.replay(model, inputs, li)
                        else:
                            with _swapped(proj(layers[li], HEAD_INPUT), *refits[h]):
                                logits = calibration.replay(model, inputs, li)
                        lp = _log_probs(logits[:, :-1])
                        dloss[li][h] += float(-lp.gather(-1, targets[..., None]).sum() - clean_nll)
                        kl[li][h] += float((clean_p * (clean_lp - lp)).sum())
                        bar.update(1)
        n = len(w) * (w.shape[1] - 1)
        return [k / n for k in kl], [d / n for d in dloss]

def _log_probs(logits: Tensor) -> Tensor:
    """Return log-softmax in at least fp32 (fp16 / bf16 logits are promoted; a float64 model stays float64)."""
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)


class _swapped:
    """Context: a linear layer's weight (and bias, when given) replaced, then restored."""

    def __init__(self, module, weight: Tensor, bias: Tensor | None):
        self.module, self.weight, self.bias = module, weight, bias

    def __enter__(self):
        self.saved = (self.module.weight.data, None if self.module.bias is None else self.module.bias.data)
        self.module.weight.data = self.weight
        if self.bias is not None:
            self.module.bias.data = self.bias
        return self.module

    def __exit__(self, *exc):
        self.module.weight.data = self.saved[0]
        if self.saved[1] is not None:
            self.module.bias.data = self.saved[1]
        return False


def _taylor_from_grads(layers, hd: int) -> tuple[list[Tensor], list[Tensor]]:
    def wg(p) -> Tensor:
        return (p.detach().float() * p.grad.float()) if p.grad is not None else torch.zeros_like(p, dtype=torch.float)

    heads, neurons = [], []
    for layer in layers:
        s, n = owned_sums(layer, hd, wg)
        heads.append(s.abs().cpu())
        neurons.append(n.abs().cpu())
    return heads, neurons


def backward_batches(model, windows: Tensor, batch_size: int, trainable=(), scale: float = 1.0,
                     desc: str = "gradients", show_progress: bool = True) -> None:
    """Run forward and backward of the windows' summed next-token loss (times `scale`), batch by batch, with
    gradients accumulated only on the `trainable` parameters; without any, the activations carry the gradient from
    the embeddings on (for hooks on activations). Every parameter's requires_grad flag is restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    dev = calibration.model_device(model)
    trainable = list(trainable)
    try:
        for p in params:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        with torch.enable_grad():
            for ids in progress(list(calibration.batches(windows, batch_size, dev)), desc=desc,
                                disable=not show_progress):
                if trainable:
                    out = model(input_ids=ids, use_cache=False)
                else:
                    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    out = model(inputs_embeds=emb, use_cache=False)
                loss = token_nll(out.logits, ids).sum() * scale
                loss.backward()
                del out, loss
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Return the next-token negative log-likelihood of every predicted position, [batch, seq_len - 1]."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
