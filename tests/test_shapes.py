"""Real model shapes without the hub: committed configs, parameter arithmetic, the `shape:<name>` spec."""
import pytest
import torch

from pruning_utils.model import shapes
from pruning_utils.model.arch import decoder_layers, proj
from pruning_utils.model.loading import ModelSpecError, load_model
from pruning_utils.model.shapes import SHAPES, config_params, shape_config, shape_json, shape_model, shape_params
from pruning_utils.model.tiny import tiny_model

SMALLEST = "qwen2.5-0.5b"


def test_the_issue_shapes_are_committed():
    assert set(SHAPES) == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "llama-3.2-1b", "llama-3.1-8b"}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_count_matches_the_published_one(name):
    published = shape_json(name)["_published_params"]
    assert abs(shape_params(name) - published) <= 0.005 * published, (name, shape_params(name), published)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_config_is_the_hf_config_without_private_keys(name):
    config = shape_config(name)
    raw = shape_json(name)
    assert raw["_source"].count("/") == 1
    assert not hasattr(config, "_source") and not hasattr(config, "_published_params")
    assert (config.hidden_size, config.vocab_size, config.tie_word_embeddings) == (
        raw["hidden_size"], raw["vocab_size"], raw["tie_word_embeddings"])


def test_parameter_arithmetic_matches_built_models(family):
    # every tiny family, biases and QK-norm included, untied and tied
    for tied in (False, True):
        model = tiny_model(family, tie_word_embeddings=tied)
        assert sum(p.numel() for p in model.parameters()) == config_params(model.config), (family, tied)


def test_unknown_shape_names_the_known_ones():
    with pytest.raises(ModelSpecError, match="qwen2.5-0.5b.*llama-3.1-8b|llama-3.1-8b.*qwen2.5-0.5b"):
        load_model("shape:qwen9-1t", device="cpu")


def test_unknown_spec_mentions_shapes(models_dir):
    with pytest.raises(ModelSpecError, match="shape:<name>"):
        load_model("no-such-model", device="cpu")


def test_a_shape_too_large_for_memory_is_refused_with_advice(monkeypatch):
    monkeypatch.setattr(shapes, "available_memory", lambda device: 2**30)  # refused before anything is built
    with pytest.raises(MemoryError, match="bfloat16.*smaller shape"):
        shape_model("llama-3.1-8b", dtype=torch.float32)
    with pytest.raises(MemoryError) as err:
        shape_model("llama-3.1-8b", dtype=torch.bfloat16)
    assert "dtype=" not in str(err.value) and "qwen2.5-0.5b" in str(err.value)


@pytest.mark.slow
class TestBuiltShape:
    """The smallest shape built for real (bf16, ~1 GB)."""

    @pytest.fixture(scope="class")
    def built(self):
        return load_model(f"shape:{SMALLEST}", device="cpu", dtype="bfloat16")

    def test_count_dtype_and_tokenizer(self, built):
        model, tok = built
        assert sum(p.numel() for p in model.parameters()) == shape_params(SMALLEST)
        assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
        assert tok.vocab_size == model.config.vocab_size == shape_config(SMALLEST).vocab_size

    def test_weights_are_initialised_and_activations_finite(self, built):
        model, tok = built
        q = proj(decoder_layers(model)[0], "q_proj").weight.float()
        assert q.std().item() == pytest.approx(model.config.initializer_range, rel=0.05)
        ids = torch.tensor([tok.encode("shapes!!")])
        assert ids.shape == (1, 8)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        assert out.logits.shape == (1, 8, model.config.vocab_size)
        assert all(h.isfinite().all() for h in out.hidden_states) and out.logits.isfinite().all()

    def test_same_seed_same_weights(self, built):
        again, _ = shape_model(SMALLEST, seed=0, dtype=torch.bfloat16)
        first = proj(decoder_layers(built[0])[0], "q_proj").weight
        assert torch.equal(first, proj(decoder_layers(again)[0], "q_proj").weight)
