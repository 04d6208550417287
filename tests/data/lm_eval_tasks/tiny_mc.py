"""Loader for the tiny_mc lm-eval task: reads tiny_mc.jsonl from this folder into a `test` split."""
import json
from pathlib import Path


def load(**_metadata):
    """Return a DatasetDict with one `test` split built from the JSONL file next to this module."""
    import datasets

    lines = Path(__file__).with_name("tiny_mc.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
