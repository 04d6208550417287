"""Local MLP refit: it lowers each layer's held-out output error, reports it truthfully, never keeps a worse layer,
is reproducible from the seed and refuses layer counts it cannot pair."""
import copy

import pytest
import torch

from pruning_utils.model import calibration
from pruning_utils.model.arch import decoder_layers, layer_shapes, mlp, proj
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune import local_refit
from pruning_utils.prune.reconstruction import prune_and_reconstruct

N_WINDOWS, HOLD = 64, 8  # holdout 0.125 of 64 windows: the last 8 are never trained on


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (N_WINDOWS, 32), generator=torch.Generator().manual_seed(seed))


def _pruned(dense, windows, kept=48):
    """Return a copy of `dense` keeping `kept` of the 96 neurons of every layer, down_proj refit by lstsq."""
    plan = PruningPlan.identity(layer_shapes(dense), "tiny")
    plan.neurons = {li: list(range(0, 96, 2))[:kept] for li in range(len(decoder_layers(dense)))}
    return prune_and_reconstruct(copy.deepcopy(dense), plan, windows, mode="lstsq", sequential=False)


def _held_out_error(pruned, dense, windows, li: int) -> float:
    """Return layer li's relative MLP error on the held-out windows, measured independently of the module."""
    for i, layer, hidden, calls in calibration.walk_layers(dense, windows[-HOLD:], 4, li):
        if i == li:
            with torch.no_grad():
                x = torch.cat([calibration.input_of(layer, mlp(layer), h, c).flatten(0, -2)
                               for h, c in zip(hidden, calls)])
                y, got = mlp(layer)(x), mlp(decoder_layers(pruned)[li])(x)
            return float(((got - y) ** 2).sum() / (y ** 2).sum())


@pytest.fixture(scope="module")
def setup():
    dense, windows = tiny_model(seed=0), _windows()
    # gate/up x10 puts the SiLU gate in its nonlinear range: at the 0.02 init the tiny MLPs are nearly linear and the
    # lstsq refit alone leaves ~1e-5 of their output, nothing for the steps to fix
    with torch.no_grad():
        for layer in decoder_layers(dense):
            for name in ("gate_proj", "up_proj"):
                proj(layer, name).weight.mul_(10)
    return dense, windows, _pruned(dense, windows)


def test_refit_lowers_the_held_out_error_it_reports(setup):
    dense, windows, start = setup
    pruned = copy.deepcopy(start)
    report = local_refit.refit_mlps(pruned, dense, windows, steps=100, lr=3e-3, batch_tokens=256, progress=False)
    assert [r.layer for r in report] == [0, 1, 2]
    assert all(r.kept for r in report)
    for r in report:
        assert r.error_after <= r.error_before
        assert _held_out_error(start, dense, windows, r.layer) == pytest.approx(r.error_before, rel=1e-4)
        assert _held_out_error(pruned, dense, windows, r.layer) == pytest.approx(r.error_after, rel=1e-4)
    assert sum(r.error_after for r in report) < 0.9 * sum(r.error_before for r in report)
    # same shapes: the checkpoint still loads with stock from_pretrained
    assert [s.intermediate for s in layer_shapes(pruned)] == [s.intermediate for s in layer_shapes(start)]


def test_a_layer_the_steps_make_worse_keeps_its_weights(setup):
    dense, windows, start = setup
    pruned = copy.deepcopy(start)
    report = local_refit.refit_mlps(pruned, dense, windows, steps=5, lr=50.0, batch_tokens=256, progress=False)
    assert report and not any(r.kept for r in report)
    for a, b in zip(pruned.parameters(), start.parameters()):
        assert torch.equal(a, b)


