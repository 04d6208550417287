"""Pruned checkpoints: stock from_pretrained for uniform plans, project loader for per-layer shapes, atomic writes."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_utils.model.arch import layer_shapes
from pruning_utils.model.checkpoint import CheckpointError, load_pruned, read_plan, save_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.surgery import apply_plan
from pruning_utils.model.tiny import TinyTokenizer, tiny_model


def _uniform_plan(model) -> PruningPlan:
    plan = PruningPlan.identity(layer_shapes(model), "tiny", )
    plan.heads = {i: [0, 1, 2, 4, 5, 6] for i in range(3)}  # 8 -> 6 heads: 64 % 6 != 0
    plan.neurons = {i: list(range(0, 96, 2)) for i in range(3)}
    plan.criterion = "magnitude"
    return plan


def _nonuniform_plan(model) -> PruningPlan:
    plan = PruningPlan.identity(layer_shapes(model), "tiny")
    plan.heads = {0: [0, 1, 4, 5]}
    plan.neurons = {2: list(range(50))}
    plan.layers = [0, 2]
    return plan


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", ["llama-nobias", "mistral", "qwen2", "qwen3"])
def test_uniform_plan_loads_with_stock_from_pretrained(family, tokens, models_dir):
    model = (tiny_model("llama", attention_bias=False, mlp_bias=False) if family == "llama-nobias"
             else tiny_model(family))
    apply_plan(model, _uniform_plan(model))
    folder = save_pruned(model, TinyTokenizer(), "uniform")
    assert folder == models_dir / "uniform"
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (_logits(model, tokens) - _logits(stock, tokens)).abs().max() == 0
    assert json.loads((folder / "pruning_plan.json").read_text())["stock_loadable"] is True


def test_head_pruned_llama_is_written_as_mistral(tokens, models_dir):
    # LlamaConfig refuses hidden_size % num_attention_heads != 0 even with head_dim set
    model = tiny_model("llama", attention_bias=False, mlp_bias=False)
    apply_plan(model, _uniform_plan(model))
    cfg = json.loads((save_pruned(model, None, "m") / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["num_attention_heads"] == 6 and cfg["sliding_window"] is None


def test_llama_keeps_its_class_when_heads_divide(models_dir):
    model = tiny_model("llama", attention_bias=False, mlp_bias=False)
    plan = PruningPlan.identity(layer_shapes(model), "tiny")
    plan.heads = {i: [0, 1, 4, 5] for i in range(3)}  # 64 % 4 == 0
    apply_plan(model, plan)
    cfg = json.loads((save_pruned(model, None, "m") / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def test_nonuniform_plan_roundtrips_through_project_loader(family, tokens, models_dir):
    model = tiny_model(family)
    apply_plan(model, _nonuniform_plan(model))
    folder = save_pruned(model, TinyTokenizer(), "nonuniform")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["per_layer_config"]["0"]["num_attention_heads"] == 4
    loaded, tok = load_pruned(folder)
    assert layer_shapes(loaded) == layer_shapes(model)
    assert (_logits(model, tokens) - _logits(loaded, tokens)).abs().max() == 0
    assert isinstance(tok, TinyTokenizer)
    assert read_plan(folder).layers == [0, 2]



def test_nonuniform_checkpoint_loads_its_transformers_tokenizer(tokens, models_dir):
    """A non-uniform checkpoint saved with a transformers tokenizer loads it back: AutoTokenizer reads config.json
    for the model type, and transformers refuses a config whose per_layer_config varies the head count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "pruned", "model", "loads"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    model = tiny_model("llama")
    apply_plan(model, _nonuniform_plan(model))
    folder = save_pruned(model, tok, "nonuniform")
    assert json.loads((folder / "config.json").read_text())["per_layer_config"]["0"]["num_attention_heads"] == 4
    loaded, back = load_pruned(folder)
    assert back("the pruned model loads")["input_ids"] == tok("the pruned model loads")["input_ids"] == [2, 3, 4, 5]
    assert back.pad_token == "<eos>"  # no pad token saved: the loader pads with the end token
    assert (_logits(model, tokens) - _logits(loaded, tokens)).abs().max() == 0


