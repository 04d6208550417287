"""Retraining-free weight reconstruction after structured removal (o_proj after heads, down_proj after neurons).

Removing a head removes `head_dim` input channels of `o_proj`; removing a neuron removes one input channel of
`down_proj`. With the Gram matrix G = X Xᵀ of the layer input over calibration tokens (X: channels × tokens), the
kept columns are refit so the layer output on those tokens matches the unpruned layer (k: kept, r: removed):

    W' = argmin ||W X - W' X_k||² + λ ||W' - W_k||²  =  W_k + W_r · G[r, k] · (G[k, k] + λ I)⁻¹
    λ = ridge_ratio · mean(diag G[k, k])

At λ = 0 this is the plain least-squares refit W · G[:, k] · G[k, k]⁻¹. The ridge pulls toward the original kept
weights rather than toward zero, so it shrinks only the compensation: plain removal is the λ → ∞ limit and keeping
every channel returns W unchanged. Scaling λ by the mean diagonal makes it independent of activation scale.

Modes (`MODES`):
- `none`: plain removal.
- `bias`: FLAP-style compensation; the removed channels' mean contribution W[:, removed] · mean(x[removed]) is
  added to the layer's output bias. Only allowed where the layer ALREADY has a bias, because adding one alone breaks
  stock `from_pretrained`: Llama's `attention_bias=True` puts biases on q/k/v/o together and `mlp_bias=True` on
  gate/up/down together; Qwen3's `attention_bias` likewise covers q/k/v/o; Qwen2 (q/k/v only) and Mistral have no
  config field giving o_proj or down_proj a bias. Elsewhere `bias` raises `ReconstructionError` pointing to `lstsq`.
- `lstsq`: the ridge refit above. Where the layer has a bias it is refit jointly, through a constant input channel
  (the Gram augmented with the sum of x and the token count; the constant channel gets no ridge), so `lstsq`
  subsumes `bias` compensation there and needs no new parameter anywhere.

Statistics are streamed (`stats.GramStats`) and collected one decoder layer at a time (`calibration`), so
memory is one layer's [in, in] + [in] per refit module however many tokens pass. `prune_and_reconstruct` refits
either one-shot (all Grams on the unpruned model) or sequentially, SparseGPT-style: the hidden states entering
layer i come from the already pruned and refit layers before it, and inside a layer the down_proj Gram is taken
after o_proj was refit. One-shot Grams depend only on the unpruned model, so `collect_grams` once and pass them as
`stats=` to refit many plans without a new pass.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from pruning_utils.model import calibration
from pruning_utils.model.arch import (
    HEAD_INPUT,
    NEURON_INPUT,
    arch_of,
    decoder_layers,
    head_channels,
    head_dim,
    layer_shapes,
    proj,
)
from pruning_utils.model.plan import PlanMismatchError, PruningPlan
from pruning_utils.model.stats import GramStats, cross_with_constant_channel, with_constant_channel

MODES = ("none", "bias", "lstsq")
TARGETS = (HEAD_INPUT, NEURON_INPUT)  # the projections whose input channels heads / neurons are


class ReconstructionError(ValueError):
    """Raised for an unknown mode or a mode the model's layers cannot take."""


def target_module(layer: nn.Module, name: str) -> nn.Linear:
    """Return the refit target `name` (o_proj or down_proj) of a decoder layer."""
    if name not in TARGETS:
        raise ReconstructionError(f"unknown reconstruction target '{name}'; known: {', '.join(TARGETS)}")
    return proj(layer, name)


def collect_grams(model, windows: Tensor, layers: Iterable[int] | None = None, which: Iterable[str] = TARGETS,
                  batch_size: int = 4, storage: torch.device | str | None = None,
                  device: torch.device | str | None = None) -> dict[tuple[int, str], GramStats]:
    """Return `GramStats` per (layer, module name) of the inputs of o_proj / down_proj, one layer at a time.

    `storage` (e.g. "cpu") is where each finished layer's statistics go; by default they stay on the model's device.
    `device`: offload mode's compute device (each layer visits it in turn; the model stays where it is).
    """
    layer_list = decoder_layers(model)
    layers = sorted(range(len(layer_list)) if layers is None else set(layers))
    which = list(which)
    wanted = {li: {name: target_module(layer_list[li], name) for name in which} for li in layers} if which else {}
    return calibration.layerwise_grams(model, windows, wanted, batch_size, storage, device)


