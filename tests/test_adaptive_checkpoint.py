"""Notebook 05 on a pruned checkpoint (ADAPTIVE_MODEL): the unpruned model's scores restricted to the checkpoint's plan,
and every level nested inside the checkpoint's weights."""
import copy

import pytest
import torch

from pruning_utils.adaptive import experiment, nested_model
from pruning_utils.model import surgery
from pruning_utils.model.arch import decoder_layers, head_dim, layer_shapes, proj, set_proj
from pruning_utils.model.checkpoint import load_pruned, save_pruned
from pruning_utils.model.linears import LowRankLinear
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import TinyTokenizer, tiny_model
from pruning_utils.pipeline import stages
from pruning_utils.pipeline.stages import resolve_parameters
from pruning_utils.prune.scores import Scores, restrict_scores

# tiny models: 3 layers, 8 query heads in 2 KV groups of 4, 96 MLP neurons
KEPT_HEADS = {0: [7, 1, 2, 4, 5, 0], 1: [6, 0, 5, 3]}  # 3 and 2 per group, listed out of order; layer 2 keeps all 8
LEVEL = "heads:0.5+ffn:0.5"


def _scores(model, seed: int = 1) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores([torch.rand(s.n_heads, generator=g) for s in layer_shapes(model)],
                  [torch.rand(s.intermediate, generator=g) for s in layer_shapes(model)], "random")


def _plan(model, drop_layer: bool) -> PruningPlan:
    g = torch.Generator().manual_seed(2)
    plan = PruningPlan.identity(layer_shapes(model), "tiny")
    plan.heads = {li: list(kept) for li, kept in KEPT_HEADS.items()}
    plan.neurons = {li: torch.randperm(96, generator=g)[:width].tolist() for li, width in ((0, 64), (1, 80), (2, 40))}
    plan.layers = [0, 2] if drop_layer else None
    return plan


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.fixture(params=[("llama", False), ("qwen2", True)], ids=["llama", "qwen2-layer-dropped"])
def checkpoint(request, models_dir):
    """(base model, its scores, the plan, the checkpoint's name) of a pruned tiny model saved under models/."""
    family, drop_layer = request.param
    base = tiny_model(family)
    plan = _plan(base, drop_layer)
    save_pruned(surgery.apply_plan(copy.deepcopy(base), plan), TinyTokenizer(), "pruned")
    return base, _scores(base), plan, "pruned"


