"""Allocation: equal KV groups, global ranking under protections and minimums, targets, errors, JSON round trip."""
import warnings

import pytest
import torch

from pruning_utils.model.arch import layer_shapes
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.allocation import plan_both, plan_heads, plan_neurons
from pruning_utils.prune.scores import Scores


def _scores(model, seed: int = 0, criterion: str = "test") -> Scores:
    g = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(model)
    return Scores([torch.rand(s.n_heads, generator=g) for s in shapes],
                  [torch.rand(s.intermediate, generator=g) for s in shapes], criterion)


def _group_sizes(plan: PruningPlan, layer: int, n_kv: int) -> list[int]:
    g = plan.base_heads[layer] // n_kv
    kept = plan.kept_heads(layer)
    return [sum(1 for h in kept if h // g == k) for k in range(n_kv)]


def _non_embedding(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=4)  # 8 q heads / 2 kv heads, MLP 96


@pytest.mark.parametrize("n_heads,n_kv,rate,kept", [(16, 2, 0.2, 12), (9, 3, 0.33, 6), (8, 2, 0.25, 6)])
def test_uniform_rounds_per_group(n_heads, n_kv, rate, kept):
    model = tiny_model("qwen2", num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=8)
    plan = plan_heads(model, _scores(model), rate)
    assert [h for h, _ in plan.result_shapes()] == [kept] * 3
    for layer in range(3):
        assert len(set(_group_sizes(plan, layer, n_kv))) == 1


def test_uniform_removes_lowest_in_each_group(model):
    s = _scores(model)
    plan = plan_heads(model, s, 0.25)
    for layer in range(4):
        removed = sorted(set(range(8)) - set(plan.kept_heads(layer)))
        want = sorted(int(k * 4 + s.heads[layer][k * 4:(k + 1) * 4].argmin()) for k in range(2))
        assert removed == want
    assert plan.criterion == "test" and plan.allocation == "uniform" and plan.head_rate == 0.25
    assert plan.source_model == "tiny-llama"


def test_global_concentrates_on_weak_layers_and_respects_minimum(model):
    s = _scores(model)
    s.heads[1] = s.heads[1] * 1e-3  # layer 1 is far weaker than the others on the raw scale
    plan = plan_heads(model, s, 0.25, allocation="global", normalize="none", min_per_group=1)
    assert len(plan.kept_heads(1)) == 2  # emptied down to one head per group, no further
    assert _group_sizes(plan, 1, 2) == [1, 1]
    assert sum(8 - h for h, _ in plan.result_shapes()) == 8
    for layer in range(4):
        assert len(set(_group_sizes(plan, layer, 2))) == 1


def test_global_zscore_keeps_groups_equal_and_hits_target(model):
    plan = plan_heads(model, _scores(model, seed=3), 0.5, allocation="global")
    assert sum(8 - h for h, _ in plan.result_shapes()) == 16
    for layer in range(4):
        assert len(set(_group_sizes(plan, layer, 2))) == 1
        assert min(_group_sizes(plan, layer, 2)) >= 1


def test_protected_and_only_last_layers_untouched(model):
    s = _scores(model)
    s.heads[0] = s.heads[0] * 1e-3
    plan = plan_heads(model, s, 0.5, allocation="global", normalize="none", protect_first=1, protect_last=1)
    assert 0 not in plan.heads and 3 not in plan.heads
    assert sum(8 - len(plan.kept_heads(li)) for li in (1, 2)) == 8  # 50% of the eligible 16 heads
    plan = plan_neurons(model, s, 0.5, only_last=1)
    assert list(plan.neurons) == [3] and len(plan.kept_neurons(3)) == 48
    plan = plan_neurons(model, s, 0.3, allocation="global", protect_first=2)
    assert set(plan.neurons) <= {2, 3}


def test_rates_that_empty_groups_or_layers_raise(model):
    s = _scores(model)
    with pytest.raises(ValueError, match=r"largest allowed rate is 0.750"):
        plan_heads(model, s, 0.9)
    with pytest.raises(ValueError, match=r"largest allowed rate is 0.500"):
        plan_heads(model, s, 0.7, min_per_group=2)
    with pytest.raises(ValueError, match="largest allowed rate"):
        plan_heads(model, s, 0.9, allocation="global")
    with pytest.raises(ValueError, match="largest allowed rate"):
        plan_neurons(model, s, 0.99, min_per_layer=8)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            plan_heads(model, s, bad)
    with pytest.raises(ValueError, match="unknown allocation 'globl'"):
        plan_heads(model, s, 0.2, allocation="globl")
    with pytest.raises(ValueError, match="compute the scores on this very model"):
        plan_heads(tiny_model("llama"), s, 0.2)  # 3 layers vs scores for 4


def test_rounding_to_zero_warns(model):
    with pytest.warns(UserWarning, match="effective rate 0.000"):
        plan = plan_heads(model, _scores(model), 0.1)
    assert plan.heads == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_heads(model, _scores(model), 0.0).heads == {}


def test_neurons_uniform_multiple_of_and_global(model):
    s = _scores(model)
    plan = plan_neurons(model, s, 0.3, multiple_of=16)
    assert [n for _, n in plan.result_shapes()] == [64] * 4  # 96 * 0.7 = 67.2 -> 64
    removed = sorted(set(range(96)) - set(plan.kept_neurons(0)))
    assert removed == sorted(s.neurons[0].argsort()[:32].tolist())
    plan = plan_neurons(model, s, 0.25, allocation="global", multiple_of=8, min_per_layer=16)
    widths = [n for _, n in plan.result_shapes()]
    assert sum(96 - w for w in widths) == 96 and all(w % 8 == 0 and w >= 16 for w in widths)


def test_target_non_embedding(model):
    s = _scores(model)
    before = _non_embedding(model)
    head_cost = 2 * 64 * 16 + 16  # q rows + o columns + q bias
    plan = plan_heads(model, s, allocation="global", target_non_embedding=before - 8 * head_cost)
    assert sum(8 - h for h, _ in plan.result_shapes()) == 8
    assert plan.provenance["non_embedding_after"] == before - 8 * head_cost
    plan = plan_both(model, s, target_non_embedding=int(before * 0.8), allocation="global")
    after = plan.provenance["non_embedding_after"]
    assert abs(after - before * 0.8) < 0.02 * before
    with pytest.raises(ValueError, match="out of reach"):
        plan_heads(model, s, target_non_embedding=before // 10)


def test_plan_both_and_json_round_trip(model, tmp_path):
    s = _scores(model)
    plan = plan_both(model, s, head_rate=0.25, mlp_rate=0.5, allocation="uniform", neuron_scores=_scores(model, 1, "x"))
    assert plan.result_shapes() == [(6, 48)] * 4
    assert plan.criterion == "test+x" and plan.head_rate == 0.25 and plan.mlp_rate == 0.5
    plan.to_json(tmp_path / "plan.json")
    back = PruningPlan.from_json(tmp_path / "plan.json")
    assert back == plan


def test_plan_from_computed_scores_is_json_ready(model, tmp_path):
    from pruning_utils.prune.importance import compute_importance

    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    s = compute_importance(model, windows, ["mix"], progress=False,
                           mix_weights={"activation": 1, "magnitude": 1})["mix"]
    plan = plan_both(model, s, head_rate=0.25, mlp_rate=0.25, allocation="global", multiple_of=8)
    back = PruningPlan.from_json(plan.to_json())
    assert back.provenance["scores"]["mix_weights"] == {"activation": 1, "magnitude": 1}
    assert back.criterion == "mix" and back.source_model == "tiny-llama" and back == plan


def test_combined_plan_removes_what_either_removes(model):
    heads = plan_heads(model, _scores(model, 0, "h"), 0.25)
    neurons = plan_neurons(model, _scores(model, 1, "n"), 0.5)
    both = plan_both(model, _scores(model, 0, "h"), head_rate=0.25, mlp_rate=0.5, neuron_scores=_scores(model, 1, "n"))
    combined = neurons.combined_with(heads)
    assert (combined.heads, combined.neurons) == (both.heads, both.neurons)
    assert combined.criterion == "h+n" and (combined.head_rate, combined.mlp_rate) == (0.25, 0.5)
    # overlapping removals: the kept set is the intersection, layer by layer
    other = plan_neurons(model, _scores(model, 2, "n2"), 0.5)
    twice = neurons.combined_with(other)
    for layer in range(4):
        assert twice.kept_neurons(layer) == sorted(set(neurons.kept_neurons(layer)) & set(other.kept_neurons(layer)))
    small = plan_heads(tiny_model("llama", num_hidden_layers=2),
                       _scores(tiny_model("llama", num_hidden_layers=2)), 0.25)
    with pytest.raises(ValueError, match="different shapes cannot be combined"):
        heads.combined_with(small)