def _solve_ridge(a: Tensor, b: Tensor) -> Tensor:
    """Return A⁻¹ B for a symmetric positive semi-definite A (Cholesky; pseudo-inverse if A is singular)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


def reconstruct_linear(weight: Tensor, bias: Tensor | None, keep: Tensor, stats: GramStats | None,
                       mode: str = "lstsq", ridge_ratio: float = 1e-2) -> tuple[Tensor, Tensor | None]:
    """Return `(new_weight [out, len(keep)], new_bias)` for a linear layer keeping input channels `keep`."""
    if mode not in MODES:
        raise ReconstructionError(f"unknown reconstruction mode '{mode}'; known: {', '.join(MODES)}")
    if ridge_ratio < 0:
        raise ReconstructionError(f"ridge_ratio must be >= 0 (a fraction of the Gram's mean diagonal), "
                                  f"got {ridge_ratio}")
    keep = torch.as_tensor(keep, dtype=torch.long, device=weight.device)
    if mode == "none":
        return weight.detach()[:, keep].clone(), None if bias is None else bias.detach().clone()
    if stats is None:
        raise ReconstructionError(f"mode '{mode}' needs input statistics; pass the GramStats from `collect_grams`")
    in_dim = weight.shape[1]
    if stats.gram.shape != (in_dim, in_dim):
        raise ReconstructionError(f"Gram is {tuple(stats.gram.shape)} but the weight has {in_dim} input channels")
    dev = stats.gram.device
    w = weight.detach().to(device=dev, dtype=torch.float64)
    k = keep.to(dev)
    removed = torch.ones(in_dim, dtype=torch.bool, device=dev)
    removed[k] = False
    if mode == "bias":
        if bias is None:
            raise ReconstructionError(
                "mode 'bias' needs the layer to have an output bias, and this one has none; adding one would break "
                "stock loading (see the module docstring): use mode='lstsq' instead")
        if stats.cross is None:
            shift = w[:, removed] @ stats.mean[removed]
        else:  # error chasing: b' = b + W mean(x_ref) - W[:, keep] mean(x[keep])
            shift = w @ (stats.ref_sum / max(stats.count, 1)) - w[:, k] @ stats.mean[k]
        new_b = bias.detach().to(dev, torch.float64) + shift
        return weight.detach()[:, keep].clone(), new_b.to(device=bias.device, dtype=bias.dtype)

    # lstsq: with a bias, append a constant input channel (Gram row = Σx, corner = token count); it is kept, so
    # the bias is refit like any kept column
    g, r, n_keep = stats.gram, removed.nonzero().squeeze(1), k.numel()
    cross = stats.cross  # error chasing: Σ x x_refᵀ, rows the (pruned-upstream) inputs, columns what W saw
    if bias is not None:
        g, w = with_constant_channel(g, stats, w, bias)
        if cross is not None:
            cross = cross_with_constant_channel(cross, stats)
        k = torch.cat([k, torch.tensor([in_dim], device=dev)])
    g_kk = g[k][:, k]
    ridge = torch.zeros(k.numel(), dtype=torch.float64, device=dev)
    ridge[:n_keep] = ridge_ratio * torch.diagonal(g_kk)[:n_keep].mean()  # none on the constant channel
    # argmin ||W X - W' X_k||² + λ||W' - W_k||²  =  W_k + W_r G[r, k] (G[k, k] + λI)⁻¹   (G symmetric)
    if cross is None:
        rhs = g[k][:, r] @ w[:, r].T
    else:  # argmin ||W X_ref - W' X_k||² + λ||W' - W_k||²  =  W_k + (W C[k, :]ᵀ - W_k G[k, k]) (G[k, k] + λI)⁻¹
        rhs = cross[k] @ w.T - g_kk @ w[:, k].T
    delta = _solve_ridge(g_kk + torch.diag(ridge), rhs).T
    new = w[:, k] + delta
    new_w = new[:, :n_keep].to(device=weight.device, dtype=weight.dtype)
    new_b = None if bias is None else new[:, n_keep].to(device=bias.device, dtype=bias.dtype)
    return new_w, new_b


# ---------------------------------------------------------------------------------------------------------------
# applying a plan with reconstruction


def _targets(model, plan: PruningPlan) -> dict[tuple[int, str], Tensor]:
    """Return the kept input channels of every o_proj / down_proj that loses channels in a kept layer."""
    hd = head_dim(model)
    kept_layers = set(plan.kept_layers())
    out = {}
    for li in sorted(plan.heads):
        heads = sorted(plan.kept_heads(li))
        if li in kept_layers and len(heads) < plan.base_heads[li]:
            out[(li, HEAD_INPUT)] = head_channels(heads, hd)
    for li in sorted(plan.neurons):
        neurons = sorted(plan.kept_neurons(li))
        if li in kept_layers and len(neurons) < plan.base_intermediate[li]:
            out[(li, NEURON_INPUT)] = torch.tensor(neurons)
    return out


def _check(model, plan: PruningPlan, mode: str, targets: Mapping[tuple[int, str], Tensor]) -> None:
    """Raise before any compute when the mode is unknown, the plan does not fit, or `bias` has no bias to use."""
    if mode not in MODES:
        raise ReconstructionError(f"unknown reconstruction mode '{mode}'; known: {', '.join(MODES)}")
    plan.validate()
    shapes = layer_shapes(model)
    if ([s.n_heads for s in shapes] != list(plan.base_heads)
            or [s.intermediate for s in shapes] != list(plan.base_intermediate)):
        raise PlanMismatchError("the plan was made for a model of other shapes than this one; "
                                "recompute the plan on this model (or load the model it was made for)")
    if mode == "bias":
        layer_list = decoder_layers(model)
        missing = [f"{name} of layer {li}" for li, name in targets if target_module(layer_list[li], name).bias is None]
        if missing:
            raise ReconstructionError(
                f"mode 'bias' needs an existing output bias, but {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''} has none ({arch_of(model).model_type}); adding one alone would "
                "break stock loading (Llama's attention_bias / mlp_bias add biases to q/k/v/o or gate/up/down "
                "together). Use mode='lstsq', which needs no new parameter")


@torch.no_grad()
def refit_in_place(module: nn.Linear, keep: Tensor, stats: GramStats | None, mode: str, ridge_ratio: float) -> None:
    """Write the refit kept columns and zero the removed ones: the full-shape layer now computes the pruned one."""
    new_w, new_b = reconstruct_linear(module.weight, module.bias, keep, stats, mode, ridge_ratio)
    keep = keep.to(module.weight.device)
    module.weight.zero_()
    module.weight[:, keep] = new_w
    if new_b is not None:
        module.bias.copy_(new_b)


def reconstruct_in_place(model, plan: PruningPlan, windows: Tensor | None, mode: str = "lstsq",
                         sequential: bool = True, batch_size: int = 4, ridge_ratio: float = 1e-2,
                         stats: Mapping[tuple[int, str], GramStats] | None = None, chase: bool = False,
                         device: torch.device | str | None = None, reselect: bool = False):
    """Refit o_proj / down_proj for the plan's removals and zero the removed columns, keeping shapes; returns model.

    The result computes exactly what the pruned model will (zero columns = masked channels), so `surgery.apply_plan`
    afterwards only slices; `prune_and_reconstruct` does both. `stats` (from `collect_grams` on this unpruned
    model) replaces the one-shot calibration pass, so one pass serves every plan cut from the same model.
    `chase` (sequential only) refits toward the unpruned model's outputs instead of the unpruned layer's outputs
    on pruned-upstream inputs, so upstream error is compensated too. Without `stats`, a one-shot refit streams:
    each layer's Grams are collected, used and dropped before the next layer's (one layer's Grams alive, the
    same refit as from `collect_grams`). `device`: offload mode's compute device for the calibration walks.
    `reselect` (sequential lstsq only) keeps the plan's counts per layer but chooses the removed heads / neurons
    again at each layer by OBS on the walk's statistics (`obs.reselect_keep`: toward the unpruned model's outputs
    with `chase`), and updates `plan` in place with what it chose.
    """
    targets = _targets(model, plan)
    _check(model, plan, mode, targets)
    if chase and not sequential:
        raise ReconstructionError("chase=True needs sequential=True: the unpruned model's hidden states are carried "
                                  "layer by layer next to the pruned ones")
    if reselect and (not sequential or mode != "lstsq"):
        raise ReconstructionError("reselect=True needs sequential=True and mode='lstsq': it chooses the removals "
                                  "again from each layer's statistics on the already pruned layers before the refit")
    if mode == "none" or not targets:
        stats = {}
    elif stats is not None:
        if sequential:
            raise ReconstructionError(
                "precomputed stats are one-shot Grams of the unpruned model, but sequential refits need Grams taken "
                "after the earlier layers were refit: pass sequential=False to reuse stats, or stats=None")
        missing = [key for key in targets if key not in stats]
        if missing:
            raise ReconstructionError(f"stats lack {', '.join(map(str, missing[:3]))}"
                                      f"{' ...' if len(missing) > 3 else ''}; "
                                      "collect them with collect_grams(model, windows) over all layers and targets")
    elif windows is None:
        raise ReconstructionError(f"mode '{mode}' needs calibration windows (or one-shot stats from collect_grams)")
    elif sequential:
        return _reconstruct_sequential(model, plan, windows, targets, mode, batch_size, ridge_ratio, chase, device,
                                       reselect)
    else:
        return _reconstruct_streamed(model, windows, targets, mode, batch_size, ridge_ratio, device)
    layer_list = decoder_layers(model)
    for (li, name), keep in targets.items():
        refit_in_place(target_module(layer_list[li], name), keep, stats.get((li, name)), mode, ridge_ratio)
    return model


def prune_and_reconstruct(model, plan: PruningPlan, windows: Tensor | None, mode: str = "lstsq",
                          sequential: bool = True, batch_size: int = 4, ridge_ratio: float = 1e-2,
                          stats: Mapping[tuple[int, str], GramStats] | None = None, chase: bool = False,
                          device: torch.device | str | None = None, reselect: bool = False):
    """Apply the plan in place with o_proj / down_proj reconstructed on the calibration windows; returns model.

    With `reselect` the removals applied (and recorded as `model.pruning_plan`) are those chosen during the
    sequential walk, at the plan's counts; `plan` itself is left as given."""
    from pruning_utils.model.surgery import apply_plan

    if reselect:
        plan = copy.deepcopy(plan)
        plan.provenance["reselected"] = dict(chase=chase, ridge_ratio=ridge_ratio)
    reconstruct_in_place(model, plan, windows, mode, sequential, batch_size, ridge_ratio, stats, chase, device,
                         reselect)
    return apply_plan(model, plan)