def test_reproducible_from_the_seed_and_zero_steps_is_identity(setup):
    dense, windows, start = setup
    a, b, c = (copy.deepcopy(start) for _ in range(3))
    for model in (a, b):
        local_refit.refit_mlps(model, dense, windows, steps=10, lr=3e-3, batch_tokens=128, seed=3, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert local_refit.refit_mlps(c, dense, windows, steps=0, progress=False) == []
    for pc, ps in zip(c.parameters(), start.parameters()):
        assert torch.equal(pc, ps)


def test_unpruned_layers_are_left_alone_and_bad_settings_refused(setup):
    dense, windows, _ = setup
    same = copy.deepcopy(dense)
    assert local_refit.refit_mlps(same, dense, windows, steps=5, progress=False) == []
    shallow = tiny_model(seed=0, num_hidden_layers=2)
    with pytest.raises(local_refit.LocalRefitError, match="pairs layers by depth"):
        local_refit.refit_mlps(shallow, dense, windows, progress=False)
    with pytest.raises(local_refit.LocalRefitError, match="holdout"):
        local_refit.refit_mlps(same, dense, windows, holdout=1.0, progress=False)
    with pytest.raises(local_refit.LocalRefitError, match="none to train on"):
        local_refit.refit_mlps(_pruned(dense, windows), dense, windows[:1], progress=False)
    assert local_refit.reconstruction_label("lstsq", 60) == "lstsq+local"
    assert local_refit.reconstruction_label("lstsq", 0) == "lstsq"


def test_budget_benchmark_rows_measure_refit_copies(setup):
    from benchmarks.local_refit import measure_budgets
    from pruning_utils.measure import metrics

    dense, windows, start = setup
    before = [p.clone() for p in start.parameters()]
    sets = {"ppl": windows[-HOLD:], "fidelity_ppl": windows[:4], "heldout_ppl": windows[4:8]}
    rows = measure_budgets("tiny", start, dense, windows, sets, [0, 100], lr=3e-3, seed=0, progress=False)
    assert [r["steps"] for r in rows] == [0, 100]
    assert rows[0]["ppl"] == pytest.approx(metrics.perplexity(start, sets["ppl"], progress=False)["ppl"])
    assert rows[0]["layers_refit"] == 0 and rows[1]["layers_kept"] == 3
    assert rows[1]["error_after"] < rows[1]["error_before"]
    assert rows[1]["kl_to_baseline"] < rows[0]["kl_to_baseline"]  # a lower layer error moves toward the dense model
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), before))  # copies were refit, not the input


def test_variant_refit_reaches_the_unpruned_model_only_with_steps(setup):
    from pruning_utils.measure.mix import refit_locally
    from pruning_utils.measure.variants import Unpruned

    class Untouchable:  # a 'reload' source: reaching .model would load the unpruned model again
        @property
        def model(self):
            raise AssertionError("the unpruned model was reached for a refit of 0 steps")

    dense, windows, start = setup
    model = copy.deepcopy(start)
    assert refit_locally(model, Untouchable(), windows, dict(steps=0, lr=3e-3)) is model
    assert refit_locally(model, Untouchable(), windows, None) is model
    refit_locally(model, Unpruned(model=dense), windows, dict(steps=100, lr=3e-3, seed=0, device=None))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))


def test_benchmark_builds_the_default_s1_by_another_criterion(setup, tmp_path):
    from benchmarks.local_refit import build_s1, criterion_scores
    from pruning_utils.pipeline.profiles import DEFAULTS
    from pruning_utils.prune.scores import Scores, save_scores

    dense, windows, _ = setup
    g = torch.Generator().manual_seed(5)
    shapes = layer_shapes(dense)
    neurons = [torch.rand(s.intermediate, generator=g) for s in shapes]
    save_scores({"mine": Scores([torch.rand(s.n_heads, generator=g) for s in shapes], neurons, "mine", {})}, tmp_path)
    s1 = build_s1(dense, windows, criterion_scores(tmp_path, "mine"))
    for li, (layer, ref) in enumerate(zip(decoder_layers(s1), decoder_layers(dense))):
        n_keep = round(shapes[li].intermediate * (1 - DEFAULTS["MLP_RATE"]))
        top = torch.sort(torch.topk(neurons[li], n_keep).indices).values
        # the criterion's top neurons stay (gate rows untouched by the refit), in their order
        assert torch.equal(proj(layer, "gate_proj").weight, proj(ref, "gate_proj").weight[top])
        assert not torch.equal(proj(layer, "down_proj").weight, proj(ref, "down_proj").weight[:, top])  # refit
    assert layer_shapes(dense)[0].intermediate == 96  # the unpruned model was copied, not cut
    with pytest.raises(SystemExit, match="no 'other' scores"):
        criterion_scores(tmp_path, "other")
