"""Tests of text sources, splits and token windows (byte-level TinyTokenizer; one slow class with the real one)."""
import json
import sys
import types

import pytest
import torch

from pruning_utils.data import sources
from pruning_utils.data.sources import DataSourceError
from pruning_utils.model.tiny import TinyTokenizer


@pytest.fixture(scope="module")
def tok():
    return TinyTokenizer(128)


# ------------------------------------------------------------------------------------------------ splits


def test_embedded_splits_share_no_document_and_are_deterministic():
    cal = sources.load_documents("embedded", "calibration")
    ev = sources.load_documents("embedded", "evaluation")
    assert cal and ev and not set(cal) & set(ev)
    sources._embedded_split.cache_clear()  # recompute from scratch: same split
    assert sources.load_documents("embedded", "evaluation") == ev
    frac = sum(map(len, ev)) / (sum(map(len, ev)) + sum(map(len, cal)))
    assert 0.1 < frac <= 0.2
    assert sources.load_text("embedded", "evaluation") == "\n\n".join(ev)


def test_unknown_source_and_split_errors_list_the_valid_forms(tmp_path):
    with pytest.raises(DataSourceError, match="embedded.*wikitext2.*jsonl"):
        sources.load_text("wikitext103")
    with pytest.raises(DataSourceError, match="calibration, evaluation"):
        sources.load_text("embedded", split="train")
    with pytest.raises(DataSourceError, match="does not exist"):
        sources.load_text(str(tmp_path / "missing.txt"))


def test_wikitext_failure_says_it_needs_the_network(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    sources._wikitext2.cache_clear()
    with pytest.raises(DataSourceError, match="network.*embedded"):
        sources.load_text("wikitext2", "evaluation")
    sources._wikitext2.cache_clear()


def test_wikitext_rows_are_grouped_into_articles(monkeypatch):
    rows = ["", " = A = \n", "", " text a \n", " = = sub = = \n", " more a \n", " = B = \n", " text b \n"]
    fake = types.SimpleNamespace(load_dataset=lambda *a, split, **kw: {"text": rows})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    sources._wikitext2.cache_clear()
    docs = sources.load_documents("wikitext2", "calibration")
    sources._wikitext2.cache_clear()
    assert len(docs) == 2 and "more a" in docs[0] and docs[1].startswith("= B =")


def _paragraphs(n):
    return [f"paragraph {i} " + "word " * (5 + i % 7) for i in range(n)]


def test_txt_split_by_blank_lines_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n  \n".join(_paragraphs(20)))
    cal = sources.load_documents(str(path), "calibration")
    ev = sources.load_documents(str(path), "evaluation")
    assert len(cal) == 16 and len(ev) == 4 and not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(p.strip() for p in _paragraphs(20))
    assert sources.load_documents(str(path), "evaluation") == ev
    assert sources.load_documents(str(path), "evaluation", seed=1) != ev


def test_csv_column_selection_and_missing_column(tmp_path):
    import pandas as pd

    path = tmp_path / "corpus.csv"
    pd.DataFrame({"id": range(10), "body": _paragraphs(10),
                  "text": [f"t{i}" for i in range(10)]}).to_csv(path, index=False)
    assert all(d.startswith("t") for d in sources.load_documents(str(path), "calibration"))  # 'text' by default
    body = sources.load_documents(str(path), "calibration", column="body")
    assert len(body) == 8 and all(d.startswith("paragraph") for d in body)
    with pytest.raises(DataSourceError, match="'content'.*available columns: id, body, text"):
        sources.load_text(str(path), column="content")


def test_jsonl_needs_a_column_when_there_is_no_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"content": p, "n": i}) for i, p in enumerate(_paragraphs(10))) + "\n")
    with pytest.raises(DataSourceError, match="no column named 'text'.*content, n.*column="):
        sources.load_text(str(path))
    assert len(sources.load_documents(str(path), "evaluation", column="content")) == 2


def test_single_document_cannot_be_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one paragraph")
    with pytest.raises(DataSourceError, match="1 document"):
        sources.load_text(str(path))


# ------------------------------------------------------------------------------------------------ tokens


def test_calibration_windows_shape_and_seeded_determinism(tok):
    a = sources.calibration_windows(tok, n_samples=8, seq_len=32, seed=0)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, sources.calibration_windows(tok, n_samples=8, seq_len=32, seed=0))
    assert not torch.equal(a, sources.calibration_windows(tok, n_samples=8, seq_len=32, seed=1))
    assert int(a.min()) >= 3 and int(a.max()) < 128


def test_windows_come_from_calibration_and_chunks_from_evaluation(tok):
    cal = sources.split_tokens(tok, "embedded", "calibration")
    ev = sources.split_tokens(tok, "embedded", "evaluation")
    chunks = sources.eval_chunks(tok, seq_len=64, max_tokens=1000)
    assert chunks.shape == (15, 64)
    assert torch.equal(chunks.flatten(), ev[:15 * 64])  # consecutive, non-overlapping
    w = sources.calibration_windows(tok, n_samples=2, seq_len=16, seed=3)
    windows = cal.unfold(0, 16, 1)  # every window of the calibration stream
    assert all(bool((windows == row).all(1).any()) for row in w)


def test_too_short_requests_explain_what_to_do(tok, tmp_path):
    with pytest.raises(DataSourceError, match=r"has \d+ tokens but 100000 windows x 512.*fewer samples.*seq_len"):
        sources.calibration_windows(tok, n_samples=100_000, seq_len=512)
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(_paragraphs(10)))
    with pytest.raises(DataSourceError, match="shorter seq_len"):
        sources.eval_chunks(tok, str(path), seq_len=4096)


def test_tokens_are_cached_and_reloaded_when_the_file_changes(tok, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(_paragraphs(10)))
    first = sources.split_tokens(tok, str(path), "calibration")
    assert sources.split_tokens(tok, str(path), "calibration") is first
    path.write_text("\n\n".join(_paragraphs(30)))
    assert len(sources.split_tokens(tok, str(path), "calibration")) > len(first)


def test_hf_style_tokenizer_is_called_in_one_batch_of_pieces():
    class FakeHF:
        model_max_length = 64
        name_or_path = "fake"

        def __init__(self):
            self.calls = []

        def __call__(self, texts, add_special_tokens=True):
            assert add_special_tokens is False
            self.calls.append(texts)
            return {"input_ids": [[len(t)] for t in texts]}

    fake = FakeHF()
    text = "\n".join("line %d " % i + "x" * 50 for i in range(200))
    ids = sources.encode(fake, text)
    assert len(fake.calls) == 1 and len(ids) > 1 and sum(ids) == len(text)


@pytest.mark.slow
class TestRealTokenizer:
    def test_embedded_text_with_smollm_tokenizer(self):
        from transformers import AutoTokenizer

        from pruning_utils.model.loading import embedded_model_dir

        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
        windows = sources.calibration_windows(tok)
        assert windows.shape == (64, 256) and int(windows.max()) < len(tok)
        chunks = sources.eval_chunks(tok)
        assert chunks.shape[1] == 512 and chunks.numel() > 16_000
        whole = tok(sources.load_text("embedded", "evaluation")[:20000], add_special_tokens=False)["input_ids"]
        pieces = sources.encode(tok, sources.load_text("embedded", "evaluation")[:20000])
        assert abs(len(whole) - len(pieces)) <= 0.01 * len(whole)  # piecewise tokenization loses almost nothing