def _paired_stats(layer: nn.Module, name: str, ref_layer: nn.Module, hidden: list[Tensor], ref_hidden: list[Tensor],
                  calls: list) -> GramStats:
    """Return `GramStats` of the `name` input on the pruned path, with cross terms against the unpruned path."""
    module, ref_module = target_module(layer, name), target_module(ref_layer, name)
    stats = GramStats.empty(module.in_features, module.weight.device)
    for h, h_ref, call in zip(hidden, ref_hidden, calls):
        stats.add_paired(calibration.input_of(layer, module, h, call),
                         calibration.input_of(ref_layer, ref_module, h_ref, call))
    return stats


@torch.no_grad()
def _reconstruct_streamed(model, windows: Tensor, targets, mode: str, batch_size: int, ridge_ratio: float,
                          device: torch.device | str | None = None):
    """One-shot refit, one layer at a time: collect a layer's Grams on the unpruned model, refit it, drop them."""
    wanted: dict[int, dict[str, nn.Linear]] = {}
    layer_list = decoder_layers(model)
    for li, name in targets:
        wanted.setdefault(li, {})[name] = target_module(layer_list[li], name)
    # iter_layer_grams yields a layer after the next layer's inputs were made from it: refitting it then leaves
    # every later Gram as the unpruned model's
    for li, layer, stats in calibration.iter_layer_grams(model, windows, wanted, batch_size, device):
        for name in wanted.get(li, {}):
            refit_in_place(target_module(layer, name), targets[(li, name)], stats[name], mode, ridge_ratio)
        del stats
    return model


