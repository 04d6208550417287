"""Importance of attention heads and MLP neurons: one registry of criteria behind one call.

`compute_importance(model, windows, ["activation", "taylor"])` returns one `Scores` per criterion
(higher = more important). Every criterion is a function with the same signature, registered in
`CRITERIA`. Criteria that need the same pass share it: all forward-only statistics (activation,
fluctuation, tfidf) come from ONE calibration pass with pre-hooks on `o_proj` / `down_proj`
that stream per-channel sums (memory never grows with tokens); taylor and the neuron half of
semantic share ONE backward pass.

Channel conventions: a head owns its `head_dim` input channels of `o_proj` (and the matching
rows of `q_proj`); a neuron is one input channel of `down_proj` (and the matching rows of
`gate_proj` / `up_proj`). K/V are shared by a KV group and are never scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .arch import decoder_layers, head_dim, layer_shapes
from .hooks import hooks, masked

SCORES_FILE = "importance.safetensors"
SUMMARY_FILE = "importance_summary.csv"


@dataclass
class Scores:
    """Per-layer importance (float32, CPU): `heads[l]` is [n_heads_l], `neurons[l]` is [intermediate_l]."""

    heads: list[Tensor]
    neurons: list[Tensor]
    criterion: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- criteria


def random(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return uniform random scores from a generator seeded with `seed` (the baseline every criterion must beat)."""
    g = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(model)
    heads = [torch.rand(s.n_heads, generator=g) for s in shapes]
    neurons = [torch.rand(s.intermediate, generator=g) for s in shapes]
    return Scores(heads, neurons, "random", {"seed": seed})


