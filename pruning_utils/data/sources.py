"""Text sources split into calibration / evaluation documents, and the token tensors built from them.

Sources: `embedded` (Python's own documentation, `pydoc_data.topics`, always available offline),
`wikitext2` (Hugging Face `datasets`, needs the network), a local `.txt` / `.csv` / `.jsonl` file, or for
calibration `selfgen` (text sampled from the model itself) and weighted mixtures such as `embedded:0.5+selfgen:0.5`.
A split is made of whole documents, so calibration and evaluation never share a document.
The split itself never depends on the sampling seed of `calibration_windows`: drawing other windows
must not move documents from evaluation into calibration.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from pathlib import Path

import torch

from pruning_utils.data.files import jsonl_records, read_csv, read_text

SPLITS = ("calibration", "evaluation")
EVAL_FRACTION = 0.2
_PIECE_CHARS = 2000  # tokenize long text in pieces so no tokenizer warns about its max length
SOURCE_FORMS = ("'embedded'", "'wikitext2'", "a local .txt file", "a local .csv file", "a local .jsonl file")


class DataSourceError(ValueError):
    """Raised for a text source that cannot be read or does not hold enough text."""


# ---------------------------------------------------------------------------------------------- documents


def load_documents(source: str = "embedded", split: str = "calibration", column: str | None = None,
                   seed: int = 0) -> list[str]:
    """Return the documents of one split of a source (whole documents: the two splits never share one)."""
    if split not in SPLITS:
        raise DataSourceError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")
    if source == "embedded":
        return list(_embedded_split()[split])
    if source == "wikitext2":
        return list(_wikitext2(split))
    path = Path(source)
    if path.suffix.lower() in (".txt", ".csv", ".jsonl"):
        if not path.is_file():
            raise DataSourceError(f"text file '{source}' does not exist; give an existing path or use 'embedded'")
        docs = _read_local(path, column)
        return _seeded_split(docs, seed, source)[split]
    raise DataSourceError(f"unknown text source '{source}'; valid forms: {', '.join(SOURCE_FORMS)}")


def load_text(source: str = "embedded", split: str = "calibration", column: str | None = None,
              seed: int = 0) -> str:
    """Return the text of one split of a source: its documents joined by blank lines."""
    return "\n\n".join(load_documents(source, split, column, seed))


@functools.lru_cache(maxsize=1)
def _embedded_split() -> dict[str, tuple[str, ...]]:
    # Topics are visited in the order of a SHA-256 of their key (stable across runs and machines, unlike
    # hash()), and a topic joins evaluation while it still fits in 20% of the characters: about 20% of the
    # text is held out whatever the (very uneven) topic sizes are.
    from pydoc_data.topics import topics

    total = sum(len(v) for v in topics.values())
    by_hash = sorted(topics, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    evaluation, used = set(), 0
    for key in by_hash:
        if used + len(topics[key]) <= EVAL_FRACTION * total:
            evaluation.add(key)
            used += len(topics[key])
    keys = sorted(topics)
    return {
        "calibration": tuple(topics[k].strip() for k in keys if k not in evaluation),
        "evaluation": tuple(topics[k].strip() for k in keys if k in evaluation),
    }


@functools.lru_cache(maxsize=2)
def _wikitext2(split: str) -> tuple[str, ...]:
    # Rows of wikitext are lines; an article starts at a top-level heading " = Title = ".
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1",
                            split="train" if split == "calibration" else "test")["text"]
    except Exception as err:  # network, hub and cache errors all end here
        raise DataSourceError(
            f"could not load wikitext-2 ({err.__class__.__name__}: {err}); it is downloaded from the Hugging Face "
            "hub and needs the network. Offline, use source='embedded' or a local .txt/.csv/.jsonl file."
        ) from err
    articles, current = [], []
    for row in rows:
        if re.match(r"^ = [^=].* = \s*$", row) and current:
            articles.append("".join(current).strip())
            current = []
        current.append(row)
    articles.append("".join(current).strip())
    return tuple(a for a in articles if a)


def _read_local(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = read_text(path)
        return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if suffix == ".csv":
        frame = read_csv(path, dtype=str, keep_default_na=False)
        records, columns = frame.to_dict("records"), list(frame.columns)
    else:
        records = [r for _, r in jsonl_records(path)]
        columns = list(dict.fromkeys(k for r in records for k in r))
    name = column or ("text" if "text" in columns else None)
    if name is None or name not in columns:
        what = f"column '{column}' is not in" if column else "no column named 'text' in"
        raise DataSourceError(f"{what} {path.name}; available columns: {', '.join(columns) or '(none)'}. "
                              "Pass column=<one of them>.")
    return [str(r[name]).strip() for r in records if r.get(name) not in (None, "") and str(r[name]).strip()]


def _seeded_split(docs: list[str], seed: int, source: str) -> dict[str, list[str]]:
    if len(docs) < 2:
        raise DataSourceError(f"'{source}' holds {len(docs)} document(s); a calibration/evaluation split needs at "
                              "least 2 (separate paragraphs by blank lines, or add rows)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(EVAL_FRACTION * len(docs)))
    held_out = set(order[:n_eval])
    # Documents keep their file order inside each split, so the text reads as it was written.
    return {"calibration": [d for i, d in enumerate(docs) if i not in held_out],
            "evaluation": [d for i, d in enumerate(docs) if i in held_out]}


# ---------------------------------------------------------------------------------------------- tokens


def _pieces(text: str) -> list[str]:
    # Cut only where a line ends and the next starts with a non-space: BPE merges never cross such a point,
    # so the pieces tokenize (nearly) as the whole text would.
    pieces, start = [], 0
    for m in re.finditer(r"\n(?=\S)", text):
        if m.end() - start >= _PIECE_CHARS:
            pieces.append(text[start:m.end()])
            start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


def encode(tokenizer, text: str) -> list[int]:
    """Return the token ids of a text without special tokens, for HF tokenizers and `TinyTokenizer` alike."""
    pieces = _pieces(text)
    if not pieces:
        return []
    if hasattr(tokenizer, "model_max_length"):  # a Hugging Face tokenizer: encode the pieces as one batch
        batches = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    else:
        batches = [tokenizer.encode(p) for p in pieces]
    return [int(t) for ids in batches for t in ids]


class _TokenizerKey:
    """Hashable stand-in for a tokenizer: equal keys mean the same token ids for the same text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        name = getattr(tokenizer, "name_or_path", "") or ""
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
        # A nameless HF tokenizer could be anything: key it by identity rather than risk a false hit.
        ident = id(tokenizer) if (not name and hasattr(tokenizer, "model_max_length")) else None
        self.key = (type(tokenizer).__qualname__, name, size, ident)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _TokenizerKey) and self.key == other.key


