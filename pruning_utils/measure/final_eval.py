"""The table of notebook 06, final_eval.csv: every variant measured the same way in one run, one row each."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from pruning_utils.measure import evaluation
from pruning_utils.measure.metrics import checkpoint_size_mb, nonzero_params_non_embedding
from pruning_utils.measure.variants import PROVENANCE_COLUMNS, measure_variant, reuses_perplexity
from pruning_utils.model.checkpoint import read_checkpoint_meta, resolve_checkpoint_dir

BASELINE = "baseline"  # the variant every other one is compared with: the unpruned model, first in the table


def rows_reusable(names: Sequence[str], eval_seq_len: int, eval_max_tokens: int | None) -> bool:
    """Return whether notebook 06 reuses the perplexity and KL of every variant in `names` from the row its stage
    recorded (`final_row`: baseline.csv for the baseline, the checkpoint's metadata otherwise), as it does when each
    row was scored on a full set of `eval_seq_len` windows within `eval_max_tokens`. Its memory plan then has no
    full perplexity pass to hold (`memory_plan`'s `rows_known`). False when a row is missing, or was measured on
    other chunks or on a text too short to fill `eval_max_tokens` (06 then measures, and the plan counts it)."""
    import pandas as pd

    from pruning_utils.paths import ablation_dir

    if not eval_max_tokens or eval_seq_len < 2:
        return False
    predicted = int(eval_max_tokens) // int(eval_seq_len) * (int(eval_seq_len) - 1)
    try:
        rows = [pd.read_csv(ablation_dir() / "baseline.csv").iloc[0].to_dict() if name == BASELINE
                else read_checkpoint_meta(name)["extra"] for name in names]
    except (OSError, KeyError, IndexError, ValueError):
        return False
    return bool(rows) and all(reuses_perplexity(row, predicted, needs_kl=name != BASELINE)
                              for name, row in zip(names, rows))


# what `cost_from_record` copies from the baseline's recorded row (stage 00 measured it where the model could run)
RECORDED_COST = ("prefill_ms", "prefill_ms_iqr", "decode_tok_s", "load_avg", "latency_noisy", "peak_memory_mb",
                 "device", "dtype")


def final_row(name: str, model, tokenizer, chunks: torch.Tensor, *, source_model: str, recorded_baseline: dict,
              reference: dict | None, prompts: Sequence[str | dict], judge=None,
              reference_answers: Sequence[str] | None = None, max_new_tokens: int = 48, memory_kw: dict | None = None,
              zero_shot_tasks: Sequence[str] | None = None, zero_shot_limit: int | float | None = None,
              cost_from_record: bool = False, **measure_kw: Any) -> tuple[dict, list[str]]:
    """Return `(row, answers)` of variant `name`: its `measure_variant` row plus provenance, checkpoint size,
    semantic retention of its greedy answers (cosine, exact and first-sentence match, and `evaluation.answer_overlap`'s
    `rouge_l_f1` and `bertscore_f1_minilm_l6` means) and, unless `zero_shot_tasks` is None, zero-shot accuracy
    (`zs_<task>`).

    Perplexity is deterministic: the value the variant's stage recorded on the same chunks is reused (the checkpoint's
    metadata; `recorded_baseline`, the row of baseline.csv, for the baseline), while cost is measured here. So is the
    provenance (`PROVENANCE_COLUMNS`): a variant derived without more pruning (INT8, LoRA) recorded its source's.
    `reference` is the baseline's row of this run (None for the baseline itself), `reference_answers` its answers
    (None for the baseline: its own answers are the reference). `memory_kw` (without `spec`, which is set to the
    checkpoint) and `measure_kw` (latency_kw, fidelity_chunks, reference_model, ...) go to `measure_variant`.
    `cost_from_record`: the baseline is held where its cost means nothing (the unpruned model on the host, beside a
    GPU it does not fit): its latency and peak memory are `recorded_baseline`'s, its zero-shot is not run."""
    is_baseline = name == BASELINE
    recorded_cost = is_baseline and cost_from_record
    if recorded_cost:
        if zero_shot_tasks is not None:
            print("zero-shot accuracy of the baseline is left out: the unpruned model is held on the host, where "
                  "lm-evaluation-harness would run on the CPU")
        # what it measures (side perplexities not in the record) runs layer by layer on the device, as its KL did
        memory_kw, zero_shot_tasks = None, None
        measure_kw = dict(measure_kw, latency_kw=None, compute_device=measure_kw.get("reference_device"))
    meta = recorded_baseline if is_baseline else read_checkpoint_meta(name)["extra"]
    memory = None if memory_kw is None else dict(spec=source_model if is_baseline else name, **memory_kw)
    row = measure_variant(model, chunks, variant=name, source_model=source_model, reference=reference, known=meta,
                          memory_kw=memory, **measure_kw)
    row.update({k: meta[k] for k in PROVENANCE_COLUMNS if k in meta and not is_baseline})
    if recorded_cost:
        row.update({k: recorded_baseline[k] for k in RECORDED_COST if k in recorded_baseline}, kl_to_baseline=0.0)
    if not is_baseline:
        row["size_mb"] = checkpoint_size_mb(resolve_checkpoint_dir(name))
    row["nonzero_params_non_embedding"] = nonzero_params_non_embedding(model)  # below the count only when sparse
    answers = evaluation.generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, cache=True)
    reference_answers = answers if reference_answers is None else reference_answers
    ret = evaluation.semantic_retention(reference_answers, answers, judge)
    overlap = evaluation.answer_overlap(reference_answers, answers)
    row.update(semantic_cosine=ret["cosine_mean"], semantic_ci_low=ret["cosine_ci_low"],
               semantic_ci_high=ret["cosine_ci_high"], semantic_cosine_min=ret["cosine_min"],
               exact_match=ret["exact_match"], first_sentence_match=ret["first_sentence_match"],
               **{c: overlap[c] for c in evaluation.OVERLAP_COLUMNS}, n_prompts=len(prompts))
    if zero_shot_tasks is not None:
        zs = evaluation.zero_shot(model, tokenizer, zero_shot_tasks, limit=zero_shot_limit)
        row.update({f"zs_{k}": v for k, v in zs.items()})
    return row, answers
