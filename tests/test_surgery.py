"""Surgery is exact: pruned logits equal masked logits, on every family and on the embedded model."""
import copy

import pytest
import torch

from pruning_utils.model.arch import UnsupportedArchitectureError, layer_shapes
from pruning_utils.model.hooks import masked
from pruning_utils.model.plan import PlanMismatchError, PruningPlan
from pruning_utils.model.surgery import SurgeryError, apply_plan, drop_layers, prune_heads, prune_neurons
from pruning_utils.model.tiny import tiny_model

TOL = 1e-5


def _removed(n: int, kept: list[int]) -> list[int]:
    return [i for i in range(n) if i not in kept]


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_head_pruning_equals_masking(family, tokens):
    model = tiny_model(family)
    kept = {0: [0, 2, 3, 4, 6, 7], 2: [1, 3, 5, 7]}  # 8 q heads / 2 kv groups: equal per group
    with masked(model, heads={li: _removed(8, k) for li, k in kept.items()}):
        ref = _logits(model, tokens)
    prune_heads(model, kept)
    assert [s.n_heads for s in layer_shapes(model)] == [6, 8, 4]
    assert [s.n_kv_heads for s in layer_shapes(model)] == [2, 2, 2]  # K/V untouched
    assert (ref - _logits(model, tokens)).abs().max() <= TOL


def test_neuron_pruning_equals_masking(family, tokens):
    model = tiny_model(family)
    kept = {0: list(range(0, 96, 3)), 1: list(range(50, 96))}
    with masked(model, neurons={li: _removed(96, k) for li, k in kept.items()}):
        ref = _logits(model, tokens)
    prune_neurons(model, kept)
    assert [s.intermediate for s in layer_shapes(model)] == [32, 46, 96]
    assert (ref - _logits(model, tokens)).abs().max() <= TOL


def test_layer_dropping_equals_bypass(family, tokens):
    model = tiny_model(family, num_hidden_layers=4)
    with masked(model, layers=[1, 2]):
        ref = _logits(model, tokens)
    drop_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert (ref - _logits(model, tokens)).abs().max() <= TOL


def test_combined_plan_equals_masking_and_generates(family, tokens):
    model = tiny_model(family)
    plan = PruningPlan.identity(layer_shapes(model), "tiny")
    plan.heads = {1: [0, 1, 4, 5]}
    plan.neurons = {0: list(range(40)), 2: list(range(10, 90))}
    plan.layers = [1, 2]
    with masked(model, heads={1: [2, 3, 6, 7]}, neurons={0: list(range(40, 96)), 2: _removed(96, list(range(10, 90)))},
                layers=[0]):
        ref = _logits(model, tokens)
    apply_plan(model, plan)
    assert (ref - _logits(model, tokens)).abs().max() <= TOL
    # generate with KV cache must match a cache-free greedy decode
    out = model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = tokens
    for _ in range(6):
        nxt = _logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kind", ["heads", "neurons", "layers"])
def test_generate_after_each_kind_of_surgery(kind, tokens):
    model = tiny_model("qwen3")
    if kind == "heads":
        prune_heads(model, {i: [1, 2, 5, 6] for i in range(3)})
    elif kind == "neurons":
        prune_neurons(model, {i: list(range(i * 10, 96)) for i in range(3)})
    else:
        drop_layers(model, [2])
    out = model.generate(tokens, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, tokens.shape[1] + 5)


def test_unequal_groups_and_empty_group_are_refused():
    model = tiny_model("llama")
    with pytest.raises(SurgeryError, match="equal numbers"):
        prune_heads(model, {0: [0, 1, 2, 4, 5]})  # 3 heads in group 0, 2 in group 1
    with pytest.raises(SurgeryError, match="every head of a KV group"):
        prune_heads(model, {0: [0, 1, 2, 3]})  # group 1 emptied
    with pytest.raises(SurgeryError, match="every MLP neuron"):
        prune_neurons(model, {0: []})
    assert layer_shapes(model)[0].n_heads == 8  # nothing was cut on error


def test_plan_for_another_model_is_refused():
    model = tiny_model("mistral")
    other = PruningPlan(base_heads=[8, 8], base_intermediate=[96, 96], heads={0: [0, 4]})
    with pytest.raises(PlanMismatchError, match="recompute the plan"):
        apply_plan(model, other)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        prune_heads(model, {0: [0]})


def _prune_embedded(model):
    heads = {i: [0, 2, 3, 5, 6, 8] for i in range(0, 30, 3)}  # 9 q / 3 kv heads: one per group removed
    neurons = {i: list(range(0, 1536, 2)) for i in range(1, 30, 4)}
    mask = dict(heads={li: _removed(9, k) for li, k in heads.items()},
                neurons={li: _removed(1536, k) for li, k in neurons.items()}, layers=[29])
    return heads, neurons, mask


@pytest.mark.slow
class TestEmbeddedSurgery:
    def test_exact_in_fp32_on_smollm2(self, embedded):
        model, tok = embedded
        model = copy.deepcopy(model)
        ids = tok("Structured pruning removes whole heads and neurons.", return_tensors="pt")["input_ids"]
        heads, neurons, mask = _prune_embedded(model)
        with masked(model, skip_zeros=True, **mask):
            ref = _logits(model, ids)
        prune_heads(model, heads)
        prune_neurons(model, neurons)
        drop_layers(model, list(range(29)))
        assert (ref - _logits(model, ids)).abs().max() <= TOL
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 4

    def test_exact_in_fp64_with_zeroed_outputs_on_smollm2(self, embedded):
        # the plain zero-mask reference, in float64 so summation order cannot hide a real mismatch
        model, tok = embedded
        model = copy.deepcopy(model).double()
        ids = tok("Exactness is the contract.", return_tensors="pt")["input_ids"]
        heads, neurons, mask = _prune_embedded(model)
        with masked(model, **mask):
            ref = _logits(model, ids)
        prune_heads(model, heads)
        prune_neurons(model, neurons)
        drop_layers(model, list(range(29)))
        assert (ref - _logits(model, ids)).abs().max() <= 1e-9