def _source_key(source: str) -> tuple:
    path = Path(source)
    if path.is_file():  # an edited file must be tokenized again
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return (source,)


@functools.lru_cache(maxsize=8)
def _cached_tokens(tok: _TokenizerKey, source_key: tuple, split: str, column: str | None) -> torch.Tensor:
    ids = torch.tensor(encode(tok.tokenizer, load_text(source_key[0], split, column)), dtype=torch.long)
    ids.requires_grad_(False)
    return ids


def split_tokens(tokenizer, source: str = "embedded", split: str = "calibration",
                 column: str | None = None) -> torch.Tensor:
    """Return the 1-D token ids of a whole split (tokenized once per process; do not modify in place)."""
    return _cached_tokens(_TokenizerKey(tokenizer), _source_key(source), split, column)


SELFGEN = "selfgen"


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """Return the `(source, weight)` parts of a text source such as 'embedded', 'embedded+selfgen' (equal
    weights) or 'wikitext2:0.5+selfgen:0.5'; weights must be all given or all omitted, > 0, and sum to 1."""
    parts = [p.strip() for p in str(source).split("+")]
    if not source or any(not p for p in parts):
        raise DataSourceError(f"text source '{source}' has an empty part; write e.g. 'embedded:0.5+selfgen:0.5'")
    named, weights = [], []
    for part in parts:
        name, _, weight = part.rpartition(":")
        try:  # 'C:/data.txt' or a bare name carries no weight
            value = float(weight) if name else None
        except ValueError:
            value = None
        named.append(name if value is not None else part)
        weights.append(value)
    if len(parts) == 1 and weights[0] is None:
        return [(named[0], 1.0)]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataSourceError(f"text source '{source}': give a weight to every part or to none "
                              "(e.g. 'embedded:0.75+selfgen:0.25' or 'embedded+selfgen')")
    if weights[0] is None:
        weights = [1.0 / len(parts)] * len(parts)
    if any(not w > 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise DataSourceError(f"text source '{source}': weights must be > 0 and sum to 1 (got {weights})")
    if len(set(named)) != len(named):
        raise DataSourceError(f"text source '{source}' names a source twice; merge its weights")
    for name in named:
        if name != SELFGEN:
            _check_source(name)
    return list(zip(named, weights))


def _check_source(source: str) -> None:
    if source in ("embedded", "wikitext2"):
        return
    path = Path(source)
    if path.suffix.lower() not in (".txt", ".csv", ".jsonl"):
        raise DataSourceError(f"unknown text source '{source}'; valid forms: {', '.join(SOURCE_FORMS)}, "
                              f"'{SELFGEN}' (text sampled from the model), or a mixture 'a:0.5+b:0.5'")
    if not path.is_file():
        raise DataSourceError(f"text file '{source}' does not exist; give an existing path or use 'embedded'")


def mixture_counts(parts: list[tuple[str, float]], n: int) -> list[int]:
    """Return how many of `n` windows each part gets: its weight's share, rounded by largest remainder."""
    exact = [w * n for _, w in parts]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - counts[i], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    return counts


def _text_windows(tokenizer, source: str, n_samples: int, seq_len: int, seed: int, column: str | None) -> torch.Tensor:
    ids = split_tokens(tokenizer, source, "calibration", column)
    need = n_samples * seq_len
    if len(ids) < need:
        raise DataSourceError(
            f"calibration text of '{source}' has {len(ids)} tokens but {n_samples} windows x {seq_len} tokens = "
            f"{need} were requested; ask for fewer samples (<= {len(ids) // seq_len} at this seq_len), "
            "a shorter seq_len, or give a longer text source"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration_windows(tokenizer, source: str = "embedded", n_samples: int = 64, seq_len: int = 256,
                        seed: int = 0, column: str | None = None, model=None, selfgen_kw: dict | None = None,
                        selfgen_seed: int | None = None) -> torch.Tensor:
    """Return `n_samples` calibration windows of `seq_len` tokens as a LongTensor [n_samples, seq_len].

    `source` may be a mixture ('embedded:0.5+selfgen:0.5'): each part gives its weight's share of the windows.
    `selfgen` samples text from `model` (`selfgen.sample_windows`, cached; `selfgen_kw` sets temperature/top_p);
    `selfgen_seed` (default `seed`) lets other windows of the text parts reuse the samples already generated."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1 (got {n_samples}, {seq_len})")
    parts = parse_mixture(source)
    if any(name == SELFGEN for name, _ in parts) and model is None:
        raise DataSourceError(f"text source '{source}' includes '{SELFGEN}', text sampled from the model being "
                              "pruned: pass model= (the unpruned model) to calibration_windows")
    if len(parts) == 1 and parts[0][0] != SELFGEN:
        return _text_windows(tokenizer, parts[0][0], n_samples, seq_len, seed, column)
    pieces = []
    for (name, _), count in zip(parts, mixture_counts(parts, n_samples)):
        if count == 0:
            continue
        if name == SELFGEN:
            from pruning_utils.data.selfgen import sample_windows

            pieces.append(sample_windows(model, tokenizer, count, seq_len, purpose="calibration",
                                         seed=seed if selfgen_seed is None else selfgen_seed,
                                         **(selfgen_kw or {})))
        else:
            pieces.append(_text_windows(tokenizer, name, count, seq_len, seed, column))
    windows = torch.cat(pieces)
    # Interleave the parts: a step-capped recovery reading windows in order then sees every source.
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]


def text_parts(source: str) -> str:
    """Return the text parts of a source mixture, weights renormalised ('embedded:0.5+selfgen:0.5' -> 'embedded'):
    where held-out text must come from a split, never from the model's samples."""
    parts = [(n, w) for n, w in parse_mixture(source) if n != SELFGEN]
    if not parts:
        raise DataSourceError(f"text source '{source}' has no text part; add one, e.g. 'embedded:0.5+selfgen:0.5'")
    if len(parts) == 1:
        return parts[0][0]
    total = sum(w for _, w in parts)
    return "+".join(f"{n}:{w / total:.6g}" for n, w in parts)


def fidelity_chunks(model, tokenizer, n_tokens: int = 8192, seq_len: int = 256, seed: int = 0,
                    selfgen_kw: dict | None = None) -> torch.Tensor:
    """Return the held-out self-generated windows of the unpruned model (a seed stream calibration never uses):
    a variant's perplexity on them is its cross-entropy against the original model's own distribution."""
    from pruning_utils.data.selfgen import sample_windows

    if n_tokens < seq_len:
        raise ValueError(f"fidelity set of {n_tokens} tokens is shorter than one window of {seq_len}")
    return sample_windows(model, tokenizer, n_tokens // seq_len, seq_len, seed=seed, purpose="fidelity",
                          **(selfgen_kw or {}))


def eval_chunks(tokenizer, source: str = "embedded", seq_len: int = 512, max_tokens: int | None = 32768,
                column: str | None = None) -> torch.Tensor:
    """Return consecutive non-overlapping windows of evaluation tokens, at most `max_tokens` in all: [n, seq_len].

    Of a mixture, the text parts give windows by their (renormalised) weights; a `selfgen` part has no evaluation
    text of its own: `fidelity_chunks` holds out the model's samples instead."""
    parts = [(n, w) for n, w in parse_mixture(source) if n != SELFGEN]
    if not parts:
        raise DataSourceError(f"text source '{source}' has no evaluation text: self-generated text is measured by "
                              "the fidelity set (data.fidelity_chunks); add a text part, "
                              "e.g. 'embedded:0.5+selfgen:0.5'")
    if len(parts) == 1:
        return _eval_windows(tokenizer, parts[0][0], seq_len, max_tokens, column)
    total = sum(w for _, w in parts)
    parts = [(n, w / total) for n, w in parts]
    n_windows = None if max_tokens is None else max(1, max_tokens // seq_len)
    pieces = []
    for (name, weight), count in zip(parts, mixture_counts(parts, n_windows) if n_windows else [None] * len(parts)):
        if count != 0:
            pieces.append(_eval_windows(tokenizer, name, seq_len, None if count is None else count * seq_len, column))
    return torch.cat(pieces)


def _eval_windows(tokenizer, source: str, seq_len: int, max_tokens: int | None, column: str | None) -> torch.Tensor:
    ids = split_tokens(tokenizer, source, "evaluation", column)
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = usable // seq_len
    if n == 0:
        raise DataSourceError(
            f"evaluation text of '{source}' gives {len(ids)} tokens (max_tokens={max_tokens}), fewer than one "
            f"window of seq_len={seq_len}; use a shorter seq_len, a larger max_tokens, or a longer text source"
        )
    return ids[:n * seq_len].reshape(n, seq_len).clone()
