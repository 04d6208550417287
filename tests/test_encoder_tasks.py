"""Encoder tasks, metrics, criteria and the refit on tiny random BERTs (the tokenizer is the embedded MiniLM's)."""
import pandas as pd
import pytest
import torch

from pruning_utils.encoder import importance as ei
from pruning_utils.encoder import surgery
from pruning_utils.encoder import tasks as et
from pruning_utils.model.tiny import tiny_encoder

TEXTS = ["good movie", "bad film", "i loved it", "terrible plot", "what a joy", "boring and slow", "great cast",
         "awful acting"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pruning_utils.measure.evaluation import judge_model_path
    return AutoTokenizer.from_pretrained(judge_model_path())


@pytest.fixture
def task():
    df = pd.DataFrame({"text": TEXTS, "label": [1, 0] * 16})
    return et.Task("toy", df, df, 2)


def test_metrics_on_six_examples():
    # binary: TP=2 (rows 0, 2), FP=1 (row 3), FN=1 (row 4) -> precision 2/3, recall 2/3, F1 2/3; accuracy 4/6
    m = et.classification_metrics([1, 0, 1, 0, 1, 0], [1, 0, 1, 1, 0, 0], 2)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(2 / 3)
    # three classes, macro F1: class 0 F1 1, class 1 (P 1/2, R 1/2) 1/2, class 2 (P 1/2, R 1/2) 1/2 -> 2/3
    m = et.classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 1], 3)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(2 / 3)


def test_file_task_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    pd.DataFrame({"text": TEXTS[:10], "text_pair": TEXTS[1:11], "label": ["pos", "neg"] * 5}).to_json(
        path, orient="records", lines=True)
    t = et.load_task(str(path))
    assert len(t.train) == 8 and len(t.validation) == 2 and t.num_labels == 2
    assert list(t.train.columns) == ["text", "text_pair", "label"]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a"], "target": [1]}).to_csv(bad, index=False)
    with pytest.raises(et.TaskError, match=r"lacks the column\(s\) \['label'\]"):
        et.load_task(str(bad))
    with pytest.raises(et.TaskError, match="unknown GLUE task 'sst3'; known: cola, sst2, mrpc"):
        et.load_task("sst3")
    with pytest.raises(et.TaskError, match="regression"):
        et.load_task("stsb")


def test_embedded_task_is_balanced_and_disjoint():
    t = et.embedded_task(max_train=200, max_eval=100, seed=0)
    assert len(t.train) == 200 and len(t.validation) == 100
    assert t.train["label"].mean() == 0.5 and t.validation["label"].mean() == 0.5
    assert not set(t.train["text"]) & set(t.validation["text"])


def test_evaluate_and_fine_tune(tokenizer, task):
    model = tiny_encoder(vocab_size=tokenizer.vocab_size)
    before = et.evaluate(model, tokenizer, task, batch_size=8)
    assert {"accuracy", "f1", "ms_per_batch", "samples_per_s"} <= set(before)
    hist = et.fine_tune(model, tokenizer, task.train, steps=30, lr=3e-3, batch_size=8)
    assert len(hist) == 30 and hist["loss"].iloc[-5:].mean() < hist["loss"].iloc[:5].mean()
    assert et.evaluate(model, tokenizer, task, batch_size=8)["accuracy"] == 1.0  # memorised the toy set


@pytest.mark.parametrize("criterion", sorted(ei.ENCODER_CRITERIA))
def test_criteria_shapes(tokenizer, task, criterion):
    model = tiny_encoder(vocab_size=tokenizer.vocab_size)
    s = ei.encoder_importance(model, tokenizer, task.train, criterion, batch_size=8)
    assert [t.numel() for t in s.heads] == [4] * 3 and [t.numel() for t in s.neurons] == [96] * 3
    assert all(torch.isfinite(t).all() for t in s.heads + s.neurons)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown encoder criterion 'l2'; known: random, magnitude"):
        ei.encoder_importance(model, tokenizer, task.train, "l2")


def test_lstsq_refit_beats_plain_cut(tokenizer, task):
    base = tiny_encoder(vocab_size=tokenizer.vocab_size, seed=3)
    scores = ei.encoder_importance(base, tokenizer, task.train, "fluctuation", batch_size=8)
    plan = ei.uniform_plan(base, scores, head_rate=0.25, mlp_rate=0.5)
    batch = et.inputs_only(next(et.batches(tokenizer, task.train, 32)))
    with torch.no_grad():
        want = base(**batch).logits
    errs = {}
    for mode in ("none", "lstsq"):
        import copy
        m = ei.prune_and_reconstruct(copy.deepcopy(base), plan, tokenizer, task.train, mode, batch_size=8)
        assert [s.n_heads for s in surgery.encoder_layer_shapes(m)] == [3] * 3
        with torch.no_grad():
            errs[mode] = float((m(**batch).logits - want).pow(2).mean())
    assert errs["lstsq"] < errs["none"]


def test_variant_row_has_one_throughput_and_says_where_it_was_timed(tokenizer, task):
    from pruning_utils.encoder import variants as ev

    model = tiny_encoder("bert", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                         type_vocab_size=2)
    row = ev.measure("baseline", model, tokenizer, task, batch_size=8, max_length=16)
    assert list(row) == list(ev.ENCODER_COLUMNS)
    assert row["samples_per_s"] == pytest.approx(8 * 1000 / row["ms_per_batch"])  # the same median batch
    assert row["load_avg"] >= 0 and isinstance(row["latency_noisy"], bool) and row["device"] and row["commit"]
