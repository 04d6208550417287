"""Prompt features and a complexity score in [0, 1]: what the adaptive controllers read about a prompt.

Features: token count, question / imperative form, code and math presence, named-entity and clause counts (spaCy when
it is importable and has an English model, else regular expressions) and, given a model, the entropy of its first
answer token. The score is a fixed weighted mean of saturating transforms of these features (`WEIGHTS`), so it is
monotone in each of them and needs no fitting.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

IMPERATIVES = ("write", "explain", "describe", "list", "give", "summarize", "summarise", "compare", "translate",
               "create", "design", "implement", "compute", "calculate", "solve", "prove", "derive", "analyze",
               "analyse", "name", "tell", "show", "define", "suggest", "rewrite", "classify", "outline", "find")
_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|\bimport\b|[{};]|\w+\(\)|\bpython\b|\bjavascript\b|\bsql\b|"
                   r"\bfunction\b|\bcode\b|\bregex\b|\balgorithm\b", re.I)
_MATH = re.compile(r"\d+\s*[-+*/^=<>]\s*\d+|\b(integral|derivative|equation|prove|theorem|probability|matrix|sum of|"
                   r"square root|percent|solve|calculate|compute)\b|[∑∫√π]", re.I)
_CLAUSE = re.compile(r"[,;:]|\b(and|but|or|because|although|while|which|that|if|when|whereas|unless|then)\b", re.I)
_ENTITY = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*|\b[A-Z]{2,}\b|\b\d{3,4}\b")
# weight of each feature in the score; the transforms map each feature to [0, 1]
WEIGHTS = {"tokens": 0.25, "imperative": 0.1, "code": 0.15, "math": 0.15, "entities": 0.1, "clauses": 0.1,
           "entropy": 0.15}
TOKENS_SCALE, ENTITY_SCALE, CLAUSE_SCALE = 96, 6, 8  # counts at which a saturating feature reaches ~0.63


@dataclass
class PromptFeatures:
    """What the controllers know about a prompt before answering it."""

    n_tokens: int
    question: bool
    imperative: bool
    code: bool
    math: bool
    entities: int
    clauses: int
    entropy: float | None = None  # first answer token's entropy under the model, divided by log(vocabulary)

    def to_dict(self) -> dict:
        """Return the features as a flat dict."""
        return asdict(self)


def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # not installed, or no English model: the regular expressions stand in
        return None


_NLP = None


def entity_and_clause_counts(text: str) -> tuple[int, int]:
    """Return (named entities, clauses) of a text: spaCy when available, else regular expressions."""
    global _NLP
    if _NLP is None:
        _NLP = _spacy() or False
    if _NLP:
        doc = _NLP(text)
        return len(doc.ents), sum(1 for t in doc if t.dep_ in ("ROOT", "advcl", "relcl", "ccomp", "conj", "xcomp"))
    return len(_ENTITY.findall(text)), 1 + len(_CLAUSE.findall(text))


def prompt_features(prompt: str, tokenizer=None, model=None) -> PromptFeatures:
    """Return the features of a prompt (entropy only when a model and its tokenizer are given)."""
    words = prompt.strip().split()
    first = words[0].lower().strip(".,:;!?") if words else ""
    n_tokens = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer is not None else len(words)
    entities, clauses = entity_and_clause_counts(prompt)
    entropy = first_token_entropy(model, tokenizer, prompt) if model is not None and tokenizer is not None else None
    return PromptFeatures(n_tokens=n_tokens, question=prompt.strip().endswith("?"), imperative=first in IMPERATIVES,
                          code=bool(_CODE.search(prompt)), math=bool(_MATH.search(prompt)), entities=entities,
                          clauses=clauses, entropy=entropy)


@torch.inference_mode()
def first_token_entropy(model, tokenizer, prompt: str) -> float:
    """Return the entropy of the model's first answer token for a prompt, divided by log(vocabulary size)
    (in [0, 1])."""
    from pruning_utils.measure.evaluation import format_prompt

    text = format_prompt(tokenizer, prompt)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))])
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1).logits[0, -1]
    return entropy_of_logits(logits)


def entropy_of_logits(logits: torch.Tensor) -> float:
    """Return the entropy of next-token logits [V] (or [1, V]) divided by log(V), in [0, 1]."""
    logp = torch.log_softmax(logits.float().reshape(-1), -1)
    return float(-(logp.exp() * logp).sum() / math.log(logp.shape[-1]))


def _saturate(x: float, scale: float) -> float:
    return 1.0 - math.exp(-max(x, 0.0) / scale)


def complexity(features: PromptFeatures) -> float:
    """Return the complexity score in [0, 1] of a prompt's features (a missing entropy leaves its weight out)."""
    parts = {"tokens": _saturate(features.n_tokens, TOKENS_SCALE), "imperative": float(features.imperative),
             "code": float(features.code), "math": float(features.math),
             "entities": _saturate(features.entities, ENTITY_SCALE),
             "clauses": _saturate(features.clauses - 1, CLAUSE_SCALE)}
    if features.entropy is not None:
        parts["entropy"] = min(max(features.entropy, 0.0), 1.0)
    total = sum(WEIGHTS[k] for k in parts)
    return sum(WEIGHTS[k] * v for k, v in parts.items()) / total
