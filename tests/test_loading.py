"""Model specs, dtype/device choice and clear errors."""
import pytest
import torch

from pruning_utils.model import tiny
from pruning_utils.model.devices import resolve_dtype
from pruning_utils.model.loading import ModelSpecError, load_model
from pruning_utils.model.tiny import tiny_model


def test_tiny_models_load_by_spec(family):
    model, tok = load_model(f"tiny-{family}", device="cpu")
    assert model.config.model_type == family and not model.training
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_unknown_spec_says_what_to_use(models_dir):
    with pytest.raises(ModelSpecError, match="smollm2-135m"):
        load_model("no-such-model")


def test_unknown_tiny_family_names_the_known_ones():
    with pytest.raises(ValueError, match="known: llama, mistral, qwen2, qwen3"):
        tiny.tiny_config("gpt2")


def test_bare_names_are_looked_up_in_the_models_dir_at_call_time(models_dir):
    from pruning_utils.model.checkpoint import save_pruned

    save_pruned(tiny_model("mistral"), tiny.TinyTokenizer(), "saved")  # lands in the patched folder
    model, tok = load_model("saved", device="cpu")
    assert model.config.model_type == "mistral" and isinstance(tok, tiny.TinyTokenizer)
    with pytest.raises(ModelSpecError, match=str(models_dir)):
        load_model("missing")


def test_dtype_choice():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="known"):
        resolve_dtype("float8", torch.device("cpu"))


def test_tiny_model_has_gqa_and_biases():
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert attn.num_key_value_groups == 4


@pytest.mark.slow
def test_embedded_model_is_smollm2(embedded):
    model, tok = embedded
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (30, 576, 9, 3, 1536)
    assert c.tie_word_embeddings and tok.chat_template