def test_restricted_scores_follow_the_heads_and_neurons_into_the_weights(checkpoint):
    base, scores, plan, name = checkpoint
    pruned, _ = load_pruned(name)
    assert [s.n_heads for s in layer_shapes(pruned)] == ([6, 8] if plan.layers else [6, 4, 8])  # per layer
    restricted = restrict_scores(scores, pruned.pruning_plan)
    hd, base_layers = head_dim(base), decoder_layers(base)
    assert len(restricted.heads) == len(decoder_layers(pruned)) == len(plan.kept_layers())
    for li, layer in enumerate(decoder_layers(pruned)):
        orig = plan.kept_layers()[li]
        # find each kept head / neuron in the base model by its weights, not by the plan's indices
        q, base_q = proj(layer, "q_proj").weight, proj(base_layers[orig], "q_proj").weight
        for j in range(q.shape[0] // hd):
            h = next(h for h in range(base_q.shape[0] // hd) if torch.equal(q[j * hd:(j + 1) * hd],
                                                                             base_q[h * hd:(h + 1) * hd]))
            assert restricted.heads[li][j] == scores.heads[orig][h]
        up, base_up = proj(layer, "up_proj").weight, proj(base_layers[orig], "up_proj").weight
        for j in range(up.shape[0]):
            n = next(n for n in range(base_up.shape[0]) if torch.equal(up[j], base_up[n]))
            assert restricted.neurons[li][j] == scores.neurons[orig][n]


def test_levels_nest_inside_the_checkpoint(checkpoint, tokens):
    base, scores, plan, name = checkpoint
    pruned, _ = load_pruned(name)
    reference, _ = load_pruned(name)
    nested = nested_model.NestedModel(pruned, restrict_scores(scores, pruned.pruning_plan), f"none,{LEVEL}")
    # the full level is the checkpoint (up to the fp32 summation order of the reordered heads and neurons)
    torch.testing.assert_close(_logits(nested.model, tokens), _logits(reference, tokens), atol=1e-5, rtol=0)
    nested.switch(LEVEL)
    kept = nested.kept(LEVEL)
    level_plan = PruningPlan.identity(layer_shapes(reference), name)
    level_plan.heads, level_plan.neurons = kept["heads"], kept["neurons"]
    union = level_plan.composed_with(plan)  # the level in the unpruned model's indices
    # the level keeps, of what the checkpoint kept, the best-scored heads of each KV group and neurons by the
    # *unpruned* model's scores
    for li, orig in enumerate(plan.kept_layers()):
        group, per_group = 4, len(kept["heads"][li]) // 2
        for g in range(2):
            mine = sorted(h for h in plan.kept_heads(orig) if h // group == g)
            best = sorted(mine, key=lambda h: -scores.heads[orig][h].item())[:per_group]
            assert sorted(h for h in union.kept_heads(orig) if h // group == g) == sorted(best)
        width = len(kept["neurons"][li])
        best = sorted(plan.kept_neurons(orig), key=lambda n: -scores.neurons[orig][n].item())[:width]
        assert sorted(union.kept_neurons(orig)) == sorted(best)
    # and computes what surgery builds from the unpruned model with that union plan
    rebuilt = surgery.apply_plan(copy.deepcopy(base), union)
    torch.testing.assert_close(_logits(nested.model, tokens), _logits(rebuilt, tokens), atol=1e-5, rtol=0)


def test_notebook_levels_build_on_a_checkpoint_of_unequal_layers(checkpoint, tokens):
    # what notebook 05 builds (a layers: level, the refit, the INT8 copy) on per-layer shapes that differ
    pytest.importorskip("torchao")
    _, scores, _, name = checkpoint
    model, tok, restricted = experiment.full_level("tiny-llama", name, scores, device="cpu", dtype="float32")
    full = _logits(model, tokens)
    levels = "none,ffn:0.5+layers:0.34,heads:0.5,int8"
    nested = experiment.build_nested(model, tok, restricted, levels, text_source="embedded", n_calib=2, seq_len=16,
                                     refit=True)
    assert list(nested.levels) == levels.split(",") and nested.refit_s > 0
    for level in nested.levels:
        nested.switch(level)
        logits = _logits(nested.active, tokens)
        assert logits.shape == full.shape and torch.isfinite(logits).all()
    nested.switch("int8")
    torch.testing.assert_close(_logits(nested.active, tokens), full, atol=0.05, rtol=0)  # INT8 of the checkpoint


def test_a_plan_applied_to_a_checkpoint_records_what_surgery_kept(checkpoint, tokens):
    # the checkpoint's plan lists its heads out of order; surgery keeps them in order, and so must the composed plan
    base, _, plan, name = checkpoint
    pruned, _ = load_pruned(name)
    second = PruningPlan.identity(layer_shapes(pruned), name)
    second.heads, second.neurons = {0: [0, 3]}, {0: list(range(0, 64, 2))}
    surgery.apply_plan(pruned, second)
    rebuilt = surgery.apply_plan(copy.deepcopy(base), pruned.pruning_plan)  # the recorded cumulative plan
    torch.testing.assert_close(_logits(pruned, tokens), _logits(rebuilt, tokens), atol=1e-6, rtol=0)


def test_scores_of_another_model_are_refused(checkpoint):
    _, scores, plan, name = checkpoint
    pruned, _ = load_pruned(name)
    wider = _scores(tiny_model("llama", intermediate_size=128))
    with pytest.raises(ValueError, match="layer 0: the model 8 query heads and 96 MLP neurons, the scores 8 query "
                                         "heads and 128 MLP neurons.*scores of another model"):
        restrict_scores(wider, plan)
    with pytest.raises(ValueError, match="scores of another model"):
        experiment.full_level("tiny-llama", name, wider, device="cpu")
    with pytest.raises(ValueError, match="3 layers, 2 scored; layer 2: the model 8 query heads and 96 MLP neurons, "
                                         "the scores no such layer"):
        restrict_scores(Scores(scores.heads[:2], scores.neurons[:2], "short"), plan)
    # the unpruned model's scores, not restricted, do not fit the checkpoint's weights
    with pytest.raises(ValueError, match="do not fit the model .*layer 0: the model 6 query heads and 64 MLP "
                                         "neurons, the scores 8 query heads and 96 MLP neurons.*restrict_scores"):
        nested_model.NestedModel(pruned, scores)


def test_full_level_loads_the_checkpoint_and_its_restricted_scores(checkpoint, capsys):
    base, scores, plan, name = checkpoint
    model, tok, restricted = experiment.full_level("tiny-llama", name, scores, device="cpu", dtype="float32")
    assert isinstance(tok, TinyTokenizer) and [s.n_heads for s in layer_shapes(model)] == [
        len(plan.kept_heads(i)) for i in plan.kept_layers()]
    want = restrict_scores(scores, plan)
    assert all(torch.equal(a, b) for a, b in zip(restricted.heads + restricted.neurons, want.heads + want.neurons))
    layers = len(plan.kept_layers())
    assert f"full level: checkpoint pruned of tiny ({layers} of 3 layers" in capsys.readouterr().out
    model, _, same = experiment.full_level("tiny-llama", "", scores, device="cpu", dtype="float32")
    assert same is scores and [s.n_heads for s in layer_shapes(model)] == [8, 8, 8]  # '': the unpruned MODEL


def test_full_level_refuses_missing_int8_and_factorised_checkpoints(models_dir):
    from pruning_utils.compress.quantize import quantize_int8
    from pruning_utils.model.checkpoint import save_quantized

    pytest.importorskip("torchao")
    model = tiny_model("llama")
    scores = _scores(model)
    with pytest.raises(ValueError, match="'mix_pruned': no pruned checkpoint at .*run the stage that writes it"):
        experiment.full_level("tiny-llama", "mix_pruned", scores, device="cpu")
    save_quantized(quantize_int8(model), TinyTokenizer(), "int8")
    with pytest.raises(ValueError, match="'int8' is an INT8 checkpoint.*the checkpoint it was quantized from"):
        experiment.full_level("tiny-llama", "int8", scores, device="cpu")
    layer = decoder_layers(model)[1]
    up = proj(layer, "up_proj")
    set_proj(layer, "up_proj", LowRankLinear(torch.nn.Linear(up.in_features, 4, bias=False),
                                             torch.nn.Linear(4, up.out_features, bias=up.bias is not None)))
    save_pruned(model, TinyTokenizer(), "lowrank")
    with pytest.raises(ValueError, match=r"'lowrank' stores factorised projections \(1.up_proj"):
        experiment.full_level("tiny-llama", "lowrank", scores, device="cpu")


def test_stage_05_reads_its_full_level_checkpoint():
    smoke = resolve_parameters("smoke", {"VARIANTS": "baseline,head_pruned", "EXTRA_VARIANTS": ""})
    assert stages.checkpoints_read("05", smoke) == set()  # '': the unpruned model
    assert "mix_pruned" in stages.not_needed_after("04", smoke)
    on_pruned = {**smoke, "ADAPTIVE_MODEL": "mix_pruned"}
    assert stages.checkpoints_read("05", on_pruned) == {"mix_pruned"}
    assert "mix_pruned" not in stages.not_needed_after("04", on_pruned)  # kept for stage 05...
    assert "mix_pruned" in stages.not_needed_after("05", on_pruned)  # ...and no longer after it