@torch.no_grad()
def _reconstruct_sequential(model, plan: PruningPlan, windows: Tensor, targets, mode: str, batch_size: int,
                            ridge_ratio: float, chase: bool = False, device: torch.device | str | None = None,
                            reselect: bool = False):
    """Refit layer by layer on the outputs of the already refit layers, holding one layer's activations at a time.

    `chase`: also carry the unpruned model's hidden states (through a copy of each layer taken before its refit)
    and refit toward the unpruned model's output, so each refit also absorbs the error of the layers before it.
    `reselect`: before each refit, choose again which channels go (`obs.reselect_keep` on this walk's statistics,
    the plan's count per layer and KV group) and write the choice into `plan`.
    """
    kept_layers = set(plan.kept_layers())
    last = max(li for li, _ in targets)
    dropped = set(range(last + 1)) - kept_layers
    ref_hidden = None
    for li, layer, hidden, calls in calibration.walk_layers(model, windows, batch_size, last, bypassed=dropped,
                                                            device=device):
        if ref_hidden is None:
            ref_hidden = list(hidden)
        pruned_here = [name for name in TARGETS if (li, name) in targets and li in kept_layers]
        ref_layer = copy.deepcopy(layer) if chase and pruned_here else layer
        # o_proj first: down_proj's input depends on the refit attention output
        for name in pruned_here:
            stats = (_paired_stats(layer, name, ref_layer, hidden, ref_hidden, calls) if chase
                     else calibration.layer_input_grams(layer, target_module(layer, name), hidden, calls))
            if reselect:
                targets[(li, name)] = _reselect(model, plan, li, name, target_module(layer, name), stats, ridge_ratio)
            refit_in_place(target_module(layer, name), targets[(li, name)], stats, mode, ridge_ratio)
        if chase and li < last:  # the unpruned model runs every layer, dropped ones too
            ref_hidden = [calibration.run_layer(ref_layer, h, call) for h, call in zip(ref_hidden, calls)]
    return model


def _reselect(model, plan: PruningPlan, li: int, name: str, module: nn.Linear, stats: GramStats,
              ridge_ratio: float) -> Tensor:
    """Return the kept input channels of `module` chosen again on `stats`, and record the choice in `plan`."""
    from pruning_utils.prune.obs import reselect_keep

    if name == HEAD_INPUT:
        hd = head_dim(model)
        removed = plan.base_heads[li] - len(plan.kept_heads(li))
        heads = reselect_keep(module.weight, module.bias, stats, removed, "heads", layer_shapes(model)[li].n_kv_heads,
                              hd, ridge_ratio=ridge_ratio)
        plan.heads[li] = heads.tolist()
        return head_channels(plan.heads[li], hd)
    removed = plan.base_intermediate[li] - len(plan.kept_neurons(li))
    keep = reselect_keep(module.weight, module.bias, stats, removed, "neurons", ridge_ratio=ridge_ratio)
    plan.neurons[li] = keep.tolist()
    return keep

