"""Selection by reconstruction error (`obs`): exact first pick (brute force), exact error bookkeeping, plans."""
import copy

import pytest
import torch

from pruning_utils.model.arch import HEAD_INPUT, NEURON_INPUT, decoder_layers, head_channels
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune import allocation, importance
from pruning_utils.prune.obs import ObsError, greedy_path, obs_scores
from pruning_utils.prune.reconstruction import collect_grams, prune_and_reconstruct, reconstruct_linear, target_module

HD = 16  # head_dim of the tiny models


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=1)
    windows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    return model, windows, collect_grams(model, windows)


def _refit_error(weight, stats, keep) -> float:
    """Brute force: plain least-squares refit of the kept columns, then tr((W - W~) G (W - W~)^T)."""
    new_w, _ = reconstruct_linear(weight, None, keep, stats, "lstsq", ridge_ratio=0.0)
    full = torch.zeros_like(weight, dtype=torch.float64)
    full[:, keep] = new_w.detach().double()
    diff = weight.detach().double() - full
    return float(torch.einsum("oi,ij,oj->", diff, stats.gram, diff))


@pytest.mark.parametrize("name", [NEURON_INPUT, HEAD_INPUT])
def test_first_removal_is_the_cheapest_single_candidate(setup, name):
    model, _, grams = setup
    layer = decoder_layers(model)[1]
    module = target_module(layer, name)
    stats = grams[(1, name)]
    if name == HEAD_INPUT:
        cols = torch.stack([head_channels([h], HD) for h in range(8)])
        path = greedy_path(module.weight, None, stats, cols, 1, classes=torch.arange(8) // 4, ridge_ratio=0.0)
    else:
        cols = torch.arange(module.in_features)[:, None]
        path = greedy_path(module.weight, None, stats, cols, 1, step=1, ridge_ratio=0.0)
    n_in = module.in_features
    errors = []
    for c in range(cols.shape[0]):
        keep = torch.tensor(sorted(set(range(n_in)) - set(cols[c].tolist())))
        errors.append(_refit_error(module.weight, stats, keep))
    first = path.order[0]
    assert errors[first] <= min(errors) * (1 + 1e-6) + 1e-9
    assert errors[first] < max(errors)  # the choice matters: candidates differ
    if name == NEURON_INPUT:  # the path's own bookkeeping is the brute-force error of the same removal
        assert path.errors[0] == pytest.approx(errors[first], rel=1e-6)


def test_path_errors_match_the_joint_refit(setup):
    model, _, grams = setup
    module = target_module(decoder_layers(model)[2], NEURON_INPUT)
    stats = grams[(2, NEURON_INPUT)]
    path = greedy_path(module.weight, None, stats, torch.arange(96)[:, None], 5, step=4, ridge_ratio=0.0)
    assert len(path.order) == 20 and len(set(path.order)) == 20
    assert all(b >= a for a, b in zip(path.errors, path.errors[1:]))  # removing more never lowers the error
    keep = torch.tensor(sorted(set(range(96)) - set(path.order)))
    assert path.errors[-1] == pytest.approx(_refit_error(module.weight, stats, keep), rel=1e-6)


def test_heads_leave_kv_groups_equal_in_every_round(setup):
    model, _, grams = setup
    module = target_module(decoder_layers(model)[0], HEAD_INPUT)
    cols = torch.stack([head_channels([h], HD) for h in range(8)])
    path = greedy_path(module.weight, None, grams[(0, HEAD_INPUT)], cols, 3, classes=torch.arange(8) // 4)
    for r in range(3):
        assert sorted(h // 4 for h in path.order[2 * r:2 * r + 2]) == [0, 1]
    with pytest.raises(ObsError, match="keep at least one"):
        greedy_path(module.weight, None, grams[(0, HEAD_INPUT)], cols, 4, classes=torch.arange(8) // 4)


def test_obs_with_nothing_removed_leaves_weights_unchanged(setup):
    model, windows, grams = setup
    before = copy.deepcopy(model.state_dict())
    scores = obs_scores(model, grams, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scoring never edits the model
    plan = allocation.plan_both(model, scores, head_rate=0.0, mlp_rate=0.0)
    pruned = prune_and_reconstruct(copy.deepcopy(model), plan, None, "lstsq", sequential=False, stats=grams)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_obs_criterion_plans_the_path_prefix(setup):
    model, windows, grams = setup
    scores = importance.compute_importance(model, windows, ["obs"], obs_step=4, progress=False)["obs"]
    assert scores.criterion == "obs" and len(scores.provenance["neuron_errors"]) == 3
    plan = allocation.plan_both(model, scores, head_rate=0.25, mlp_rate=0.25)
    module = target_module(decoder_layers(model)[1], NEURON_INPUT)
    path = greedy_path(module.weight, None, grams[(1, NEURON_INPUT)], torch.arange(96)[:, None], 6, step=4)
    assert set(range(96)) - set(plan.kept_neurons(1)) == set(path.order)  # 24 removed = the first 6 updates
    assert [len(plan.kept_heads(li)) for li in range(3)] == [6, 6, 6]


def test_reselect_with_cross_terms_picks_the_cheapest_single_removal_of_the_chase_objective():
    """With the unpruned inputs' cross terms the path starts from the chase optimum: its first pick is the single
    removal that leaves the least ‖W X_ref − W' X‖² after the chase refit (brute force, no ridge)."""
    from pruning_utils.model.stats import GramStats
    from pruning_utils.prune.obs import reselect_keep

    g = torch.Generator().manual_seed(3)
    x_ref = torch.randn(400, 8, generator=g, dtype=torch.float64)
    x = x_ref + 0.3 * torch.randn(400, 8, generator=g, dtype=torch.float64)  # the pruned path's drifted inputs
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    stats = GramStats.empty(8)
    stats.add_paired(x, x_ref)

    def chase_error(keep):
        new_w, _ = reconstruct_linear(w, None, keep, stats, "lstsq", ridge_ratio=0.0)
        return float(((x_ref @ w.T - x[:, keep] @ new_w.T) ** 2).sum())

    brute = min(range(8), key=lambda r: chase_error(torch.tensor([c for c in range(8) if c != r])))
    keep = reselect_keep(w, None, stats, 1, "neurons", step=1, ridge_ratio=0.0)
    assert sorted(set(range(8)) - set(keep.tolist())) == [brute]
    plain = GramStats.empty(8)
    plain.add(x)  # without cross terms: the layer's own output on these inputs, another objective
    assert reselect_keep(w, None, plain, 3, "neurons", step=1, ridge_ratio=0.0).numel() == 5
    with pytest.raises(ObsError, match="KV groups equal"):
        reselect_keep(w, None, stats, 1, "heads", n_kv_heads=2, hd=2)
