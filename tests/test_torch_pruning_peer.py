"""The Torch-Pruning peer row: uniform shapes matching ours, a working model, and the ranking it claims."""
import copy

import pytest
import torch

from benchmarks.torch_pruning_peer import prune_with_torch_pruning
from pruning_utils.model.arch import layer_shapes
from pruning_utils.model.hooks import masked
from pruning_utils.model.tiny import tiny_model

SMOL_LIKE = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)  # SmolLM2's 9 q / 3 kv


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_uniform_mlp_width_and_parameter_drop(importance, tokens):
    model = tiny_model("llama")  # 3 layers, MLP 96, GQA 8 q / 2 kv, biases on
    before = _n_params(model)
    prune_with_torch_pruning(model, tokens, mlp_rate=0.25, importance=importance)
    shapes = layer_shapes(model)
    assert [s.intermediate for s in shapes] == [72] * 3  # 96 - round(96 * 0.25)
    assert [(s.n_heads, s.n_kv_heads) for s in shapes] == [(8, 2)] * 3  # attention ignored
    assert all(layer.mlp.down_proj.in_features == 72 for layer in model.model.layers)
    assert model.config.intermediate_size == 72
    # 24 neurons per layer, each a gate row, an up row, a down column (64 each) and a gate and an up bias
    assert before - _n_params(model) == 3 * 24 * (3 * 64 + 2)
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def test_magnitude_keeps_the_largest_group_l2_norms(tokens):
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    prune_with_torch_pruning(model, tokens, mlp_rate=0.25, importance="magnitude")
    for old, new in zip(ref.model.layers, model.model.layers):
        o = old.mlp
        norms = o.gate_proj.weight.pow(2).sum(1) + o.up_proj.weight.pow(2).sum(1) + o.down_proj.weight.pow(2).sum(0)
        expected = norms.topk(72).indices.sort().values
        # recover which original rows survived: pruning only slices, so rows match exactly
        kept = torch.cdist(new.mlp.up_proj.weight, o.up_proj.weight).argmin(1)
        assert torch.equal(kept, expected)
        assert torch.equal(new.mlp.down_proj.weight, o.down_proj.weight[:, expected])


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_head_pruning_is_s2_shaped_and_equals_masking(importance, tokens):
    model = tiny_model("llama", **SMOL_LIKE)
    ref = copy.deepcopy(model)
    prune_with_torch_pruning(model, tokens, mlp_rate=0.0, head_rate=0.2, importance=importance)
    assert [(s.n_heads, s.n_kv_heads, s.intermediate) for s in layer_shapes(model)] == [(6, 3, 96)] * 3
    assert model.config.num_attention_heads == 6
    removed = {}
    for li, (old, new) in enumerate(zip(ref.model.layers, model.model.layers)):
        assert torch.equal(old.self_attn.k_proj.weight, new.self_attn.k_proj.weight)  # K/V intact
        heads = old.self_attn.q_proj.weight.view(9, -1)
        kept = torch.cdist(new.self_attn.q_proj.weight.view(6, -1), heads).argmin(1).tolist()
        assert sorted(h // 3 for h in kept) == [0, 0, 1, 1, 2, 2]  # one head gone from each KV group
        removed[li] = sorted(set(range(9)) - set(kept))
    with masked(ref, heads=removed), torch.no_grad():
        expected = ref(tokens).logits
    with torch.no_grad():
        assert (model(tokens).logits - expected).abs().max() <= 1e-5
