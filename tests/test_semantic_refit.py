"""`semantic_refit`: a head's score IS the damage of removing it and refitting o_proj (exact, tiny model), and the
neuron estimate's output change is the refit's exact one."""
import copy

import pytest
import torch

from pruning_utils.model.arch import NEURON_INPUT, decoder_layers, proj
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.importance import compute_importance
from pruning_utils.prune.reconstruction import collect_grams, prune_and_reconstruct, reconstruct_linear

RIDGE = 1e-2


def _kl(full, pruned, windows) -> float:
    """KL(full || pruned), nats per predicted token, on the windows (one forward each)."""
    with torch.no_grad():
        lp = torch.log_softmax(full(input_ids=windows).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(pruned(input_ids=windows).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum()) / windows[:, 1:].numel()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # o_proj with a bias (refit through a constant channel), without
def test_head_score_is_the_measured_damage_of_removal_and_refit(family):
    torch.manual_seed(0)
    model = tiny_model(family, num_key_value_heads=1).double().eval()  # one KV group: any single head can go
    with torch.no_grad():  # larger weights than the init's: each head then matters to the predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    windows = torch.randint(3, 128, (6, 64), generator=torch.Generator().manual_seed(1))  # tokens > o_proj inputs
    scores = compute_importance(model, windows, ["semantic_refit"], batch_size=2, refit_windows=len(windows),
                                refit_ridge=RIDGE, progress=False)["semantic_refit"]
    grams = collect_grams(model, windows)
    n_layers, n_heads = len(scores.heads), len(scores.heads[0])
    for li, h in [(0, 0), (1, 5), (n_layers - 1, n_heads - 1)]:
        plan = PruningPlan(base_heads=[n_heads] * n_layers, base_intermediate=[96] * n_layers,
                           heads={li: [k for k in range(n_heads) if k != h]})
        pruned = prune_and_reconstruct(copy.deepcopy(model), plan, windows, "lstsq", sequential=False, stats=grams,
                                       ridge_ratio=RIDGE)
        measured = _kl(model, pruned, windows)
        assert measured > 1e-5
        assert abs(float(scores.heads[li][h]) - measured) <= 1e-6 * measured, (li, h)


def test_refit_differs_from_plain_ablation():  # the criterion measures something semantic does not
    model = tiny_model("qwen2", num_key_value_heads=8).eval()
    windows = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    s = compute_importance(model, windows, ["semantic", "semantic_refit"], batch_size=2, semantic_max_windows=None,
                           refit_windows=4, progress=False)
    assert not torch.allclose(s["semantic"].heads[0], s["semantic_refit"].heads[0])
    assert all(torch.isfinite(n).all() and (n >= 0).all() for n in s["semantic_refit"].neurons)


def test_neuron_estimate_uses_the_refits_exact_output_change():
    """Removing channel j of down_proj and refitting (ridge 0) changes the output by -w_j (h_jᵀ a) / H_jj."""
    model = tiny_model("qwen2").double().eval()  # no MLP bias: the estimate's setting
    windows = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(3))
    stats = collect_grams(model, windows, layers=[1], which=[NEURON_INPUT])[(1, NEURON_INPUT)]
    down = proj(decoder_layers(model)[1], NEURON_INPUT)
    a = torch.randn(10, down.in_features, dtype=torch.float64)
    h = torch.linalg.inv(stats.gram.double())
    for j in (0, 17, down.in_features - 1):
        keep = torch.tensor([c for c in range(down.in_features) if c != j])
        new_w, _ = reconstruct_linear(down.weight, None, keep, stats, "lstsq", 0.0)
        exact = a[:, keep] @ new_w.T - a @ down.weight.detach().T
        predicted = -(a @ h[:, j])[:, None] * down.weight.detach()[:, j][None, :] / h[j, j]
        assert torch.allclose(exact, predicted, rtol=1e-6, atol=1e-9)
