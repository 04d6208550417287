"""Recovery training data: instruction JSONL (Dolly / Alpaca), the unpruned model's own answers
(self-data distillation), calibration text, or a mixture; every kind as packed token windows [n, seq_len].
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pruning_utils.atomic import write_text_atomic
from pruning_utils.data.files import DataFileError, jsonl_records
from pruning_utils.data.selfgen import model_fingerprint
from pruning_utils.data.sources import encode
from pruning_utils.measure.evaluation import TRAIN_PROMPTS_FILE, generate_answers, load_instructions
from pruning_utils.paths import models_dir


def instruction_windows(tokenizer, jsonl_path: str | Path, seq_len: int, instruction_field: str = "instruction",
                        response_field: str = "response", context_fields: tuple[str, ...] = ("context", "input"),
                        ) -> torch.Tensor:
    """Return Dolly/Alpaca-style JSONL records, chat-formatted and packed, as a LongTensor [n, seq_len].

    Records are formatted with the tokenizer's chat template when it has one, else as
    "### Instruction / ### Response"; a non-empty context field (Dolly `context`, Alpaca `input`) is
    appended to the instruction. Alpaca's answer field is `output`: pass response_field="output". A line that is not
    a JSON object, or a file that is not UTF-8, raises DataFileError naming the file and line.
    """
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file '{path}' does not exist; give a JSONL file with one record per line")
    pairs = []
    for line_no, rec in jsonl_records(path):
        if instruction_field not in rec or response_field not in rec:
            raise DataFileError(f"{path}:{line_no} lacks '{instruction_field}' or '{response_field}' (it has "
                                f"{sorted(rec)}); pass instruction_field= / response_field= naming its fields")
        prompt = str(rec[instruction_field])
        context = next((str(rec[f]) for f in context_fields if str(rec.get(f) or "").strip()), "")
        if context:
            prompt = f"{prompt}\n\n{context}"
        pairs.append((prompt, str(rec[response_field])))
    if not pairs:
        raise DataFileError(f"{path} holds no records: recovery needs at least one instruction/response line")
    return pack_dialogues(tokenizer, pairs, seq_len, what=str(path))


def pack_dialogues(tokenizer, pairs: list[tuple[str, str]], seq_len: int, what: str = "dialogues") -> torch.Tensor:
    """Return (prompt, answer) pairs chat-formatted (or '### Instruction / ### Response') and packed into
    consecutive windows, as a LongTensor [n, seq_len]."""
    template = getattr(tokenizer, "chat_template", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for prompt, answer in pairs:
        if template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            ids += encode(tokenizer, text)  # the template already ends the turn with its own end token
        else:
            ids += encode(tokenizer, f"### Instruction:\n{prompt}\n\n### Response:\n{answer}")
            if eos is not None:
                ids.append(int(eos))
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{what} give {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                         "use a shorter seq_len or more records")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


# ------------------------------------------------------------------------------------------ self-data distillation

RECOVERY_DATA = ("text", "selfdistill", "selfdistill+text")


def selfdistill_windows(teacher, tokenizer, seq_len: int, prompts: list | None = None, max_new_tokens: int = 128,
                        batch_size: int = 16, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Return windows [n, seq_len] of the unpruned model's own greedy answers to training prompts, chat-formatted
    and packed: what self-data distillation trains the pruned model on (the judge's prompts are never among them).

    The answers are cached on disk (JSONL), keyed by the teacher's weights, the prompts and `max_new_tokens`."""
    items = prompts if prompts is not None else load_instructions(TRAIN_PROMPTS_FILE)
    texts = [p["prompt"] if isinstance(p, dict) else str(p) for p in items]
    if not texts:
        raise ValueError("self-data distillation needs at least one training prompt")
    key = hashlib.sha256(json.dumps([model_fingerprint(teacher), texts, max_new_tokens]).encode()).hexdigest()[:20]
    path = Path(cache_dir) if cache_dir is not None else models_dir() / "_cache" / "selfdistill"
    path = path / f"answers-{key}.jsonl"
    if path.exists():
        answers = [json.loads(line)["response"] for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        answers = generate_answers(teacher, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        # whole or absent: a crash or a full disk never leaves half a cache
        write_text_atomic(path, "".join(json.dumps({"instruction": t, "response": a}) + "\n"
                                        for t, a in zip(texts, answers)))
    return pack_dialogues(tokenizer, list(zip(texts, answers)), seq_len, what="self-distillation answers")


def recovery_windows(data: str, tokenizer, n: int, seq_len: int, teacher, text_windows, seed: int = 0,
                     **selfdistill_kw) -> torch.Tensor:
    """Return `n` training windows of the recovery `data`: 'text' (`text_windows(n)`, calibration text),
    'selfdistill' (the teacher's answers to training prompts) or 'selfdistill+text' (half of each, interleaved).

    Self-distillation windows are fewer than asked when the answers give fewer: training stops at one epoch."""
    if data not in RECOVERY_DATA:
        raise ValueError(f"unknown recovery data '{data}'; known: {', '.join(RECOVERY_DATA)}")
    if data == "text":
        return text_windows(n)
    own = selfdistill_windows(teacher, tokenizer, seq_len, **selfdistill_kw)
    if data == "selfdistill":
        return own[:n]
    half = min(len(own), n // 2)
    mixed = torch.cat([own[:half], text_windows(n - half)])
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]


def training_windows(data: str, tokenizer, text_source: str, n: int, seq_len: int, model, seed: int = 0,
                     instruction_jsonl: str | Path | None = None, selfgen_kw: dict | None = None) -> torch.Tensor:
    """Return the recovery training windows: the `instruction_jsonl` records when given, else `recovery_windows` of
    `data` with `model` (the unpruned one) as teacher and calibration text drawn with seed + 1."""
    if instruction_jsonl:
        return instruction_windows(tokenizer, instruction_jsonl, seq_len)
    from pruning_utils.data.sources import calibration_windows

    def text_windows(k: int) -> torch.Tensor:  # other windows of the calibration split; selfgen parts: seed's samples
        return calibration_windows(tokenizer, text_source, n_samples=k, seq_len=seq_len, seed=seed + 1, model=model,
                                   selfgen_kw=selfgen_kw, selfgen_seed=seed)

    return recovery_windows(data, tokenizer, n, seq_len, model, text_windows, seed=seed)
