"""The mix variant of notebook 03: the head-pruned model's heads plus a share of the MLP neurons, built one of three
ways (the notebook's markdown says when each applies)."""
from __future__ import annotations

import torch

from pruning_utils.measure.variants import Unpruned, prune_in_place, pruned_copy
from pruning_utils.model.checkpoint import load_pruned, read_plan
from pruning_utils.model.plan import PruningPlan
from pruning_utils.prune.scores import Scores


def mix_variant(source: Unpruned, scores: dict[str, Scores], mlp_plan: PruningPlan, windows: torch.Tensor, *,
                head_row: dict, mlp_criterion: str, mlp_rate: float, plan_kw: dict, rescore: bool = False,
                grams=None, head_variant: str = "head_pruned", reconstruction: str = "none", sequential: bool = False,
                ridge_ratio: float = 1e-2, device=None, local: dict | None = None):
    """Return the mix model: the heads checkpoint `head_variant` removed (`head_row`, its metadata row) and
    `mlp_rate` of the MLP neurons by `mlp_criterion`, refit by `reconstruction` on `windows`.

    Allocation 'search' (`plan_kw`, the keywords of `main_plan`): heads and neurons searched together from the
    unpruned model at the joint budget. `rescore`: the neurons scored on the head-pruned model itself and refit
    there (allocation and seed from `plan_kw`). Otherwise `mlp_plan` (neurons planned on the unpruned model) combined
    with the head-pruned plan, refit one-shot from `grams`, so the attention is exactly the head-pruned model's.
    `device` is the compute device (offload mode). `local`: keywords of `local_refit.refit_mlps` (steps, lr, seed,
    device), run on the mix model against the unpruned one after the refit."""
    model = _build(source, scores, mlp_plan, windows, head_row, mlp_criterion, mlp_rate, plan_kw, rescore, grams,
                   head_variant, reconstruction, sequential, ridge_ratio, device)
    return refit_locally(model, source, windows, local)


def refit_locally(model, source: Unpruned, windows: torch.Tensor, local: dict | None):
    """Return `model` (a variant cut from `source`) after its local MLP refit (`local`: keywords of
    `local_refit.refit_mlps`). Without steps the unpruned model is not touched: in 'reload' mode reaching it
    would load it again beside the variant."""
    if not local or local.get("steps", 0) <= 0:
        return model
    from pruning_utils.prune import local_refit

    local_refit.refit_mlps(model, source.model, windows, **local)
    return model


def _build(source: Unpruned, scores, mlp_plan, windows, head_row, mlp_criterion, mlp_rate, plan_kw, rescore, grams,
           head_variant, reconstruction, sequential, ridge_ratio, device):
    """Return the mix model before any local refit (the three ways of `mix_variant`)."""
    recon_kw = dict(reconstruction=reconstruction, sequential=sequential, ridge_ratio=ridge_ratio)
    if plan_kw["allocation_name"] == "search":
        from pruning_utils.prune.search import main_plan

        plan = main_plan(source.model, scores, head_criterion=head_row["criterion"], mlp_criterion=mlp_criterion,
                         head_rate=head_row["head_rate_requested"], mlp_rate=mlp_rate, grams=grams, **plan_kw)
        return pruned_copy(source, plan, windows, stats=grams, device=device, **recon_kw)
    if rescore:
        from pruning_utils.prune import allocation, importance

        head_model, _ = load_pruned(head_variant, device=source.device, dtype=source.dtype)
        head_scores = importance.compute_importance(head_model, windows, [mlp_criterion], seed=plan_kw["seed"],
                                                    compute_device=device, obs_ridge=ridge_ratio)[mlp_criterion]
        plan = allocation.plan_neurons(head_model, head_scores, mlp_rate, allocation=plan_kw["allocation_name"])
        return prune_in_place(head_model, plan, windows, device=device, **recon_kw)
    return pruned_copy(source, mlp_plan.combined_with(read_plan(head_variant)), windows, stats=grams, device=device,
                       **recon_kw)
