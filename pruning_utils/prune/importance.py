"""Importance of attention heads and MLP neurons: one registry of criteria behind one call.

`compute_importance(model, windows, ["activation", "taylor"])` returns one `Scores` per criterion
(higher = more important). Every criterion has the same signature and is registered in `CRITERIA`;
the calibration passes they need are shared through one `passes.Passes` object passed explicitly
(forward-only criteria share one forward pass, taylor and semantic's neurons one backward pass).

What a head or neuron owns (the rows and columns magnitude and Taylor sum over) is defined once in
`arch.owned_sums`; a head's activation is its `head_dim` input channels of o_proj, a neuron's one input
channel of down_proj. K/V are shared by a KV group and are never scored.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pruning_utils.model.arch import HEAD_INPUT, NEURON_INPUT, decoder_layers, head_dim, layer_shapes, owned_sums, proj
from pruning_utils.model.stats import Moments
from pruning_utils.prune.passes import ForwardStats, Passes
from pruning_utils.prune.scores import Scores

# ----------------------------------------------------------------------------- criteria


def random(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return uniform random scores from a generator seeded with `seed` (the baseline every criterion must beat)."""
    g = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(model)
    heads = [torch.rand(s.n_heads, generator=g) for s in shapes]
    neurons = [torch.rand(s.intermediate, generator=g) for s in shapes]
    return Scores(heads, neurons, "random", {"seed": seed})


