"""Depth pruning: score whole decoder layers, plan which to drop, and (for analysis) bridge a dropped span linearly.

Criteria (one registry, `LAYER_CRITERIA`, same signature; higher = more important, as for heads and neurons):
- `block_influence` (ShortGPT): mean over calibration tokens of 1 - cos(input, output) of the layer;
- `angular` (Gromov et al.): mean of arccos(cos) / pi, the same similarity on a scale where distances add up;
- `semantic`: exact damage of bypassing the layer (`hooks.masked(layers=[k])`): mean per-token
  KL(full || bypassed) + max(dloss, 0), as the semantic head score; only layers from k on are recomputed.

The first two are one streamed forward pass (per-layer sums); `semantic` is one replay per layer and batch.
A plan from `plan_layers` is a `PruningPlan` with `layers=` kept, applied by `surgery.apply_plan`/`drop_layers`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from pruning_utils.measure.metrics import count_params
from pruning_utils.model import calibration
from pruning_utils.model.arch import decoder_layers, layer_shapes
from pruning_utils.model.hooks import hooks, masked
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramStats
from pruning_utils.serialization import JsonMixin


@dataclass
class LayerScores(JsonMixin):
    """Per-layer importance (higher = keep) with what `plan_layers` needs to cost a removal;
    round-trips through JSON."""

    criterion: str
    scores: list[float]  # one per decoder layer
    base_heads: list[int]  # the scored model's shapes: a plan made from these scores checks them
    base_intermediate: list[int]
    layer_params: list[int]  # parameters each layer holds (what dropping it removes)
    non_embedding: int  # non-embedding parameters of the scored model
    source_model: str = ""
    details: dict[str, list[float]] = field(default_factory=dict)  # the components (cos, kl, dloss, ...)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerScores":
        """Return the scores stored in a dict made by `to_dict`."""
        return cls(**d)


def _scores(model, criterion: str, scores: Tensor, details: dict[str, Tensor], provenance: dict) -> LayerScores:
    shapes = layer_shapes(model)
    return LayerScores(
        criterion=criterion, scores=[float(s) for s in scores],
        base_heads=[s.n_heads for s in shapes], base_intermediate=[s.intermediate for s in shapes],
        layer_params=[sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)],
        non_embedding=count_params(model)["non_embedding"], source_model=getattr(model.config, "name_or_path", ""),
        details={k: [float(x) for x in v] for k, v in details.items()}, provenance=provenance)


# ----------------------------------------------------------------------------------------------- criteria


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_cosines(model, windows: Tensor, batch_size: int = 4) -> tuple[Tensor, Tensor]:
    """Return per layer the mean over tokens of cos(input, output) and of arccos(cos) / pi, from streamed sums."""
    n = len(decoder_layers(model))
    cos_sum = torch.zeros(n, dtype=torch.float64)
    ang_sum = torch.zeros(n, dtype=torch.float64)
    count = [0]

    def hook(li: int):
        def fn(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(_hidden_of(args, kwargs).float(), y.float(), dim=-1).clamp(-1.0, 1.0)
            cos_sum[li] += cos.sum().double().cpu()
            ang_sum[li] += (torch.arccos(cos) / math.pi).sum().double().cpu()
            if li == 0:
                count[0] += cos.numel()
        return fn

    device = calibration.model_device(model)
    with torch.no_grad(), hooks(*[(layer, "forward_kw", hook(i)) for i, layer in enumerate(decoder_layers(model))]):
        for ids in calibration.batches(windows, batch_size, device):
            calibration.forward_until(model, ids)
    tokens = max(count[0], 1)
    return (cos_sum / tokens).float(), (ang_sum / tokens).float()


def block_influence(model, windows: Tensor, batch_size: int = 4, **options) -> LayerScores:
    """Return ShortGPT block influence per layer: mean over tokens of 1 - cos(layer input, layer output)."""
    cos, ang = layer_cosines(model, windows, batch_size)
    return _scores(model, "block_influence", 1 - cos, {"cos": cos, "angular": ang},
                   {"windows": list(windows.shape), "batch_size": batch_size})


def angular(model, windows: Tensor, batch_size: int = 4, **options) -> LayerScores:
    """Return the angular distance per layer: mean over tokens of arccos(cos(input, output)) / pi, in [0, 1]."""
    cos, ang = layer_cosines(model, windows, batch_size)
    return _scores(model, "angular", ang, {"cos": cos, "angular": ang},
                   {"windows": list(windows.shape), "batch_size": batch_size})


def semantic(model, windows: Tensor, batch_size: int = 4, max_windows: int | None = None, **options) -> LayerScores:
    """Return per layer the exact damage of bypassing it: mean per-token KL(full || bypassed) + max(dloss, 0), nats."""
    layers = decoder_layers(model)
    w = windows if max_windows is None else windows[:max_windows]
    kl = torch.zeros(len(layers), dtype=torch.float64)
    dloss = torch.zeros(len(layers), dtype=torch.float64)
    device = calibration.model_device(model)
    with torch.no_grad():
        for ids in calibration.batches(w, batch_size, device):
            clean, inputs = calibration.capture_batch(model, ids)
            clean_lp = torch.log_softmax(clean[:, :-1].float(), -1)
            targets = ids[:, 1:, None]
            clean_nll = -clean_lp.gather(-1, targets).sum()
            del clean
            for k in range(len(layers)):
                # layers before k see the same inputs: replay from k's captured input, with k bypassed
                with masked(model, layers=[k]):
                    lp = torch.log_softmax(calibration.replay(model, inputs, k)[:, :-1].float(), -1)
                dloss[k] += float(-lp.gather(-1, targets).sum() - clean_nll)
                kl[k] += float((clean_lp.exp() * (clean_lp - lp)).sum())
    n = max(w.shape[0] * (w.shape[1] - 1), 1)
    kl, dloss = (kl / n).float(), (dloss / n).float()
    return _scores(model, "semantic", kl + dloss.clamp(min=0), {"kl": kl, "dloss": dloss},
                   {"windows": list(w.shape), "batch_size": batch_size})


LAYER_CRITERIA: dict[str, Callable[..., LayerScores]] = {
    "block_influence": block_influence,
    "angular": angular,
    "semantic": semantic,
}


def score_layers(model, windows: Tensor, criterion: str = "block_influence", batch_size: int = 4,
                 **options) -> LayerScores:
    """Return the `LayerScores` of the named criterion (see `LAYER_CRITERIA`) over calibration windows [n, seq_len]."""
    if criterion not in LAYER_CRITERIA:
        raise ValueError(f"unknown layer criterion '{criterion}'; known: {', '.join(LAYER_CRITERIA)}")
    was_training = model.training
    model.eval()
    try:
        return LAYER_CRITERIA[criterion](model, windows, batch_size, **options)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- planning


def plan_layers(scores: LayerScores, n_remove: int | None = None, target_non_embedding: int | None = None
                ) -> PruningPlan:
    """Return a `PruningPlan` keeping all but the lowest-scored layers: `n_remove` of them,
    or as few as reach the target.

    With `target_non_embedding`, layers are removed in ascending score order until the non-embedding count is at
    most the target (layers of unequal size are costed by their own parameters).
    """
    n_layers = len(scores.scores)
    if (n_remove is None) == (target_non_embedding is None):
        raise ValueError("give exactly one of n_remove (layers to drop) or target_non_embedding (parameters to keep)")
    order = sorted(range(n_layers), key=lambda i: (scores.scores[i], i))  # ties: the earlier layer goes first
    if target_non_embedding is not None:
        n_remove, left = 0, scores.non_embedding
        while left > target_non_embedding and n_remove < n_layers:
            left -= scores.layer_params[order[n_remove]]
            n_remove += 1
    if n_remove < 0:
        raise ValueError(f"n_remove={n_remove} is negative; give the number of layers to drop, 0..{n_layers - 1}")
    if n_remove >= n_layers:
        reason = (f"target_non_embedding={target_non_embedding:,} needs" if target_non_embedding is not None
                  else f"n_remove={n_remove} would be")
        floor = scores.non_embedding - sum(scores.layer_params) + scores.layer_params[order[-1]]
        raise ValueError(f"{reason} removing every one of the {n_layers} decoder layers; keep at least one "
                         f"(n_remove <= {n_layers - 1}, or target_non_embedding >= {floor:,})")
    removed = sorted(order[:n_remove])
    kept = [i for i in range(n_layers) if i not in removed]
    return PruningPlan(
        base_heads=list(scores.base_heads), base_intermediate=list(scores.base_intermediate), layers=kept,
        source_model=scores.source_model, criterion=f"layers:{scores.criterion}", allocation="depth",
        provenance={"layer_scores": scores.provenance, "criterion": scores.criterion, "removed_layers": removed,
                    "scores": list(scores.scores), "target_non_embedding": target_non_embedding,
                    "non_embedding_after": scores.non_embedding - sum(scores.layer_params[i] for i in removed)})


# ------------------------------------------------------------------------------------- linear span bridge


@dataclass
class SpanMap:
    """An affine map h_out ≈ weight @ h_in + bias standing in for decoder layers [start, end),
    fitted by least squares."""

    start: int
    end: int  # exclusive
    weight: Tensor  # [hidden, hidden]
    bias: Tensor  # [hidden]
    ridge: float
    tokens: int

    def __call__(self, hidden: Tensor) -> Tensor:
        """Return the mapped hidden states (any leading shape)."""
        return (hidden.float() @ self.weight.T.to(hidden.device) + self.bias.to(hidden.device)).to(hidden.dtype)


def _check_span(model, start: int, end: int) -> None:
    n = len(decoder_layers(model))
    if not 0 <= start < end <= n:
        raise ValueError(f"span [{start}, {end}) is not a non-empty range of the model's {n} decoder layers; "
                         f"give 0 <= start < end <= {n}")


def fit_span_map(model, windows: Tensor, start: int, end: int, batch_size: int = 4, ridge: float = 1e-4) -> SpanMap:
    """Return the least-squares affine map from the hidden states entering layer `start` to those leaving `end - 1`.

    Streamed: the Gram of the span's inputs and their cross terms with its outputs (`GramStats.add_paired`).
    The residual change y - x is what is fitted, so the ridge (`ridge` x mean diagonal of the input covariance)
    shrinks towards the identity, i.e. towards plainly dropping the span.

    Not stock-loadable in general: the residual stream carries h itself into the next layer (and its RMSNorm
    sees W h + b, not h), so W cannot be folded into the next layer's weights, nor before the final norm into
    lm_head. The one exact fold is a span starting at layer 0 with untied embeddings: the map then composes with
    the embedding table (E' = E Wᵀ + b). Elsewhere, evaluate it in memory with `bridged`.
    """
    _check_span(model, start, end)
    layers = decoder_layers(model)
    stats: GramStats | None = None
    held: list[Tensor] = []

    def grab_in(module, args, kwargs):
        held.append(_hidden_of(args, kwargs))

    def grab_out(module, args, kwargs, output):
        nonlocal stats
        y = output[0] if isinstance(output, tuple) else output
        x = held.pop()
        if stats is None:
            stats = GramStats.empty(x.shape[-1])
        stats.add_paired(x, y)

    device = calibration.model_device(model)
    with torch.no_grad(), hooks((layers[start], "pre_kw", grab_in), (layers[end - 1], "forward_kw", grab_out)):
        for ids in calibration.batches(windows, batch_size, device):
            calibration.forward_until(model, ids, last=layers[end - 1])
    n = stats.count
    mx, my = stats.mean, stats.ref_sum / n
    cxx = stats.gram / n - torch.outer(mx, mx)
    cxd = (stats.cross - stats.gram) / n - torch.outer(mx, my - mx)  # cov(x, y - x)
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
    lam = ridge * float(cxx.diagonal().mean())
    a = torch.linalg.solve(cxx + lam * eye, cxd).T  # y - x ≈ a (x - mx) + (my - mx)
    weight = eye + a
    bias = my - weight @ mx
    return SpanMap(start, end, weight.float(), bias.float(), ridge, n)


@contextmanager
def bridged(model, span: SpanMap) -> Iterator[None]:
    """Make the span's last layer output `span(h_in)` for the duration of the block (layers inside still run)."""
    _check_span(model, span.start, span.end)
    layers = decoder_layers(model)
    held: list[Tensor] = []

    def grab_in(module, args, kwargs):
        held.append(_hidden_of(args, kwargs))

    def replace_out(module, args, kwargs, output):
        mapped = span(held.pop())
        return (mapped,) + tuple(output[1:]) if isinstance(output, tuple) else mapped

    with hooks((layers[span.start], "pre_kw", grab_in), (layers[span.end - 1], "forward_kw", replace_out)):
        yield


# ------------------------------------------------------------------------- stock-loadable least-squares refit


def _spans(removed: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i in sorted(removed):
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def refit_before_spans(model, removed: list[int], windows: Tensor, batch_size: int = 4, ridge_ratio: float = 1e-2
                       ) -> list[int]:
    """Refit, in place, the `down_proj` of the layer before each removed span to also output the span's change.

    For a span [s, e) the kept layer p = s - 1 ends with h_p = r + D a (a: its MLP activations); the refit solves
    min ‖D' a − (y_e − r)‖² + λ‖D' − D‖² on calibration tokens of the unpruned model (y_e: the span's output,
    λ = `ridge_ratio` · mean diag of Σ aᵀa, the pull toward D of `reconstruction`). Only weights change, so the
    depth-pruned model stays stock-loadable. A span starting at layer 0 has no layer before it and is left as is.
    Call it before dropping the layers (it needs their outputs); returns the refit layer indices.
    """
    from pruning_utils.model.arch import proj

    layers = decoder_layers(model)
    spans = [(s, e) for s, e in _spans(removed) if s > 0]
    if not spans:
        return []
    grams: dict[int, Tensor] = {}
    cross: dict[int, Tensor] = {}
    held: dict[int, dict[str, Tensor]] = {s - 1: {} for s, _ in spans}

    def down_hook(p):
        def fn(module, args, output):
            held[p]["a"], held[p]["d"] = args[0].detach(), output.detach()
        return fn

    def out_hook(p):
        def fn(module, args, kwargs, output):
            held[p]["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        return fn

    def end_hook(p):
        def fn(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            h = held[p]
            a = h["a"].reshape(-1, h["a"].shape[-1]).float()
            t = (y.detach() - h["h"] + h["d"]).reshape(-1, y.shape[-1]).float()  # y_e − r, r = h_p − D a
            bias = proj(layers[p], "down_proj").bias
            if bias is not None:
                t = t - bias.detach().float()
            grams[p] = grams.get(p, 0) + (a.T @ a).double().cpu()
            cross[p] = cross.get(p, 0) + (a.T @ t).double().cpu()
        return fn

    regs = []
    for s, e in spans:
        p = s - 1
        regs += [(proj(layers[p], "down_proj"), "forward", down_hook(p)), (layers[p], "forward_kw", out_hook(p)),
                 (layers[e - 1], "forward_kw", end_hook(p))]
    device = calibration.model_device(model)
    with torch.no_grad(), hooks(*regs):
        for ids in calibration.batches(windows, batch_size, device):
            calibration.forward_until(model, ids, last=layers[max(e for _, e in spans) - 1])
    for s, _ in spans:
        p = s - 1
        lin = proj(layers[p], "down_proj")
        g = grams[p]
        lam = ridge_ratio * float(g.diagonal().mean())
        w0 = lin.weight.detach().double().cpu()
        w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), cross[p] + lam * w0.T).T
        with torch.no_grad():
            lin.weight.copy_(w.to(lin.weight.dtype))
    return [s - 1 for s, _ in spans]
