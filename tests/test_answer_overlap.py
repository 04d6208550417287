"""ROUGE-L and BERTScore (on the judge's all-MiniLM-L6-v2) of answers against reference answers, and their means in
the rows of final_eval.csv (notebook 06) and recovery.csv (notebook 04)."""
import pytest
import torch

from pruning_utils.measure import evaluation as ev
from pruning_utils.measure.evaluation import BERTSCORE_COLUMN, OVERLAP_COLUMNS, ROUGE_COLUMN
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REF = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level.",
       "Cats are small mammals that purr."]
PARAPHRASE = ["The capital of France is Paris.", "At sea level, water boils at 100 degrees Celsius.",
              "Cats are little mammals, and they purr."]
UNRELATED = ["Bananas turn yellow as they ripen.", "My cousin plays the violin on Sundays.",
             "The train to Berlin leaves at noon."]


def _items(res: dict, column: str) -> list[float]:
    return [it[column] for it in res["per_item"]]


def test_identical_answers_score_one_and_others_less_the_further_they_drift():
    same = ev.answer_overlap(REF, list(REF))
    para, other = ev.answer_overlap(REF, PARAPHRASE), ev.answer_overlap(REF, UNRELATED)
    for column in OVERLAP_COLUMNS:
        assert same[column] == pytest.approx(1.0, abs=1e-5)
        assert _items(same, column) == pytest.approx([1.0] * len(REF), abs=1e-5)
        # per answer: a paraphrase keeps more than an unrelated answer, and less than the answer itself
        assert all(s > p > o for s, p, o in zip(_items(same, column), _items(para, column), _items(other, column)))
        assert para[column] == pytest.approx(sum(_items(para, column)) / len(REF))
    assert other[ROUGE_COLUMN] < 0.2 < para[ROUGE_COLUMN]


def test_blank_answers_do_not_crash_and_score_zero_unless_both_are_blank(capfd):
    ref = ["Cats are mammals.", "", "  ", "Water is wet."]
    answers = ["", "Dogs bark.", "", "Water is wet, mostly."]
    res = ev.answer_overlap(ref, answers)
    for column in OVERLAP_COLUMNS:
        assert _items(res, column)[:3] == [0.0, 0.0, 1.0]
    alone = ev.answer_overlap(ref[3:], answers[3:])  # the scored pair keeps its own value beside blank ones
    assert res["per_item"][3] == alone["per_item"][0] and 0 < alone[BERTSCORE_COLUMN] < 1
    assert "Empty" not in capfd.readouterr().err  # blank pairs never reach bert_score
    assert ev.answer_overlap([""], [""])[BERTSCORE_COLUMN] == 1.0
    # rouge_score keeps letters and digits only: symbols alone score 1 when identical, 0 otherwise
    assert _items(ev.answer_overlap(["<<<<", "<<<<"], ["<<<<", "...."]), ROUGE_COLUMN) == [1.0, 0.0]


def test_overlap_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same prompt list"):
        ev.answer_overlap(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="same prompt list"):
        ev.answer_overlap([], [])


def test_bertscore_runs_on_the_judges_local_model_with_all_its_layers_and_no_rescaling():
    from transformers import AutoConfig

    scorer = ev.bert_scorer()
    assert scorer is ev.bert_scorer()  # loaded once
    assert scorer.model_type == ev.judge_model_path() and scorer.device == "cpu"
    assert scorer.num_layers == AutoConfig.from_pretrained(ev.judge_model_path()).num_hidden_layers
    assert not scorer.rescale_with_baseline and not scorer.idf