def magnitude(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return the L1 norm of the weights a head (q rows + bias, o columns) / neuron
    (gate, up rows + biases, down column) owns."""
    hd = head_dim(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer in decoder_layers(model):
            s, n = owned_sums(layer, hd, torch.abs)
            heads.append(s.cpu())
            neurons.append(n.cpu())
    return Scores(heads, neurons, "magnitude")


def activation(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return Wanda-style structured scores: ||X_j||_2 over calibration tokens x ||W[:, j]||_2,
    summed over a head's channels."""
    stats = _passes(model, windows, batch_size, seed, options, "activation", passes).forward_stats()

    def channel(m: Moments, weight: Tensor) -> Tensor:
        return m.sq_norm().sqrt() * _col_norm(weight)

    return _from_channels(model, stats, channel, "activation")


def fluctuation(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return FLAP scores: variance of input channel j over calibration tokens x ||W[:, j]||^2,
    summed over a head's channels."""
    stats = _passes(model, windows, batch_size, seed, options, "fluctuation", passes).forward_stats()

    def channel(m: Moments, weight: Tensor) -> Tensor:
        return m.variance() * _col_norm(weight) ** 2

    return _from_channels(model, stats, channel, "fluctuation")


def tfidf(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return NeuronRank TF-IDF++ scores |W_j|^alpha * TF_j^beta * IDF_j^gamma over documents
    (or topics: tfidf_mode='topic').

    Each calibration window is a document.

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
        raise ValueError(f"tfidf_mode must be 'doc' or 'topic' (got {mode!r}); "
                         f"tfidf_idf 'smooth' or 'raw' (got {idf_kind!r})")
    name = "tfidf_topic" if mode == "topic" else "tfidf"
    stats = _passes(model, windows, batch_size, seed, options, name, passes).forward_stats()
    alpha, beta, gamma = (float(options.get(k, d)) for k, d in
                          (("tfidf_alpha", 1.0), ("tfidf_beta", 1.0), ("tfidf_gamma", 1.5)))
    group = _topics(stats, int(options.get("n_topics", 8)), seed) if mode == "topic" else None

    def channel(m: Moments, weight: Tensor) -> Tensor:
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


def tfidf_topic(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return TF-IDF++ scores where KMeans topics of the documents (on mean-pooled last hidden states)
    act as documents."""
    return tfidf(model, windows, batch_size, seed, passes, **{**options, "tfidf_mode": "topic"})


def criterion_options(scores: Scores) -> str:
    """Return the settings a result row names beside the criterion, from the scores' provenance: TF-IDF++'s
    exponents and IDF form, plus the topic count of tfidf_topic ('alpha=1,beta=1,gamma=1.5,idf=smooth,topics=8');
    '' for criteria without such settings, 'unrecorded' for TF-IDF scores stored without their provenance."""
    p = scores.provenance
    if scores.criterion not in ("tfidf", "tfidf_topic") and "tfidf_mode" not in p:
        return ""
    if not {"alpha", "beta", "gamma", "idf"} <= set(p):
        return "unrecorded"
    text = ",".join(f"{k}={float(p[k]):g}" for k in ("alpha", "beta", "gamma")) + f",idf={p['idf']}"
    return text + (f",topics={p['n_topics']}" if p.get("tfidf_mode") == "topic" else "")


def taylor(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return first-order LLM-Pruner scores |sum w * dL/dw| over the weights a head / neuron owns
    (gradients over all windows)."""
    heads, neurons = _passes(model, windows, batch_size, seed, options, "taylor", passes).grad_stats()["taylor"]
    return Scores(heads, neurons, "taylor")


def semantic(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return semantic importance: heads by exact ablation (KL + max(dloss, 0), nats/token),
    neurons by |sum_tokens a * dL/da|.

    Heads: each head is zeroed in turn (`hooks.masked`) over the first `semantic_max_windows`
    windows; the score is the mean per-token KL(full || ablated) of the next-token distributions
    plus the increase of LM loss when positive (a head whose removal helps the loss still
    changes what the model says, which KL keeps). Layers before the ablated one are not
    recomputed: their outputs are cached from the clean pass. Neurons: the first-order estimate
    of the same quantity, |sum over tokens of a_j * dL/da_j| at the input of down_proj, i.e.
    the predicted loss change of zeroing a_j (KL has no first-order term at zero ablation).
    """
    passes = _passes(model, windows, batch_size, seed, options, "semantic", passes)
    heads = passes.semantic_heads()
    neurons = passes.grad_stats()["semantic"]
    return Scores(heads, neurons, "semantic", {"semantic_max_windows": passes.n_semantic_windows,
                                                "semantic_seq_len": passes.semantic_seq_len})


def semantic_refit(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
                   **options) -> Scores:
    """Return post-refit semantic importance: how far removing a part moves the model's next-token predictions
    (KL(full || pruned), nats per predicted token) AFTER the lstsq refit that follows it (`refit_ridge`, default
    1e-2: the pipeline's RIDGE_RATIO).

    Heads, exactly: each head is removed in turn and its layer's o_proj refit in closed form from the calibration
    Grams (the `reconstruction.reconstruct_linear` solution for a plan removing only that head), the following layers
    replayed, over the first `refit_windows` windows (default 8) cut to `semantic_seq_len` tokens.
    Neurons, to second order: removing channel j of down_proj and refitting the rest changes its output on token t
    by Δy_t = -w_j (h_jᵀ a_t) / H_jj, with H = (G + λI)⁻¹ (G the down_proj Gram, w_j column j, h_j column j of H),
    so the KL is about ½ E[(w_jᵀ g)²] E[(h_jᵀ a)²] / H_jj² (Gauss-Newton with the loss gradient g at the output
    standing in for the KL's Fisher, Kronecker-factored). A down_proj bias (refit jointly) is left out of it.
    """
    passes = _passes(model, windows, batch_size, seed, options, "semantic_refit", passes)
    ridge = float(options.get("refit_ridge", 1e-2))
    n_windows = int(options.get("refit_windows", 8))
    if n_windows < 1:
        raise ValueError(f"refit_windows must be >= 1, got {n_windows}")
    heads = passes.semantic_refit_heads(lambda li: _head_refits(passes, li, ridge), (ridge, n_windows), n_windows)
    grads, grams = passes.grad_stats(), passes.grams()
    n_tokens = passes.windows.shape[0] * (passes.windows.shape[1] - 1)
    neurons = []
    for li, layer in enumerate(decoder_layers(model)):
        w = proj(layer, NEURON_INPUT).weight.detach().double().cpu()
        g = grams[(li, NEURON_INPUT)].gram.double().cpu()
        h = torch.cholesky_inverse(torch.linalg.cholesky(
            g + ridge * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype)))
        fisher = grads["down_fisher"][li] * n_tokens  # per-token mean of g gᵀ (g: per-token loss gradient)
        out_term = (w * (fisher @ w)).sum(0)  # E[(w_jᵀ g)²]
        in_term = (h * (g @ h)).sum(0) / n_tokens / torch.diagonal(h) ** 2  # E[(h_jᵀ a)²] / H_jj²
        neurons.append((0.5 * out_term * in_term).float())
    return Scores(heads, neurons, "semantic_refit", {"refit_windows": min(n_windows, len(passes.windows)),
                                                      "semantic_seq_len": passes.semantic_seq_len,
                                                      "refit_ridge": ridge})


def _head_refits(passes: Passes, li: int, ridge_ratio: float) -> list[tuple[Tensor, Tensor | None]]:
    """Return, per head of layer `li`, the full-width o_proj (weight, bias) after removing that head and refitting:
    the head's columns zero, the kept ones `reconstruct_linear`'s lstsq solution (exactly what the refit of a plan
    removing only that head writes)."""
    from pruning_utils.prune.reconstruction import reconstruct_linear

    hd, o = head_dim(passes.model), proj(decoder_layers(passes.model)[li], HEAD_INPUT)
    stats, out = passes.grams()[(li, HEAD_INPUT)], []
    for h in range(o.in_features // hd):
        keep = torch.cat([torch.arange(0, h * hd), torch.arange((h + 1) * hd, o.in_features)])
        new_w, new_b = reconstruct_linear(o.weight, o.bias, keep, stats, "lstsq", ridge_ratio)
        full = torch.zeros_like(o.weight)
        full[:, keep.to(full.device)] = new_w
        out.append((full, new_b))
    return out


DEFAULT_MIX = {"activation": 0.5, "taylor": 0.5}


def mix(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
           **options) -> Scores:
    """Return the weighted mean of per-layer rank-normalised scores of criteria
    (`mix_weights`; default activation+taylor)."""
    weights = _mix_weights(options)
    passes = _passes(model, windows, batch_size, seed, options, "mix", passes)
    parts = {name: score(name, passes, options) for name in weights}
    total = sum(weights.values())
    shapes = layer_shapes(model)
    heads = [sum(w * _rank01(parts[n].heads[li]) for n, w in weights.items()) / total for li in range(len(shapes))]
    neurons = [sum(w * _rank01(parts[n].neurons[li]) for n, w in weights.items()) / total for li in range(len(shapes))]
    return Scores(heads, neurons, "mix", {"mix_weights": dict(weights)})


def obs(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
        **options) -> Scores:
    """Return `obs`: heads and neurons ranked by the step at which the progressive removal with refit takes them
    (`obs.obs_scores`: least reconstruction error left after the ridge refit first; `obs_ridge`, `obs_step`)."""
    return _obs(_passes(model, windows, batch_size, seed, options, "obs", passes), options)


def obs_fisher(model, windows: Tensor, batch_size: int = 4, seed: int = 0, passes: Passes | None = None,
               **options) -> Scores:
    """Return `obs_fisher`: `obs` with removal costs in each target's output Fisher metric (`fisher.output_fisher`
    over the first `obs_fisher_windows` windows, default 64: one backward pass over them)."""
    from pruning_utils.prune.fisher import output_fisher

    passes = _passes(model, windows, batch_size, seed, options, "obs_fisher", passes)
    passes.refuse_offload("the output Fisher's backward pass", "obs_fisher")
    n_fisher = int(options.get("obs_fisher_windows", 64))
    if n_fisher < 1:
        raise ValueError(f"obs_fisher_windows must be >= 1, got {n_fisher}")
    fisher = output_fisher(passes.model, passes.windows[:n_fisher], passes.batch_size,
                           show_progress=bool(options.get("progress", True)))
    scores = _obs(passes, options, fisher)
    scores.provenance["obs_fisher_windows"] = min(n_fisher, len(passes.windows))
    return scores


def _obs(passes: Passes, options: dict, fisher: dict | None = None) -> Scores:
    """Return `obs_scores` from the Grams of the passes' windows (in the output Fisher metric with `fisher`)."""
    from pruning_utils.prune.obs import obs_scores
    from pruning_utils.prune.reconstruction import collect_grams

    # on the device (the progressive selection solves with them many times), unlike `Passes.grams` on the host
    grams = collect_grams(passes.model, passes.windows, batch_size=passes.batch_size,
                          device=options.get("compute_device"))
    return obs_scores(passes.model, grams, ridge_ratio=options.get("obs_ridge", 1e-2), step=options.get("obs_step", 8),
                      fisher=fisher, progress=bool(options.get("progress", True)))


CRITERIA: dict[str, Callable[..., Scores]] = {
    "random": random,
    "magnitude": magnitude,
    "activation": activation,
    "fluctuation": fluctuation,
    "tfidf": tfidf,
    "tfidf_topic": tfidf_topic,
    "taylor": taylor,
    "semantic": semantic,
    "semantic_refit": semantic_refit,
    "mix": mix,
    "obs": obs,
    "obs_fisher": obs_fisher,
}

OPTIONS = ("tfidf_mode", "n_topics", "tfidf_alpha", "tfidf_beta", "tfidf_gamma", "tfidf_idf",
           "semantic_max_windows", "semantic_seq_len", "mix_weights", "obs_ridge", "obs_step", "obs_fisher_windows",
           "refit_ridge", "refit_windows", "progress", "compute_device")


def compute_importance(model, windows: Tensor, criteria: list[str] | str, batch_size: int = 4, seed: int = 0,
                       **options) -> dict[str, Scores]:
    """Return `{criterion: Scores}` for the named criteria over calibration windows [n, seq_len], sharing passes.

    Each calibration window is a TF-IDF document. Options: see `OPTIONS`.
    """
    criteria = [criteria] if isinstance(criteria, str) else list(criteria)
    for name in criteria:
        _check_name(name)
    _check_options(options)
    was_training = model.training
    model.eval()
    passes = make_passes(model, windows, batch_size, seed, options, _expand(criteria, options))
    try:
        return {name: score(name, passes, options) for name in criteria}
    finally:
        model.train(was_training)


def make_passes(model, windows: Tensor, batch_size: int, seed: int, options: dict, criteria: set[str]) -> Passes:
    """Return the `Passes` that serve the named criteria (what each pass must collect follows from them)."""
    return Passes(model, windows, batch_size, seed, docs=bool(criteria & {"tfidf", "tfidf_topic"}),
                  hidden="tfidf_topic" in criteria or options.get("tfidf_mode") == "topic",
                  taylor="taylor" in criteria, neuron_grads="semantic" in criteria,
                  down_fisher="semantic_refit" in criteria,
                  semantic_max_windows=options.get("semantic_max_windows", 16),
                  semantic_seq_len=options.get("semantic_seq_len"), show_progress=bool(options.get("progress", True)),
                  compute_device=options.get("compute_device"))


def score(name: str, passes: Passes, options: dict) -> Scores:
    """Return criterion `name` computed on `passes` (cached there), with its provenance."""
    if name not in passes.cache:
        result = CRITERIA[name](passes.model, passes.windows, passes.batch_size, passes.seed, passes, **options)
        # Provenance that plans carry along: what the scores were computed on, JSON-ready.
        kept = {k: v for k, v in options.items() if k not in ("progress", "compute_device")}  # no effect on scores
        result.provenance = {"windows": list(passes.windows.shape), "batch_size": passes.batch_size,
                             "seed": passes.seed, **kept, **result.provenance}
        passes.cache[name] = result
    return passes.cache[name]


# ----------------------------------------------------------------------------- helpers


def _col_norm(weight: Tensor) -> Tensor:
    return weight.detach().float().norm(dim=0).cpu()


def _from_channels(model, stats: ForwardStats, channel: Callable[[Moments, Tensor], Tensor], name: str) -> Scores:
    """Return Scores from a per-channel score function: a head is the sum of its o_proj input channels."""
    hd = head_dim(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer, a, m in zip(decoder_layers(model), stats.attn, stats.mlp):
            heads.append(channel(a, proj(layer, HEAD_INPUT).weight).cpu().float().view(-1, hd).sum(1))
            neurons.append(channel(m, proj(layer, NEURON_INPUT).weight).cpu().float())
    return Scores(heads, neurons, name)


def _topics(stats: ForwardStats, n_topics: int, seed: int) -> Tensor:
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
    unknown = [k for k in options if k not in OPTIONS]
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


def _passes(model, windows: Tensor, batch_size: int, seed: int, options: dict, name: str,
            passes: Passes | None) -> Passes:
    """Return the caller's shared passes, or fresh ones serving just `name` when a criterion is called directly."""
    if passes is None:
        _check_options(options)
        model.eval()
        passes = make_passes(model, windows, batch_size, seed, options, _expand([name], options))
    return passes