def magnitude(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return the L1 norm of the weights a head (q rows + bias, o columns) / neuron (gate, up rows + biases, down column) owns."""
    hd = head_dim(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            nh = attn.q_proj.out_features // hd
            s = attn.q_proj.weight.float().abs().view(nh, -1).sum(1)
            s += attn.o_proj.weight.float().abs().view(-1, nh, hd).sum((0, 2))
            if attn.q_proj.bias is not None:
                s += attn.q_proj.bias.float().abs().view(nh, hd).sum(1)
            n = mlp.gate_proj.weight.float().abs().sum(1) + mlp.up_proj.weight.float().abs().sum(1)
            n += mlp.down_proj.weight.float().abs().sum(0)
            for lin in (mlp.gate_proj, mlp.up_proj):
                if lin.bias is not None:
                    n += lin.bias.float().abs()
            heads.append(s.cpu())
            neurons.append(n.cpu())
    return Scores(heads, neurons, "magnitude")


def activation(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return Wanda-style structured scores: ||X_j||_2 over calibration tokens x ||W[:, j]||_2, summed over a head's channels."""
    stats = _session(model, windows, batch_size, seed, options, "activation").forward_stats()

    def channel(m: _Moments, weight: Tensor) -> Tensor:
        return m.sq_norm().sqrt() * _col_norm(weight)

    return _from_channels(model, stats, channel, "activation")


def fluctuation(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return FLAP scores: variance of input channel j over calibration tokens x ||W[:, j]||^2, summed over a head's channels."""
    stats = _session(model, windows, batch_size, seed, options, "fluctuation").forward_stats()

    def channel(m: _Moments, weight: Tensor) -> Tensor:
        return m.variance() * _col_norm(weight) ** 2

    return _from_channels(model, stats, channel, "fluctuation")


def tfidf(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return NeuronRank TF-IDF++ scores |W_j|^alpha * TF_j^beta * IDF_j^gamma over documents (or topics: tfidf_mode='topic').

    A channel is *active on a token* when |x| exceeds the mean |x| over all channels of that
    layer at that token (scale-free, decided per token, so it streams). Per document d:
    TF_dj = mean |x_j| over d's tokens x fraction of d's tokens where j is active; j is *active
    in d* when that fraction exceeds the average fraction over the layer's channels in d.
    TF_j = mean over documents of TF_dj; IDF_j = log((1 + N) / (1 + df_j)) + 1 (the smoothed
    form: the bare log(N / (1 + df)) is negative for channels active in every document, where
    IDF^gamma is undefined, and zero would prune first the always-on channels models rely on;
    `tfidf_idf='raw'` uses max(log(N / (1 + df)), 0) instead). |W_j| is the column norm.
    """
    mode, idf_kind = options.get("tfidf_mode", "doc"), options.get("tfidf_idf", "smooth")
    if mode not in ("doc", "topic") or idf_kind not in ("smooth", "raw"):
        raise ValueError(f"tfidf_mode must be 'doc' or 'topic' (got {mode!r}); tfidf_idf 'smooth' or 'raw' (got {idf_kind!r})")
    name = "tfidf_topic" if mode == "topic" else "tfidf"
    stats = _session(model, windows, batch_size, seed, options, name).forward_stats()
    alpha, beta, gamma = (float(options.get(k, d)) for k, d in
                          (("tfidf_alpha", 1.0), ("tfidf_beta", 1.0), ("tfidf_gamma", 1.5)))
    group = _topics(stats, int(options.get("n_topics", 8)), seed) if mode == "topic" else None

    def channel(m: _Moments, weight: Tensor) -> Tensor:
        abs_sum, active, n = m.doc_abs, m.doc_active, stats.doc_tokens
        if group is not None:  # topics play the role of documents: pool their documents' sums
            k = int(group.max()) + 1
            abs_sum = torch.zeros(k, abs_sum.shape[1], device=abs_sum.device).index_add_(0, group, abs_sum)
            active = torch.zeros_like(abs_sum).index_add_(0, group, active)
            n = torch.zeros(k, device=n.device).index_add_(0, group, n)
        keep = n > 0
        abs_sum, active, n = abs_sum[keep], active[keep], n[keep, None]
        freq = active / n
        tf = (abs_sum / n * freq).mean(0)
        df = (freq > freq.mean(1, keepdim=True)).sum(0).float()
        n_docs = float(freq.shape[0])
        if idf_kind == "smooth":
            idf = torch.log((1 + n_docs) / (1 + df)) + 1
        else:
            idf = torch.log(n_docs / (1 + df)).clamp(min=0)
        return _col_norm(weight) ** alpha * tf ** beta * idf ** gamma

    scores = _from_channels(model, stats, channel, name)
    scores.provenance = {"tfidf_mode": mode, "alpha": alpha, "beta": beta, "gamma": gamma, "idf": idf_kind,
                         "documents": int(stats.doc_tokens.numel()),
                         **({"n_topics": int(group.max()) + 1} if group is not None else {})}
    return scores


def tfidf_topic(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return TF-IDF++ scores where KMeans topics of the documents (on mean-pooled last hidden states) act as documents."""
    return tfidf(model, windows, batch_size, seed, **{**options, "tfidf_mode": "topic"})


def taylor(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return first-order LLM-Pruner scores |sum w * dL/dw| over the weights a head / neuron owns (gradients over all windows)."""
    heads, neurons = _session(model, windows, batch_size, seed, options, "taylor").grad_stats()["taylor"]
    return Scores(heads, neurons, "taylor")


def semantic(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return semantic importance: heads by exact ablation (KL + max(dloss, 0), nats/token), neurons by |sum_tokens a * dL/da|.

    Heads: each head is zeroed in turn (`hooks.masked`) over the first `semantic_max_windows`
    windows; the score is the mean per-token KL(full || ablated) of the next-token distributions
    plus the increase of LM loss when positive (a head whose removal helps the loss still
    changes what the model says, which KL keeps). Layers before the ablated one are not
    recomputed: their outputs are cached from the clean pass. Neurons: the first-order estimate
    of the same quantity, |sum over tokens of a_j * dL/da_j| at the input of down_proj, i.e.
    the predicted loss change of zeroing a_j (KL has no first-order term at zero ablation).
    """
    session = _session(model, windows, batch_size, seed, options, "semantic")
    heads = session.semantic_heads()
    neurons = session.grad_stats()["semantic"]
    return Scores(heads, neurons, "semantic", {"semantic_max_windows": session.max_semantic_windows,
                                                "semantic_seq_len": session.options.get("semantic_seq_len")})


DEFAULT_MIX = {"activation": 0.5, "taylor": 0.5}


def mix(model, windows: Tensor, batch_size: int = 4, seed: int = 0, **options) -> Scores:
    """Return the weighted mean of per-layer rank-normalised scores of criteria (`mix_weights`; default activation+taylor)."""
    weights = _mix_weights(options)
    session = _session(model, windows, batch_size, seed, options, "mix")
    parts = {name: session.score(name) for name in weights}
    total = sum(weights.values())
    shapes = layer_shapes(model)
    heads = [sum(w * _rank01(parts[n].heads[l]) for n, w in weights.items()) / total for l in range(len(shapes))]
    neurons = [sum(w * _rank01(parts[n].neurons[l]) for n, w in weights.items()) / total for l in range(len(shapes))]
    return Scores(heads, neurons, "mix", {"mix_weights": dict(weights)})


CRITERIA: dict[str, Callable[..., Scores]] = {
    "random": random,
    "magnitude": magnitude,
    "activation": activation,
    "fluctuation": fluctuation,
    "tfidf": tfidf,
    "tfidf_topic": tfidf_topic,
    "taylor": taylor,
    "semantic": semantic,
    "mix": mix,
}

OPTIONS = ("documents", "tfidf_mode", "n_topics", "tfidf_alpha", "tfidf_beta", "tfidf_gamma", "tfidf_idf",
           "semantic_max_windows", "semantic_seq_len", "mix_weights", "progress")
_FORWARD = {"activation", "fluctuation", "tfidf", "tfidf_topic"}
_GRAD = {"taylor", "semantic"}


def compute_importance(model, windows: Tensor, criteria: list[str] | str, batch_size: int = 4, seed: int = 0,
                       **options) -> dict[str, Scores]:
    """Return `{criterion: Scores}` for the named criteria, sharing calibration passes between them.

    `windows` is a LongTensor [n, seq_len] of calibration tokens. When `documents` (a list of
    1-D token tensors) is given, the forward-statistics pass (activation, fluctuation, tfidf)
    runs over the documents, cut into rows of at most seq_len tokens, instead of the windows;
    gradient and ablation criteria always use the windows. Options: see `OPTIONS`.
    """
    criteria = [criteria] if isinstance(criteria, str) else list(criteria)
    for name in criteria:
        _check_name(name)
    _check_options(options)
    was_training = model.training
    model.eval()
    session = _Session(model, windows, batch_size, seed, options, _expand(criteria, options))
    try:
        return {name: session.score(name) for name in criteria}
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- shared passes


class _Moments:
    """Streamed statistics of one linear layer's input channels: count, mean, centred sum of squares, per-document sums."""

    def __init__(self, width: int, device: torch.device, n_docs: int):
        self.n = 0.0
        self.mean = torch.zeros(width, device=device)
        self.m2 = torch.zeros(width, device=device)
        # Per-document sums cost n_docs x width floats: memory grows with documents, never with tokens.
        self.doc_abs = torch.zeros(n_docs, width, device=device) if n_docs else None
        self.doc_active = torch.zeros(n_docs, width, device=device) if n_docs else None

    def add(self, x: Tensor, mask: Tensor | None, row_doc: Tensor | None) -> None:
        x = x.float()
        if mask is None:
            nb = float(x.shape[0] * x.shape[1])
            # One fused kernel for the batch, merged with Chan's formula: exact, and no cancellation
            # like E[x^2] - E[x]^2 has on channels with a large mean.
            var_b, mean_b = torch.var_mean(x, dim=(0, 1), correction=0)
            m2_b = var_b * nb
        else:
            nb = float(mask.sum())
            mean_b = (x * mask).sum((0, 1)) / nb
            m2_b = (((x - mean_b) * mask) ** 2).sum((0, 1))
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / total)
        self.m2 += m2_b + delta ** 2 * (self.n * nb / total)
        self.n = total
        if self.doc_abs is not None:
            a = x.abs()
            active = (a > a.mean(-1, keepdim=True)).float()
            if mask is not None:
                a, active = a * mask, active * mask
            self.doc_abs.index_add_(0, row_doc, a.sum(1))
            self.doc_active.index_add_(0, row_doc, active.sum(1))

    def sq_norm(self) -> Tensor:
        """Return sum over tokens of x_j^2."""
        return (self.m2 + self.n * self.mean ** 2).cpu()

    def variance(self) -> Tensor:
        """Return the sample variance of x_j over tokens."""
        return (self.m2 / max(self.n - 1.0, 1.0)).cpu()


@dataclass
class _ForwardStats:
    attn: list[_Moments]  # inputs of o_proj
    mlp: list[_Moments]  # inputs of down_proj
    doc_tokens: Tensor  # [n_docs] tokens seen per document
    doc_hidden: Tensor | None  # [n_docs, hidden] sums of last hidden states (topic clustering)


class _Session:
    """The passes of one compute_importance call: each runs at most once and serves every criterion that needs it."""

    def __init__(self, model, windows: Tensor, batch_size: int, seed: int, options: dict, wanted: set[str]):
        if windows.dim() != 2:
            raise ValueError(f"windows must be a LongTensor [n, seq_len], got shape {tuple(windows.shape)}")
        self.model, self.windows, self.batch_size, self.seed = model, windows, max(1, int(batch_size)), seed
        self.options, self.wanted = options, wanted
        self.progress = bool(options.get("progress", True))
        limit = options.get("semantic_max_windows", 16)
        self.max_semantic_windows = len(windows) if limit is None else min(int(limit), len(windows))
        if "semantic" in wanted and self.max_semantic_windows < 1:
            raise ValueError(f"semantic_max_windows must be >= 1 (or None for all windows), got {limit}")
        self.device = next(model.parameters()).device
        self._results: dict[str, Scores] = {}
        self._forward: _ForwardStats | None = None
        self._grad: dict | None = None
        self._semantic_heads: list[Tensor] | None = None

    def score(self, name: str) -> Scores:
        if name not in self._results:
            result = CRITERIA[name](self.model, self.windows, self.batch_size, self.seed, _session=self, **self.options)
            # Provenance that plans carry along: what the scores were computed on, JSON-ready.
            options = {k: v for k, v in self.options.items() if k not in ("documents", "progress")}
            if "documents" in self.options:
                options["documents"] = len(self.options["documents"])
            result.provenance = {"windows": list(self.windows.shape), "batch_size": self.batch_size, "seed": self.seed,
                                 **options, **result.provenance}
            self._results[name] = result
        return self._results[name]

    # -- forward statistics -------------------------------------------------------------------

    def _rows(self) -> tuple[list[tuple[Tensor, Tensor | None, Tensor]], int]:
        """Return batches (ids, token mask or None, document of each row) and the number of documents."""
        docs = self.options.get("documents")
        bs = self.batch_size
        if docs is None:
            w = self.windows
            batches = [(w[i:i + bs], None, torch.arange(i, min(i + bs, len(w)))) for i in range(0, len(w), bs)]
            return batches, len(w)
        seq_len = self.windows.shape[1]
        docs = [torch.as_tensor(d).flatten() for d in docs]
        docs = [d for d in docs if d.numel() > 0]
        if not docs:
            raise ValueError("documents are all empty; pass a list of 1-D token tensors")
        rows = [(d[i:i + seq_len], k) for k, d in enumerate(docs) for i in range(0, d.numel(), seq_len)]
        rows.sort(key=lambda r: -r[0].numel())  # equal lengths batch together: little padding
        batches = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            width = chunk[0][0].numel()
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width)
            for r, (d, _) in enumerate(chunk):
                ids[r, :d.numel()], mask[r, :d.numel()] = d, 1
            padded = bool((mask == 0).any())
            batches.append((ids, mask if padded else None, torch.tensor([k for _, k in chunk])))
        return batches, len(docs)

    @torch.inference_mode()
    def forward_stats(self) -> _ForwardStats:
        if self._forward is not None:
            return self._forward
        from tqdm.auto import tqdm

        model, dev = self.model, self.device
        want_docs = bool(self.wanted & {"tfidf", "tfidf_topic"})
        want_hidden = "tfidf_topic" in self.wanted or self.options.get("tfidf_mode") == "topic"
        batches, n_docs = self._rows()
        shapes, hd = layer_shapes(model), head_dim(model)
        nd = n_docs if want_docs else 0
        attn = [_Moments(s.n_heads * hd, dev, nd) for s in shapes]
        mlp = [_Moments(s.intermediate, dev, nd) for s in shapes]
        doc_tokens = torch.zeros(n_docs, device=dev)
        doc_hidden = None
        current: dict[str, Tensor | None] = {}

        def hook(stats: _Moments):
            return lambda mod, args: stats.add(args[0], current["mask"], current["doc"])

        specs = []
        for layer, a, m in zip(decoder_layers(model), attn, mlp):
            specs += [(layer.self_attn.o_proj, "pre", hook(a)), (layer.mlp.down_proj, "pre", hook(m))]
        base = getattr(model, "model", model)  # the LM head is not needed: skipping it pays for the hooks
        with hooks(*specs):
            for ids, mask, row_doc in tqdm(batches, desc="importance: forward statistics", disable=not self.progress,
                                           leave=False):
                ids, row_doc = ids.to(dev), row_doc.to(dev)
                tok_mask = None if mask is None else mask.to(dev)
                current["mask"] = None if tok_mask is None else tok_mask[..., None]
                current["doc"] = row_doc
                out = base(input_ids=ids, attention_mask=None if tok_mask is None else tok_mask.long(), use_cache=False)
                n_row = torch.full((len(ids),), float(ids.shape[1]), device=dev) if tok_mask is None else tok_mask.sum(1)
                doc_tokens.index_add_(0, row_doc, n_row)
                if want_hidden:
                    h = out.last_hidden_state.float()
                    h = h.sum(1) if tok_mask is None else (h * tok_mask[..., None]).sum(1)
                    if doc_hidden is None:
                        doc_hidden = torch.zeros(n_docs, h.shape[-1], device=dev)
                    doc_hidden.index_add_(0, row_doc, h)
        self._forward = _ForwardStats(attn, mlp, doc_tokens, doc_hidden)
        return self._forward

    # -- gradient pass ------------------------------------------------------------------------

    def grad_stats(self) -> dict[str, tuple[list[Tensor], list[Tensor]] | list[Tensor]]:
        """Return {'taylor': (heads, neurons)} and/or {'semantic': neurons} from one backward pass over the windows."""
        if self._grad is not None:
            return self._grad
        from tqdm.auto import tqdm

        model, dev = self.model, self.device
        want_taylor, want_sem = "taylor" in self.wanted, "semantic" in self.wanted
        layers, shapes, hd = decoder_layers(model), layer_shapes(model), head_dim(model)
        owned = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            owned += [lin.weight for lin in (a.q_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]
            owned += [lin.bias for lin in (a.q_proj, m.gate_proj, m.up_proj) if lin.bias is not None]
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

        specs = [(layer.mlp.down_proj, "pre", grab(acc)) for layer, acc in zip(layers, sem)] if want_sem else []
        w = self.windows
        n_tokens = w.shape[0] * (w.shape[1] - 1)
        try:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if want_taylor:
                for p in owned:
                    p.requires_grad_(True)
            with torch.enable_grad(), hooks(*specs):
                for i in tqdm(range(0, len(w), self.batch_size), desc="importance: gradients", disable=not self.progress,
                              leave=False):
                    ids = w[i:i + self.batch_size].to(dev)
                    if want_taylor:
                        out = model(input_ids=ids, use_cache=False)
                    else:  # no weight needs a gradient: let activations carry one from the embeddings on
                        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                        out = model(inputs_embeds=emb, use_cache=False)
                    # Sum of per-token losses / all tokens: the accumulated gradient is that of the mean calibration loss.
                    loss = _token_nll(out.logits, ids).sum() / n_tokens
                    loss.backward()
                    del out, loss
            result: dict = {}
            if want_taylor:
                result["taylor"] = self._taylor_from_grads(layers, hd)
            if want_sem:
                result["semantic"] = [s.abs().cpu() for s in sem]
        finally:
            for p, flag, grad in saved:
                p.requires_grad_(flag)
                p.grad = grad
        self._grad = result
        return result

    @staticmethod
    def _taylor_from_grads(layers, hd: int) -> tuple[list[Tensor], list[Tensor]]:
        def wg(p) -> Tensor:
            return (p.detach().float() * p.grad.float()) if p.grad is not None else torch.zeros_like(p, dtype=torch.float)

        heads, neurons = [], []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            nh = a.q_proj.out_features // hd
            s = wg(a.q_proj.weight).view(nh, -1).sum(1) + wg(a.o_proj.weight).view(-1, nh, hd).sum((0, 2))
            if a.q_proj.bias is not None:
                s += wg(a.q_proj.bias).view(nh, hd).sum(1)
            n = wg(m.gate_proj.weight).sum(1) + wg(m.up_proj.weight).sum(1) + wg(m.down_proj.weight).sum(0)
            for lin in (m.gate_proj, m.up_proj):
                if lin.bias is not None:
                    n += wg(lin.bias)
            heads.append(s.abs().cpu())
            neurons.append(n.abs().cpu())
        return heads, neurons

    # -- head ablation ------------------------------------------------------------------------

    @torch.inference_mode()
    def semantic_heads(self) -> list[Tensor]:
        """Return per-head KL + max(dloss, 0) (nats per predicted token) from one ablated pass per head."""
        if self._semantic_heads is not None:
            return self._semantic_heads
        from tqdm.auto import tqdm

        model, dev = self.model, self.device
        layers, shapes = decoder_layers(model), layer_shapes(model)
        # one ablated replay per head: cost is heads x tokens, so CPU runs bound the tokens (semantic_seq_len)
        w = self.windows[:self.max_semantic_windows, :self.options.get("semantic_seq_len") or None]
        kl = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        dloss = [torch.zeros(s.n_heads, dtype=torch.float64) for s in shapes]
        total_heads = sum(s.n_heads for s in shapes)
        bar = tqdm(total=total_heads * math.ceil(len(w) / self.batch_size), desc="importance: head ablations",
                   disable=not self.progress, leave=False)
        with bar:
            for i in range(0, len(w), self.batch_size):
                ids = w[i:i + self.batch_size].to(dev)
                inputs: list[tuple[tuple, dict] | None] = [None] * len(layers)

                def grab(idx: int):
                    def pre(mod, args, kwargs):
                        inputs[idx] = (args, kwargs)
                    return pre

                with hooks(*[(layer, "pre_kw", grab(j)) for j, layer in enumerate(layers)]):
                    clean = model(input_ids=ids, use_cache=False).logits
                clean_lp = torch.log_softmax(clean[:, :-1].float(), -1)
                clean_p = clean_lp.exp()
                targets = ids[:, 1:]
                clean_nll = -clean_lp.gather(-1, targets[..., None]).sum()
                del clean
                for li, s in enumerate(shapes):
                    for h in range(s.n_heads):
                        with masked(model, heads={li: [h]}):
                            lp = torch.log_softmax(_replay(model, layers, inputs, li)[:, :-1].float(), -1)
                        dloss[li][h] += float(-lp.gather(-1, targets[..., None]).sum() - clean_nll)
                        kl[li][h] += float((clean_p * (clean_lp - lp)).sum())
                        bar.update(1)
        n = len(w) * (w.shape[1] - 1)
        self._semantic_heads = [(k / n + (d / n).clamp(min=0)).float() for k, d in zip(kl, dloss)]
        return self._semantic_heads


def _replay(model, layers, inputs: list, start: int) -> Tensor:
    """Return logits recomputed from the cached input of decoder layer `start` onwards (earlier layers are unaffected)."""
    args, kwargs = inputs[start]
    hidden = args[0] if args else kwargs["hidden_states"]
    for j in range(start, len(layers)):
        a, kw = inputs[j]
        if a:
            out = layers[j](hidden, *a[1:], **kw)
        else:
            out = layers[j](**{**kw, "hidden_states": hidden})
        hidden = out[0] if isinstance(out, tuple) else out
    base = getattr(model, "model", model)
    return model.get_output_embeddings()(base.norm(hidden))


# ----------------------------------------------------------------------------- helpers


def _token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Return the next-token negative log-likelihood of every predicted position, [batch, seq_len - 1]."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def _col_norm(weight: Tensor) -> Tensor:
    return weight.detach().float().norm(dim=0).cpu()


def _from_channels(model, stats: _ForwardStats, channel: Callable[[_Moments, Tensor], Tensor], name: str) -> Scores:
    """Return Scores from a per-channel score function: a head is the sum of its o_proj input channels."""
    hd = head_dim(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer, a, m in zip(decoder_layers(model), stats.attn, stats.mlp):
            heads.append(channel(a, layer.self_attn.o_proj.weight).cpu().float().view(-1, hd).sum(1))
            neurons.append(channel(m, layer.mlp.down_proj.weight).cpu().float())
    return Scores(heads, neurons, name)


def _topics(stats: _ForwardStats, n_topics: int, seed: int) -> Tensor:
    """Return the KMeans topic of every document, clustered on mean-pooled last hidden states."""
    from sklearn.cluster import KMeans

    if stats.doc_hidden is None:
        raise RuntimeError("topic mode needs last hidden states; call through compute_importance or tfidf_topic")
    emb = (stats.doc_hidden / stats.doc_tokens.clamp(min=1)[:, None]).cpu().numpy()
    k = max(1, min(n_topics, len(emb)))
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(emb)
    return torch.as_tensor(labels, dtype=torch.long, device=stats.doc_tokens.device)


def _rank01(x: Tensor) -> Tensor:
    """Return ranks scaled to [0, 1] (0 = least important), ties broken by position."""
    if x.numel() < 2:
        return torch.full_like(x, 0.5, dtype=torch.float)
    r = torch.empty(x.numel(), dtype=torch.float)
    r[x.argsort(stable=True)] = torch.arange(x.numel(), dtype=torch.float)
    return r / (x.numel() - 1)


def _mix_weights(options: dict) -> dict[str, float]:
    weights = dict(options.get("mix_weights") or DEFAULT_MIX)
    for name in weights:
        _check_name(name)
        if name == "mix":
            raise ValueError("mix_weights cannot name 'mix' itself; name base criteria such as activation, taylor")
    if sum(weights.values()) <= 0:
        raise ValueError(f"mix_weights must have a positive sum, got {weights}")
    return weights


def _check_name(name: str) -> None:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion '{name}'; known: {', '.join(CRITERIA)}")


def _check_options(options: dict) -> None:
    unknown = [k for k in options if k not in OPTIONS and k != "_session"]
    if unknown:
        raise ValueError(f"unknown importance option(s) {unknown}; known: {', '.join(OPTIONS)}")


def _expand(criteria: list[str], options: dict) -> set[str]:
    """Return the criteria to serve, `mix` replaced by (added to) the criteria it combines."""
    wanted = set(criteria)
    if "mix" in wanted:
        wanted |= set(_mix_weights(options))
    if "tfidf" in wanted and options.get("tfidf_mode") == "topic":
        wanted.add("tfidf_topic")
    return wanted


def _session(model, windows: Tensor, batch_size: int, seed: int, options: dict, name: str) -> _Session:
    """Return the caller's shared session, or a fresh one serving just `name` when a criterion is called directly."""
    session = options.get("_session")
    if session is None:
        _check_options(options)
        model.eval()
        session = _Session(model, windows, batch_size, seed, options, _expand([name], options))
    return session


# ----------------------------------------------------------------------------- storage


def save_scores(scores: dict[str, Scores], folder: str | Path) -> Path:
    """Write `importance.safetensors` (keys like `taylor.heads.3`) and a tidy per-layer summary CSV; return the folder."""
    import pandas as pd
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat, rows = {}, []
    for name, s in scores.items():
        if "." in name:
            raise ValueError(f"criterion name '{name}' must not contain '.' (it separates the stored keys)")
        for kind, per_layer in (("heads", s.heads), ("neurons", s.neurons)):
            for layer, t in enumerate(per_layer):
                t = t.detach().float().cpu().contiguous()
                flat[f"{name}.{kind}.{layer}"] = t
                rows.append(dict(criterion=name, kind=kind, layer=layer, n=t.numel(), mean=t.mean().item(),
                                 std=t.std().item() if t.numel() > 1 else 0.0, min=t.min().item(), max=t.max().item()))
    save_file(flat, str(folder / SCORES_FILE))
    pd.DataFrame(rows).to_csv(folder / SUMMARY_FILE, index=False)
    return folder


def load_scores(folder: str | Path) -> dict[str, Scores]:
    """Return the scores stored by `save_scores` in `folder`."""
    from safetensors.torch import load_file

    path = Path(folder) / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; compute scores and store them with save_scores(scores, folder)")
    table: dict[str, dict[str, dict[int, Tensor]]] = {}
    for key, t in load_file(str(path)).items():
        name, kind, layer = key.rsplit(".", 2)
        table.setdefault(name, {"heads": {}, "neurons": {}})[kind][int(layer)] = t
    return {name: Scores([k["heads"][i] for i in sorted(k["heads"])], [k["neurons"][i] for i in sorted(k["neurons"])], name)
            for name, k in table.items()}
