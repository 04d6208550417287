"""Reconstruction: streamed Grams, the ridge refit, bias handling, sequential vs one-shot, and the pruned result."""
import copy

import pytest
import torch
import torch.nn as nn

from pruning_utils.model.arch import decoder_layers, layer_shapes
from pruning_utils.model.hooks import hooks
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramCollector, GramStats
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.reconstruction import (
    ReconstructionError,
    collect_grams,
    prune_and_reconstruct,
    reconstruct_in_place,
    reconstruct_linear,
    target_module,
)

HEADS_KEPT = [0, 1, 4, 5]  # 8 q heads in 2 KV groups: two kept per group
HD = 16  # head_dim of the tiny models


def _windows(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def _inputs_of(model, module: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Return every input row the module sees (tests may store activations; the library never does)."""
    rows = []
    with hooks((module, "pre", lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))), torch.no_grad():
        model(windows)
    return torch.cat(rows)


def _plan(model, heads=None, neurons=None) -> PruningPlan:
    plan = PruningPlan.identity(layer_shapes(model), "tiny")
    plan.heads, plan.neurons = heads or {}, neurons or {}
    return plan


def _head_channels(heads):
    return torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in heads])


# ------------------------------------------------------------------------------------------- streamed Grams


def test_gram_is_memory_flat_and_exact():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    batches = [torch.randn(3, 7, 12) for _ in range(10)]
    sizes = []
    for n in (1, 10):
        with GramCollector({"x": layer}) as col, torch.no_grad():
            for b in batches[:n]:
                layer(b)
        stats = col.stats["x"]
        tensors = {k: tuple(v.shape) for k, v in vars(stats).items() if torch.is_tensor(v)}
        sizes.append(tensors)
        x = torch.cat(batches[:n]).reshape(-1, 12).double()
        assert stats.count == n * 21
        # batch products are fp32 (activations are fp32), sums across batches fp64: fp32-level agreement
        ref = x.T @ x
        assert torch.allclose(stats.gram, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        assert torch.allclose(stats.sum, x.sum(0), rtol=1e-5, atol=1e-6 * x.abs().sum().item())
    assert sizes[0] == sizes[1] == {"gram": (12, 12), "sum": (12,)}  # nothing grows with the number of batches
    assert not layer._forward_pre_hooks  # hooks removed on exit


def test_collector_removes_hooks_on_error():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError):
        with GramCollector({0: layer}):
            raise RuntimeError("boom")
    assert not layer._forward_pre_hooks


def test_collect_grams_matches_stored_activations():
    model = tiny_model("llama")
    windows = _windows(0)
    stats = collect_grams(model, windows, layers=[1], batch_size=3)
    assert set(stats) == {(1, "o_proj"), (1, "down_proj")}
    for name in ("o_proj", "down_proj"):
        x = _inputs_of(model, target_module(decoder_layers(model)[1], name), windows).double()
        assert stats[(1, name)].count == windows.numel()
        ref = x.T @ x
        assert torch.allclose(stats[(1, name)].gram, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------- the refit


@pytest.mark.parametrize("family", ["llama", "mistral"])  # with and without an o_proj bias
@pytest.mark.parametrize("ridge_ratio", [1e-2, 1e-9])
def test_keeping_everything_returns_the_original_weights(family, ridge_ratio):
    # the ridge pulls toward the original weights, so with nothing removed there is nothing to change
    model = tiny_model(family)
    stats = collect_grams(model, _windows(0), layers=[0], which=["o_proj"])[(0, "o_proj")]
    o_proj = decoder_layers(model)[0].self_attn.o_proj
    keep = torch.arange(o_proj.in_features)
    w, b = reconstruct_linear(o_proj.weight, o_proj.bias, keep, stats, "lstsq", ridge_ratio=ridge_ratio)
    assert torch.allclose(w, o_proj.weight, atol=1e-6)
    assert (b is None) == (o_proj.bias is None)
    if b is not None:
        assert torch.allclose(b, o_proj.bias, atol=1e-6)


def test_ridge_interpolates_between_least_squares_and_plain_removal():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
    stats = GramStats.empty(8)
    stats.add(x)
    w, keep = torch.randn(3, 8, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 2, 5, 7])
    exact = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # plain least squares
    assert torch.allclose(reconstruct_linear(w, None, keep, stats, "lstsq", 0.0)[0], exact, atol=1e-8)
    assert torch.allclose(reconstruct_linear(w, None, keep, stats, "lstsq", 1e9)[0], w[:, keep], atol=1e-6)


def test_lstsq_with_bias_recovers_affine_redundancy_exactly():
    # removed channels are an affine function of kept ones: the refit (with its constant channel) is exact
    gen = torch.Generator().manual_seed(0)
    kept_x = torch.randn(500, 6, generator=gen, dtype=torch.float64) + 3.0
    removed_x = kept_x[:, :2] @ torch.randn(2, 3, generator=gen, dtype=torch.float64) + 2.0
    x = torch.cat([kept_x, removed_x], 1)
    stats = GramStats.empty(9)
    stats.add(x)
    w, b = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    keep = torch.arange(6)
    new_w, new_b = reconstruct_linear(w, b, keep, stats, "lstsq", ridge_ratio=1e-12)
    assert torch.allclose(x[:, :6] @ new_w.T + new_b, x @ w.T + b, atol=1e-6)


def test_bias_mode_adds_the_mean_contribution_of_removed_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen) + torch.arange(5.0)
    stats = GramStats.empty(5)
    stats.add(x)
    w, b = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    new_w, new_b = reconstruct_linear(w, b, torch.tensor([0, 2, 4]), stats, "bias")
    assert torch.equal(new_w, w[:, [0, 2, 4]])
    assert torch.allclose(new_b, b + w[:, [1, 3]] @ x[:, [1, 3]].mean(0), atol=1e-5)
    with pytest.raises(ReconstructionError, match="lstsq"):
        reconstruct_linear(w, None, torch.tensor([0, 2, 4]), stats, "bias")


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(ReconstructionError, match="none, bias, lstsq"):
        reconstruct_linear(torch.zeros(2, 3), None, torch.tensor([0]), None, "ridge")


def test_negative_ridge_is_refused_and_ridge_changes_the_refit():
    torch.manual_seed(0)
    x, w = torch.randn(64, 6), torch.randn(3, 6)
    stats = GramStats.empty(6)
    stats.add(x)
    keep = torch.tensor([0, 2, 4])
    with pytest.raises(ReconstructionError, match="ridge_ratio must be >= 0"):
        reconstruct_linear(w, None, keep, stats, "lstsq", ridge_ratio=-1e-3)
    small, _ = reconstruct_linear(w, None, keep, stats, "lstsq", ridge_ratio=1e-4)
    large, _ = reconstruct_linear(w, None, keep, stats, "lstsq", ridge_ratio=10.0)
    # a large ridge pulls the refit toward the kept columns of W; a small one solves the least squares
    assert (large - w[:, keep]).norm() < (small - w[:, keep]).norm()


def _heldout_error(family: str, name: str, keep: torch.Tensor, mode: str) -> float:
    model = tiny_model(family)
    module = target_module(decoder_layers(model)[1], name)
    stats = collect_grams(model, _windows(0, 32), layers=[1], which=[name])[(1, name)]
    x = _inputs_of(model, module, _windows(1))  # held-out activations
    w, b = reconstruct_linear(module.weight, module.bias, keep, stats, mode)
    with torch.no_grad():
        ref = module(x)
        out = x[:, keep] @ w.T + (0 if b is None else b)
    return ((out - ref).norm() / ref.norm()).item()


def test_lstsq_lowers_heldout_error_of_o_proj(family):
    keep = _head_channels(HEADS_KEPT)
    assert _heldout_error(family, "o_proj", keep, "lstsq") < 0.5 * _heldout_error(family, "o_proj", keep, "none")


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_bias_and_lstsq_lower_heldout_error_of_down_proj_with_bias(mode):
    keep = torch.arange(0, 96, 2)  # tiny llama has mlp_bias=True
    assert _heldout_error("llama", "down_proj", keep, mode) < 0.5 * _heldout_error("llama", "down_proj", keep, "none")


# ------------------------------------------------------------------------------------------- applying a plan


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def test_prune_and_reconstruct_beats_plain_removal_and_matches_full_shape_refit(family):
    base = tiny_model(family)
    plan = _plan(base, heads={li: HEADS_KEPT for li in range(3)},
                 neurons={0: list(range(0, 96, 2)), 2: list(range(60))})
    held_out = _windows(1)
    ref = _logits(base, held_out)
    errors = {}
    for mode in ("none", "lstsq"):
        full = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), mode=mode)
        pruned = prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), mode=mode)
        assert [s.n_heads for s in layer_shapes(pruned)] == [4, 4, 4]
        assert [s.intermediate for s in layer_shapes(pruned)] == [48, 96, 60]
        # zeroed columns compute what slicing does: surgery after the refit changes nothing
        assert torch.allclose(_logits(full, held_out), _logits(pruned, held_out), atol=1e-5)
        errors[mode] = ((_logits(pruned, held_out) - ref).norm() / ref.norm()).item()
    assert errors["lstsq"] < 0.5 * errors["none"]



def test_shared_one_shot_stats_equal_collecting_per_plan():
    base = tiny_model("llama")
    stats = collect_grams(base, _windows(0))  # one pass serves every plan cut from this model
    plan = _plan(base, heads={1: HEADS_KEPT}, neurons={2: list(range(40))})
    shared = prune_and_reconstruct(copy.deepcopy(base), plan, None, sequential=False, stats=stats)
    own = prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), sequential=False)
    for p, q in zip(shared.parameters(), own.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ReconstructionError, match="sequential=False"):
        reconstruct_in_place(copy.deepcopy(base), plan, None, sequential=True, stats=stats)
    with pytest.raises(ReconstructionError, match="collect_grams"):
        reconstruct_in_place(copy.deepcopy(base), plan, None, sequential=False, stats={})

@pytest.mark.parametrize("what", ["heads", "neurons"])
def test_sequential_equals_one_shot_on_one_layer(what):
    # one kind at a time: with both, sequential fits down_proj after o_proj's refit (on purpose), one-shot before
    base = tiny_model("llama", num_hidden_layers=1)
    plan = _plan(base, heads={0: HEADS_KEPT}) if what == "heads" else _plan(base, neurons={0: list(range(0, 96, 3))})
    seq = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=True)
    one = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=False)
    for p, q in zip(seq.parameters(), one.parameters()):
        assert torch.allclose(p, q, atol=1e-6)



def test_chase_equals_sequential_without_upstream_error_and_needs_sequential():
    base = tiny_model("llama")
    plan = _plan(base, heads={0: HEADS_KEPT})  # first layer only: the pruned and unpruned paths see the same input
    chased = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), chase=True)
    plain = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0))
    for p, q in zip(chased.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ReconstructionError, match="sequential=True"):
        reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=False, chase=True)


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_chase_lowers_calibration_error_when_every_layer_is_pruned(mode):
    base = tiny_model("llama")
    plan = _plan(base, heads={li: HEADS_KEPT for li in range(3)},
                 neurons={li: list(range(0, 96, 2)) for li in range(3)})
    ref = _logits(base, _windows(0))
    err = {chase: ((_logits(prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), mode=mode, chase=chase),
                            _windows(0)) - ref).norm() / ref.norm()).item() for chase in (False, True)}
    assert err[True] <= err[False] * 1.01

def test_sequential_replays_layers_with_their_own_masks():
    # only the last layer is pruned, so sequential must equal one-shot: this checks that cached inputs are
    # replayed through layers 0-1 with each layer's own mask (layer 1 uses a sliding window)
    base = tiny_model("qwen2", layer_types=["full_attention", "sliding_attention", "full_attention"],
                      use_sliding_window=True, sliding_window=8)
    plan = _plan(base, heads={2: HEADS_KEPT}, neurons={2: list(range(50))})
    seq = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=True, batch_size=5)
    one = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=False)
    for name in ("o_proj",):  # down_proj differs on purpose (fit after o_proj's refit)
        a, b = (target_module(decoder_layers(m)[2], name).weight for m in (seq, one))
        assert torch.allclose(a, b, atol=1e-5)
    assert all(type(layer).__name__ != "_Catcher" for layer in decoder_layers(seq))  # real layers restored


def test_precomputed_one_shot_stats_match_a_fresh_pass():
    base = tiny_model("qwen3")
    plan = _plan(base, heads={1: HEADS_KEPT}, neurons={0: list(range(40))})
    stats = collect_grams(base, _windows(0))
    reused = reconstruct_in_place(copy.deepcopy(base), plan, None, sequential=False, stats=stats)
    fresh = reconstruct_in_place(copy.deepcopy(base), plan, _windows(0), sequential=False)
    for p, q in zip(reused.parameters(), fresh.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ReconstructionError, match="sequential=False"):
        reconstruct_in_place(copy.deepcopy(base), plan, None, sequential=True, stats=stats)


def test_sequential_skips_dropped_layers():
    base = tiny_model("mistral")
    plan = _plan(base, neurons={2: list(range(48))})
    plan.layers = [0, 2]
    pruned = prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0))
    assert [s.intermediate for s in layer_shapes(pruned)] == [96, 48]


def test_bias_mode_needs_an_existing_bias():
    model = tiny_model("mistral")  # no o_proj / down_proj bias
    with pytest.raises(ReconstructionError, match="lstsq"):
        prune_and_reconstruct(model, _plan(model, heads={0: HEADS_KEPT}), _windows(0), mode="bias")
    assert [s.n_heads for s in layer_shapes(model)] == [8, 8, 8]  # refused before touching the model
    llama = tiny_model("llama")  # attention_bias and mlp_bias: allowed
    prune_and_reconstruct(llama, _plan(llama, heads={0: HEADS_KEPT}, neurons={1: list(range(48))}), _windows(0),
                          mode="bias")
    assert [s.n_heads for s in layer_shapes(llama)] == [4, 8, 8]


# ------------------------------------------------------------------------------------------- embedded model


@pytest.mark.slow
class TestEmbedded:
    def test_lstsq_lowers_heldout_logit_error(self, embedded):
        from pruning_utils.data.sources import calibration_windows, eval_chunks

        model, tok = embedded
        calib = calibration_windows(tok, n_samples=8, seq_len=128)
        held_out = eval_chunks(tok, seq_len=128, max_tokens=256)
        plan = PruningPlan.identity(layer_shapes(model), "smollm2-135m")
        plan.neurons = {li: list(range(0, 1536, 4)) + list(range(1, 1536, 4)) for li in (0, 1, 2)}
        ref = _logits(model, held_out)
        errors = {}
        for mode in ("none", "lstsq"):
            pruned = prune_and_reconstruct(copy.deepcopy(model), plan, calib, mode=mode)
            errors[mode] = ((_logits(pruned, held_out) - ref).norm() / ref.norm()).item()
        assert errors["lstsq"] < errors["none"]


@pytest.mark.parametrize("chase", [False, True])
def test_reselect_keeps_the_counts_and_kv_groups_and_records_its_choice(chase):
    base = tiny_model("llama")
    plan = _plan(base, heads={li: HEADS_KEPT for li in range(3)},
                 neurons={li: list(range(0, 96, 2)) for li in range(3)})
    given = copy.deepcopy(plan)
    ref = _logits(base, _windows(0))
    err, chosen = {}, None
    for reselect in (False, True):
        pruned = prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), chase=chase, reselect=reselect)
        err[reselect] = ((_logits(pruned, _windows(0)) - ref).norm() / ref.norm()).item()
        chosen = pruned.pruning_plan
    assert plan == given  # the caller's plan is left as given
    assert chosen.provenance["reselected"] == dict(chase=chase, ridge_ratio=1e-2)
    for li in range(3):
        heads = chosen.kept_heads(li)
        assert len(heads) == len(HEADS_KEPT) and sum(h < 4 for h in heads) == 2  # 2 kept in each KV group of 4
        assert len(chosen.kept_neurons(li)) == 48
    assert any(chosen.kept_neurons(li) != plan.kept_neurons(li) for li in range(3))
    # chosen by the reconstruction error left, not every other channel: the pruned model is closer to the dense one
    assert err[True] < err[False]


def test_reselect_on_the_first_layer_is_the_obs_path_of_the_one_shot_grams():
    from pruning_utils.prune.obs import greedy_path

    base = tiny_model("llama")
    plan = _plan(base, neurons={0: list(range(48))})
    chosen = prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), chase=True, reselect=True).pruning_plan
    down = target_module(decoder_layers(base)[0], "down_proj")
    path = greedy_path(down.weight, down.bias, collect_grams(base, _windows(0))[(0, "down_proj")],
                       torch.arange(96)[:, None], 6, step=8)
    assert sorted(set(range(96)) - set(chosen.kept_neurons(0))) == sorted(path.order)
    with pytest.raises(ReconstructionError, match="sequential=True and mode='lstsq'"):
        prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), sequential=False, reselect=True)
    with pytest.raises(ReconstructionError, match="sequential=True and mode='lstsq'"):
        prune_and_reconstruct(copy.deepcopy(base), plan, _windows(0), mode="bias", reselect=True)
