"""The calibration passes importance criteria share: each runs at most once per `Passes` and serves every criterion.

- `forward_stats()`: ONE forward pass with pre-hooks on the inputs of `o_proj` / `down_proj`, streaming per-channel
  moments (and per-window sums for TF-IDF): activation, fluctuation, tfidf, tfidf_topic.
- `grad_stats()`: ONE backward pass over the windows: Taylor (w · dL/dw over what a head / neuron owns) and the
  first-order neuron half of semantic (a · dL/da at the input of `down_proj`).
- `semantic_heads()`: exact per-head ablations, replaying only the layers after the ablated one.

A criterion receives the `Passes` object explicitly (`importance.compute_importance` builds one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import calibration
from .arch import (HEAD_INPUT, NEURON_INPUT, base_model, decoder_layers, head_dim, layer_shapes, owned_parameters,
                   owned_sums, proj)
from .hooks import hooks, masked
from .progress import progress
from .stats import Moments


@dataclass
class ForwardStats:
    """Moments of the inputs of every layer's o_proj (`attn`) and down_proj (`mlp`), tokens and hidden sums per window."""

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
    semantic_max_windows: int | None = 16
    semantic_seq_len: int | None = None
    show_progress: bool = True
    cache: dict = field(default_factory=dict)  # criterion name -> Scores, filled by importance
    _forward: ForwardStats | None = None
    _grad: dict | None = None
    _semantic_heads: list[Tensor] | None = None

    def __post_init__(self):
        if self.windows.dim() != 2:
            raise ValueError(f"windows must be a LongTensor [n, seq_len], got shape {tuple(self.windows.shape)}")
        self.batch_size = max(1, int(self.batch_size))
        limit = self.semantic_max_windows
        if limit is not None and int(limit) < 1:
            raise ValueError(f"semantic_max_windows must be >= 1 (or None for all windows), got {limit}")
        self.device = calibration.model_device(self.model)

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

    # -- gradient pass ------------------------------------------------------------------------

    def grad_stats(self) -> dict:
        """Return {'taylor': (heads, neurons)} and/or {'semantic': neurons} from one backward pass over the windows."""
        if self._grad is not None:
            return self._grad
        model, dev = self.model, self.device
        layers, shapes, hd = decoder_layers(model), layer_shapes(model), head_dim(model)
        owned = [p for layer in layers for p in owned_parameters(layer)]
        params = list(model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in params]
        sem = [torch.zeros(s.intermediate, device=dev) for s in shapes]

        def grab(acc: Tensor):
            def pre(mod, args):
                x = args[0]
                if x.requires_grad:  # a * dL/da summed over tokens: the first-order loss change of zeroing a
                    def on_grad(g: Tensor, x: Tensor = x) -> None:
                        acc.add_((x.detach().float() * g.float()).sum((0, 1)))
                    x.register_hook(on_grad)
            return pre

        specs = [(proj(layer, NEURON_INPUT), "pre", grab(acc)) for layer, acc in zip(layers, sem)] if self.neuron_grads else []
        w = self.windows
        n_tokens = w.shape[0] * (w.shape[1] - 1)
        try:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if self.taylor:
                for p in owned:
                    p.requires_grad_(True)
            with torch.enable_grad(), hooks(*specs):
                for ids in progress(list(calibration.batches(w, self.batch_size)), desc="importance: gradients",
                                    disable=not self.show_progress):
                    ids = ids.to(dev)
                    if self.taylor:
                        out = model(input_ids=ids, use_cache=False)
                    else:  # no weight needs a gradient: let activations carry one from the embeddings on
                        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                        out = model(inputs_embeds=emb, use_cache=False)
                    # Sum of per-token losses / all tokens: the accumulated gradient is that of the mean calibration loss.
                    loss = token_nll(out.logits, ids).sum() / n_tokens
                    loss.backward()
                    del out, loss
            result: dict = {}
            if self.taylor:
                result["taylor"] = _taylor_from_grads(layers, hd)
            if self.neuron_grads:
                result["semantic"] = [s.abs().cpu() for s in sem]
        finally:
            for p, flag, grad in saved:
                p.requires_grad_(flag)
                p.grad = grad
        self._grad = result
        return result

    # -- head ablation ------------------------------------------------------------------------

    @torch.inference_mode()
    def semantic_heads(self) -> list[Tensor]:
        """Return per-head KL + max(dloss, 0) (nats per predicted token) from one ablated pass per head."""
        if self._semantic_heads is not None:
            return self._semantic_heads
        model, dev = self.model, self.device
        shapes = layer_shapes(model)
        # one ablated replay per head: cost is heads x tokens, so CPU runs bound the tokens (semantic_seq_len)
        w = self.windows[:self.n_semantic_windows, :self.semantic_seq_len or None]
        kl = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        dloss = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        total = sum(s.n_heads for s in shapes) * math.ceil(len(w) / self.batch_size)
        with progress(total=total, desc="importance: head ablations", disable=not self.show_progress) as bar:
            for ids in calibration.batches(w, self.batch_size, dev):
                clean, inputs = calibration.capture_batch(model, ids)
                clean_lp = torch.log_softmax(clean[:, :-1].float(), -1)
                clean_p = clean_lp.exp()
                targets = ids[:, 1:]
                clean_nll = -clean_lp.gather(-1, targets[..., None]).sum()
                del clean
                for li, s in enumerate(shapes):
                    for h in range(s.n_heads):
                        with masked(model, heads={li: [h]}):
                            lp = torch.log_softmax(calibration.replay(model, inputs, li)[:, :-1].float(), -1)
                        dloss[li][h] += float(-lp.gather(-1, targets[..., None]).sum() - clean_nll)
                        kl[li][h] += float((clean_p * (clean_lp - lp)).sum())
                        bar.update(1)
        n = len(w) * (w.shape[1] - 1)
        self._semantic_heads = [(k / n + (d / n).clamp(min=0)).float() for k, d in zip(kl, dloss)]
        return self._semantic_heads


def _taylor_from_grads(layers, hd: int) -> tuple[list[Tensor], list[Tensor]]:
    def wg(p) -> Tensor:
        return (p.detach().float() * p.grad.float()) if p.grad is not None else torch.zeros_like(p, dtype=torch.float)

    heads, neurons = [], []
    for layer in layers:
        s, n = owned_sums(layer, hd, wg)
        heads.append(s.abs().cpu())
        neurons.append(n.abs().cpu())
    return heads, neurons


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Return the next-token negative log-likelihood of every predicted position, [batch, seq_len - 1]."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
