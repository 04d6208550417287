"""The table of notebook 04, recovery.csv: one row per recovered model, its quality before and after recovery and
what the training cost."""
from __future__ import annotations

from typing import Any

from pruning_utils.measure.evaluation import OVERLAP_COLUMNS


def warn_if_retention_fell(name: str, before: dict[str, Any], after: dict[str, Any], data: str, loss: str) -> bool:
    """Print a warning and return True when recovery LOWERED the semantic retention (`cosine_mean`) of model `name`."""
    fell = after["cosine_mean"] < before["cosine_mean"]
    if fell:
        print(f"WARNING: recovery of {name} LOWERED semantic retention {before['cosine_mean']:.3f} -> "
              f"{after['cosine_mean']:.3f} (RECOVERY_DATA={data}, RECOVERY_LOSS={loss})")
    return fell


def recovery_row(name: str, stats: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
                 baseline: dict[str, Any], retention_before: dict[str, Any], retention_after: dict[str, Any],
                 loss: str, data: str) -> dict[str, Any]:
    """Return the recovery.csv row of model `name`.

    `stats` are the training statistics (`lora.train_lora`), `before` / `after` the variant rows of the pruned and
    recovered models (`measure_variant`), `baseline` the unpruned model's row, `retention_*` the models'
    `evaluation.answer_retention` against the unpruned answers (`rouge_l_f1_before`, ... are None for a retention
    judged by cosine alone, `semantic_retention`); `damage_recovered_pct` is the share of the perplexity lost to
    pruning that recovery won back (NaN when pruning lost none)."""
    damage = before["ppl"] - baseline["ppl"]
    return dict(model=name, steps=stats["steps"], tokens_seen=stats["tokens_seen"], loss=loss, data=data,
                fidelity_before=before.get("fidelity_ppl"), fidelity_after=after["fidelity_ppl"],
                heldout_ppl_before=before.get("heldout_ppl"), heldout_ppl_after=after.get("heldout_ppl"),
                kl_before=before.get("kl_to_baseline"), kl_after=after["kl_to_baseline"],
                semantic_before=retention_before["cosine_mean"], semantic_after=retention_after["cosine_mean"],
                **{f"{c}_{when}": kept.get(c) for c in OVERLAP_COLUMNS
                   for when, kept in (("before", retention_before), ("after", retention_after))},
                heldout_loss_before=stats["heldout_loss_before"], heldout_loss_after=stats["heldout_loss_after"],
                train_loss_first=stats["loss_first"], train_loss_last=stats["loss_last"], ppl_baseline=baseline["ppl"],
                ppl_before=before["ppl"], ppl_after=after["ppl"],
                damage_recovered_pct=100 * (before["ppl"] - after["ppl"]) / damage if damage > 0 else float("nan"),
                minutes=stats["minutes"], train_tokens_per_s=stats["tokens_per_s"], device=after["device"],
                dtype=after["dtype"], load_avg=after.get("load_avg"))  # measured just after the training
