"""Encoder (BERT-family) surgery: exact against masking, stock reload, INT8 / low-rank, wrong-family errors."""
import pytest
import torch

from pruning_utils.encoder import checkpoint, surgery
from pruning_utils.encoder.arch import encoder_layer_shapes, encoder_layers, encoder_proj
from pruning_utils.measure.metrics import checkpoint_size_mb
from pruning_utils.model.arch import UnsupportedArchitectureError
from pruning_utils.model.linears import int8_tables, is_int8_tensor
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import tiny_encoder, tiny_model

FAMILIES = ("bert", "roberta")


def _batch(seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding must be handled the same way by both paths
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_head_neuron_layer_surgery_equals_masking(family):
    model, batch = tiny_encoder(family), _batch()
    heads = {0: [1, 3], 2: [0]}
    neurons = {1: list(range(0, 96, 3)), 2: [5, 6]}
    with surgery.masked(model, heads=heads, neurons=neurons, layers=[1]):
        want = _logits(model, batch)
    plan = surgery.identity_plan(model)
    plan.heads = {li: [h for h in range(4) if h not in r] for li, r in heads.items()}
    plan.neurons = {li: [n for n in range(96) if n not in r] for li, r in neurons.items()}
    plan.layers = [0, 2]
    surgery.apply_plan(model, plan)
    assert torch.allclose(_logits(model, batch), want, atol=1e-5)
    assert [(s.n_heads, s.intermediate) for s in encoder_layer_shapes(model)] == [(2, 96), (3, 94)]


def test_masking_changes_the_output():
    model, batch = tiny_encoder(), _batch()
    base = _logits(model, batch)
    with surgery.masked(model, heads={0: [0, 1]}, neurons={1: list(range(40))}):
        assert not torch.allclose(_logits(model, batch), base, atol=1e-4)
    assert torch.equal(_logits(model, batch), base)  # hooks removed


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_neuron_and_layer_pruning_reloads_with_stock_class(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch = tiny_encoder(family), _batch()
    plan = surgery.identity_plan(model)
    plan.neurons = {li: list(range(li, 96, 2))[:47] for li in range(3)}
    plan.layers = [0, 2]
    surgery.apply_plan(model, plan)
    folder = checkpoint.save_encoder(model, None, tmp_path / "m")
    assert checkpoint.read_encoder_meta(folder)["stock_loadable"]
    stock = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert stock.config.intermediate_size == 47 and stock.config.num_hidden_layers == 2
    assert torch.equal(_logits(stock, batch), _logits(model, batch))


def test_head_pruned_reloads_with_project_loader(tmp_path):
    model, batch = tiny_encoder(), _batch()
    plan = surgery.identity_plan(model)
    plan.heads = {li: [0, 2, 3] for li in range(3)}
    plan.neurons = {0: list(range(50))}  # non-uniform widths too
    surgery.apply_plan(model, plan)
    folder = checkpoint.save_encoder(model, None, tmp_path / "m")
    assert not checkpoint.read_encoder_meta(folder)["stock_loadable"]
    loaded, _ = checkpoint.load_encoder(folder)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert loaded.pruning_plan.heads == plan.heads


def test_int8_and_lowrank_variants_run_and_reload(tmp_path):
    model, batch = tiny_encoder(hidden_size=128, intermediate_size=256), _batch()
    base = _logits(model, batch)
    q = surgery.quantize_encoder(model)
    assert q.int8_mode == surgery.ENCODER_INT8_MODE and id(q.get_input_embeddings().weight) in int8_tables(q)
    assert is_int8_tensor(encoder_proj(encoder_layers(q)[0], "query").weight)
    assert (_logits(q, batch) - base).abs().max() < 0.1
    folder = checkpoint.save_encoder(q, None, tmp_path / "q")
    loaded, _ = checkpoint.load_encoder(folder)
    assert torch.equal(_logits(loaded, batch), _logits(q, batch))
    fp32 = checkpoint.save_encoder(model, None, tmp_path / "fp32")
    assert checkpoint_size_mb(folder) < checkpoint_size_mb(fp32) / 2.5
    assert surgery.parameter_counts(q) == surgery.parameter_counts(model)  # INT8 weights count their values
    ranks = surgery.lowrank_encoder(model, param_ratio=0.5)
    assert set(ranks.values()) <= {32, 42}  # 128x128: 8192 // 256; 256x128: 16384 // 384
    out = _logits(model, batch)
    assert out.shape == base.shape and torch.isfinite(out).all()
    loaded, _ = checkpoint.load_encoder(checkpoint.save_encoder(model, None, tmp_path / "lr"))
    assert torch.allclose(_logits(loaded, batch), out, atol=1e-6)


def test_wrong_family_errors():
    with pytest.raises(UnsupportedArchitectureError, match="decoder .*encoder classifier path"):
        surgery.identity_plan(tiny_model("llama"))
    from pruning_utils.model.surgery import prune_heads
    with pytest.raises(UnsupportedArchitectureError, match="encoder classifier.*pruning_utils.encoder.surgery"):
        prune_heads(tiny_encoder(), {0: [0]})


def test_surgery_refuses_empty_layers():
    from pruning_utils.model.surgery import SurgeryError
    with pytest.raises(SurgeryError, match="every head"):
        surgery.prune_heads(tiny_encoder(), {0: []})
    plan = PruningPlan(base_heads=[8] * 3, base_intermediate=[96] * 3)
    with pytest.raises(Exception, match="recompute the plan"):
        surgery.apply_plan(tiny_encoder(), plan)