def test_missing_bert_score_or_rouge_score_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def block(prefix):
        def fake(name, *args, **kwargs):
            if name == prefix or name.startswith(prefix + "."):
                raise ImportError(f"No module named '{name}' (simulated)")
            return real(name, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", fake)

    block("bert_score")
    with pytest.raises(ev.EvaluationDependencyError, match="pip install bert-score"):
        ev.answer_overlap(REF, PARAPHRASE)
    block("rouge_score")
    with pytest.raises(ev.EvaluationDependencyError, match="rouge-score"):
        ev.answer_overlap(REF, PARAPHRASE)


class _Judge:  # exact strings are fully similar, others half
    def similarity(self, a, b):
        return [1.0 if x == y else 0.5 for x, y in zip(a, b)]


def test_answer_retention_adds_the_overlap_means_and_items(models_dir):
    model, tok = tiny_model("llama"), TinyTokenizer()
    prompts = ["abc", "de"]
    answers = ev.generate_answers(model, tok, prompts, max_new_tokens=4)
    reference = [answers[0], "The capital of France is Paris."]
    kept = ev.answer_retention(model, tok, prompts, reference, _Judge(), max_new_tokens=4)
    overlap = ev.answer_overlap(reference, answers)
    assert {c: kept[c] for c in OVERLAP_COLUMNS} == {c: overlap[c] for c in OVERLAP_COLUMNS}
    assert kept["cosine_mean"] == ev.semantic_retention(reference, answers, _Judge())["cosine_mean"]
    assert [it[c] for it in kept["per_item"] for c in OVERLAP_COLUMNS] == \
        [it[c] for it in overlap["per_item"] for c in OVERLAP_COLUMNS]
    assert [kept["per_item"][0][c] for c in OVERLAP_COLUMNS] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert kept[BERTSCORE_COLUMN] < 1.0  # the second answer is not the reference


def test_final_row_reports_the_overlap_means_beside_the_cosine(models_dir):
    from pruning_utils.measure.final_eval import final_row
    from pruning_utils.measure.variants import measure_variant, pruned_copy
    from pruning_utils.model.checkpoint import save_pruned
    from pruning_utils.prune import allocation, importance

    model, tok = tiny_model("llama", seed=0), TinyTokenizer()
    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    recorded = measure_variant(model, chunks, variant="baseline", source_model="tiny-llama")
    kw = dict(source_model="tiny-llama", recorded_baseline=recorded, prompts=["abc", "de", "fgh"], judge=_Judge(),
              max_new_tokens=4)
    base, base_answers = final_row("baseline", model, tok, chunks, reference=None, **kw)
    for column in OVERLAP_COLUMNS:
        assert base[column] == pytest.approx(1.0, abs=1e-5)  # the baseline against its own answers
    cols = list(base)
    assert cols.index("semantic_cosine") < cols.index(ROUGE_COLUMN) < cols.index(BERTSCORE_COLUMN) < \
        cols.index("n_prompts")
    scores = importance.compute_importance(model, chunks, ["random"], progress=False)["random"]
    pruned = pruned_copy(model, allocation.plan_heads(model, scores, 0.5))
    save_pruned(pruned, tok, "head_pruned", extra=measure_variant(pruned, chunks, variant="head_pruned",
                                                                   reference=recorded))
    row, answers = final_row("head_pruned", pruned, tok, chunks, reference=base, reference_answers=base_answers, **kw)
    overlap = ev.answer_overlap(base_answers, answers)
    assert {c: row[c] for c in OVERLAP_COLUMNS} == {c: overlap[c] for c in OVERLAP_COLUMNS}


def test_recovery_row_reports_the_overlap_before_and_after():
    from pruning_utils.recovery.report import recovery_row

    stats = dict(steps=4, tokens_seen=512, heldout_loss_before=3.0, heldout_loss_after=2.5, loss_first=3.1,
                 loss_last=2.4, minutes=0.1, tokens_per_s=90.0)
    before = dict(ppl=14.0, fidelity_ppl=20.0, kl_to_baseline=0.3)
    after = dict(ppl=12.0, fidelity_ppl=18.0, kl_to_baseline=0.2, device="cpu", dtype="float32")
    kept_before = dict(cosine_mean=0.6, **ev.answer_overlap(REF, UNRELATED))
    kept_after = dict(cosine_mean=0.9, **ev.answer_overlap(REF, PARAPHRASE))
    row = recovery_row("mix_pruned", stats, before, after, dict(ppl=10.0), kept_before, kept_after, loss="lm",
                       data="text")
    for column in OVERLAP_COLUMNS:
        assert (row[f"{column}_before"], row[f"{column}_after"]) == (kept_before[column], kept_after[column])
        assert row[f"{column}_before"] < row[f"{column}_after"]
    cols = list(row)
    assert cols.index("semantic_after") < cols.index("rouge_l_f1_before") < cols.index("heldout_loss_before")
    cosine_only = recovery_row("x", stats, before, after, dict(ppl=10.0), dict(cosine_mean=0.6),
                               dict(cosine_mean=0.9), loss="lm", data="text")
    assert cosine_only["bertscore_f1_minilm_l6_after"] is None