def test_project_loader_never_allocates_the_unpruned_model(tokens, models_dir, monkeypatch):
    """The per-layer structure is cut on the meta device and the read tensors are assigned: an 8B checkpoint pruned
    to 12 GiB loads in 12 GiB of host memory (beside a 15 GiB unpruned reference on Kaggle's 29 GiB), not 27."""
    from pruning_utils.model import checkpoint

    model = tiny_model("llama")
    apply_plan(model, _nonuniform_plan(model))
    folder = save_pruned(model, TinyTokenizer(), "nonuniform")
    built, read = [], {}
    real_build, real_read = checkpoint._build_structure, checkpoint.read_weights
    monkeypatch.setattr(checkpoint, "_build_structure", lambda *a: built.append(real_build(*a)) or built[-1])
    monkeypatch.setattr(checkpoint, "read_weights", lambda *a, **k: read.update(real_read(*a, **k)) or read)
    loaded, _ = load_pruned(folder)
    assert {p.device.type for p in built[0].parameters()} == {"cpu"}  # the structure, now holding the read tensors
    assert all(p.data_ptr() == read[name].data_ptr() for name, p in loaded.named_parameters() if name in read)
    assert (_logits(model, tokens) - _logits(loaded, tokens)).abs().max() == 0

def test_biased_llama_with_nondividing_heads_uses_project_loader(tokens, models_dir):
    model = tiny_model("llama")  # attention_bias: no stock class matches at 6 heads
    apply_plan(model, _uniform_plan(model))
    folder = save_pruned(model, None, "biased")
    loaded, _ = load_pruned(folder)
    assert (_logits(model, tokens) - _logits(loaded, tokens)).abs().max() == 0


def test_plans_compose_across_stages(tokens, models_dir):
    model = tiny_model("mistral")
    first = PruningPlan.identity(layer_shapes(model), "tiny")
    first.heads = {i: [1, 2, 5, 6] for i in range(3)}
    apply_plan(model, first)
    folder = save_pruned(model, None, "stage1")
    model, _ = load_pruned(folder)
    second = PruningPlan.identity(layer_shapes(model), "tiny")
    second.heads = {0: [1, 3]}  # indices into the stage-1 model: original heads 2 and 6
    apply_plan(model, second)
    plan = read_plan(save_pruned(model, None, "stage2"))
    assert plan.kept_heads(0) == [2, 6] and plan.kept_heads(1) == [1, 2, 5, 6]
    assert plan.base_heads == [8, 8, 8]


def test_load_model_finds_checkpoints_by_name(tokens, models_dir):
    model = tiny_model("qwen2")
    apply_plan(model, _nonuniform_plan(model))
    save_pruned(model, TinyTokenizer(), "by-name")
    loaded, _ = load_model("by-name")
    assert (_logits(model, tokens) - _logits(loaded, tokens)).abs().max() == 0


def test_missing_and_foreign_checkpoints_are_refused(tmp_path, models_dir):
    with pytest.raises(CheckpointError, match="run the stage"):
        load_pruned(tmp_path / "nothing")
    foreign = tmp_path / "foreign"
    tiny_model("llama").save_pretrained(foreign)
    with pytest.raises(CheckpointError, match="not written by semantic-llm-pruning"):
        load_pruned(foreign)
    (foreign / "pruning_plan.json").write_text('{"format": "other/2"}')
    with pytest.raises(CheckpointError, match="format"):
        load_pruned(foreign)


def test_interrupted_save_leaves_nothing_behind(models_dir, monkeypatch):
    model = tiny_model("mistral")
    save_pruned(model, None, "keep")
    before = (models_dir / "keep" / "model.safetensors").read_bytes()
    import pruning_utils.model.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_stock_config", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(tiny_model("mistral", seed=1), None, "keep")
    assert sorted(p.name for p in models_dir.iterdir()) == ["keep"]  # no temp folder left
    assert (models_dir / "keep" / "model.safetensors").read_bytes() == before


@pytest.mark.slow
class TestEmbeddedCheckpoint:
    def test_smollm2_uniform_head_pruned_loads_stock(self, embedded, tmp_path):
        import copy

        model, tok = embedded
        model = copy.deepcopy(model)
        plan = PruningPlan.identity(layer_shapes(model), "smollm2-135m")
        plan.heads = {i: [0, 1, 3, 4, 6, 7] for i in range(30)}  # 9 -> 6 heads, one per KV group
        apply_plan(model, plan)
        folder = save_pruned(model, tok, tmp_path / "smol")
        stock = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = tok("Pruned checkpoints load anywhere.", return_tensors="pt")["input_ids"]
        assert (_logits(model, ids) - _logits(stock, ids)).abs().max() == 0
