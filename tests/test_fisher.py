"""Loss-aware `obs` (`obs_fisher`): the output Fisher is the gradient's second moment, removal costs are exact in
its metric (brute force), and the refit it keeps is optimal in any such metric."""
import copy

import pytest
import torch

from pruning_utils.model.arch import HEAD_INPUT, NEURON_INPUT, decoder_layers, proj
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune import allocation, importance
from pruning_utils.prune.fisher import metric_root, output_fisher
from pruning_utils.prune.obs import ObsError, greedy_path, obs_scores
from pruning_utils.prune.passes import token_nll
from pruning_utils.prune.reconstruction import collect_grams, reconstruct_linear


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=3)
    windows = torch.randint(3, 128, (12, 24), generator=torch.Generator().manual_seed(4))
    return model, windows, collect_grams(model, windows)


def _spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def _metric_error(weight, stats, keep, metric) -> float:
    """Brute force: plain least-squares refit of the kept columns, then tr(F (W - W~) G (W - W~)^T)."""
    new_w, _ = reconstruct_linear(weight, None, keep, stats, "lstsq", ridge_ratio=0.0)
    full = torch.zeros_like(weight, dtype=torch.float64)
    full[:, keep] = new_w.detach().double()
    diff = weight.detach().double() - full
    return float(torch.einsum("po,oi,ij,pj->", metric, diff, stats.gram, diff))


def test_output_fisher_is_the_second_moment_of_the_loss_gradient(setup):
    model, windows, _ = setup
    flags = [p.requires_grad for p in model.parameters()]
    got = output_fisher(model, windows[:3], batch_size=2, show_progress=False)
    assert sorted(got) == [(li, name) for li in range(3) for name in sorted((HEAD_INPUT, NEURON_INPUT))]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # reference: autograd on the outputs, one window at a time, summed
    want = {k: torch.zeros_like(v) for k, v in got.items()}
    for ids in windows[:3]:
        outs = {}
        specs = [(li, name, proj(layer, name)) for li, layer in enumerate(decoder_layers(model))
                 for name in (HEAD_INPUT, NEURON_INPUT)]
        handles = [m.register_forward_hook(lambda mod, a, y, k=(li, name): outs.__setitem__(k, y))
                   for li, name, m in specs]
        try:
            with torch.enable_grad():
                emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
                loss = token_nll(model(inputs_embeds=emb, use_cache=False).logits, ids[None]).sum()
                keys = sorted(outs)
                grads = torch.autograd.grad(loss, [outs[k] for k in keys])
        finally:
            for h in handles:
                h.remove()
        for k, g in zip(keys, grads):
            g = g.reshape(-1, g.shape[-1]).double()
            want[k] += g.T @ g
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-10), k
        assert float(torch.trace(got[k])) > 0


def test_metric_root_squares_back():
    f = _spd(6, 0)
    s = metric_root(f)
    assert torch.allclose(s @ s, f, atol=1e-9) and torch.allclose(s, s.T)


def test_first_removal_is_the_cheapest_in_the_metric(setup):
    model, _, grams = setup
    module = proj(decoder_layers(model)[1], NEURON_INPUT)
    stats = grams[(1, NEURON_INPUT)]
    metric = _spd(module.out_features, 5)
    n = module.in_features
    path = greedy_path(module.weight, None, stats, torch.arange(n)[:, None], 1, step=1, ridge_ratio=0.0,
                       metric=metric)
    errors = [_metric_error(module.weight, stats, torch.tensor([c for c in range(n) if c != r]), metric)
              for r in range(n)]
    first = path.order[0]
    assert errors[first] <= min(errors) * (1 + 1e-6) + 1e-9
    assert path.errors[0] == pytest.approx(errors[first], rel=1e-6)
    # the metric matters: the plain path's first pick is generally another neuron, and its cost differs
    plain = greedy_path(module.weight, None, stats, torch.arange(n)[:, None], 1, step=1, ridge_ratio=0.0)
    assert plain.errors[0] != pytest.approx(path.errors[0], rel=1e-3)


def test_identity_metric_is_plain_obs(setup):
    model, _, grams = setup
    module = proj(decoder_layers(model)[2], NEURON_INPUT)
    cols = torch.arange(module.in_features)[:, None]
    eye = torch.eye(module.out_features, dtype=torch.float64)
    a = greedy_path(module.weight, None, grams[(2, NEURON_INPUT)], cols, 6, step=4, metric=eye)
    b = greedy_path(module.weight, None, grams[(2, NEURON_INPUT)], cols, 6, step=4)
    assert a.order == b.order and a.errors == pytest.approx(b.errors, rel=1e-9)
    with pytest.raises(ObsError, match="output metric"):
        greedy_path(module.weight, None, grams[(2, NEURON_INPUT)], cols, 1, metric=torch.eye(3))


def test_the_refit_is_optimal_in_any_output_metric(setup):
    """What lets obs_fisher keep the lstsq refit: its columns minimise tr(F ΔW G ΔWᵀ) for every SPD F."""
    model, _, grams = setup
    module = proj(decoder_layers(model)[0], NEURON_INPUT)
    stats = grams[(0, NEURON_INPUT)]
    keep = torch.arange(0, module.in_features, 2)
    metric = _spd(module.out_features, 7)
    new_w, _ = reconstruct_linear(module.weight, None, keep, stats, "lstsq", ridge_ratio=0.0)
    w = module.weight.detach().double()

    def err(cols):
        full = torch.zeros_like(w)
        full[:, keep] = cols
        d = w - full
        return float(torch.einsum("po,oi,ij,pj->", metric, d, stats.gram, d))

    best = err(new_w.double())
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):
        assert err(new_w.double() + 1e-3 * torch.randn(new_w.shape, generator=gen, dtype=torch.float64)) > best


def test_obs_fisher_criterion(setup):
    model, windows, grams = setup
    before = copy.deepcopy(model.state_dict())
    scores = importance.compute_importance(model, windows, ["obs_fisher"], obs_step=4, obs_fisher_windows=4,
                                           progress=False)["obs_fisher"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scores.criterion == "obs_fisher" and scores.provenance["obs_fisher_windows"] == 4
    fisher = output_fisher(model, windows[:4], show_progress=False)
    direct = obs_scores(model, grams, step=4, fisher=fisher, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(scores.neurons, direct.neurons))
    assert all(torch.equal(a, b) for a, b in zip(scores.heads, direct.heads))
    plan = allocation.plan_both(model, scores, head_rate=0.25, mlp_rate=0.25)
    assert [len(plan.kept_heads(li)) for li in range(3)] == [6, 6, 6]
    with pytest.raises(ValueError, match="obs_fisher_windows"):
        importance.compute_importance(model, windows, ["obs_fisher"], obs_fisher_windows=0, progress=False)
    with pytest.raises(RuntimeError, match="OFFLOAD='off'"):  # offload mode streams layers: no backward pass
        importance.compute_importance(model, windows, ["obs_fisher"], compute_device="cpu", progress=False)
    with pytest.raises(ObsError, match="Fisher"):
        obs_scores(model, grams, fisher={k: v for k, v in fisher.items() if k[0] != 1}, progress=False)
