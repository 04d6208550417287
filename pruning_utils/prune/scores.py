"""Importance scores: the `Scores` record every criterion returns, its restriction to a model a plan pruned, and its
storage as safetensors + a summary CSV."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pruning_utils.atomic import atomic_file
from pruning_utils.model.plan import PruningPlan

SCORES_FILE = "importance.safetensors"
SUMMARY_FILE = "importance_summary.csv"
PROVENANCE_KEY = "provenance"  # safetensors metadata: JSON {criterion: provenance}


@dataclass
class Scores:
    """Per-layer importance (float32, CPU): `heads[l]` is [n_heads_l], `neurons[l]` is [intermediate_l]."""

    heads: list[Tensor]
    neurons: list[Tensor]
    criterion: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


def shape_mismatch(scores: Scores, heads: list[int], widths: list[int]) -> str | None:
    """Return where `scores` do not cover a model of `heads` query heads and `widths` MLP neurons per layer (the first
    layer that differs, in words), or None when they do."""
    have = [(h.numel(), n.numel()) for h, n in zip(scores.heads, scores.neurons)]
    want = list(zip(heads, widths))
    if have == want:
        return None
    li = next(i for i, (a, b) in enumerate(zip(have + [None], want + [None])) if a != b)
    model, scored = (f"{t[li][0]} query heads and {t[li][1]} MLP neurons" if li < len(t) else "no such layer"
                     for t in (want, have))
    return f"{len(want)} layers, {len(have)} scored; layer {li}: the model {model}, the scores {scored}"


def restrict_scores(scores: Scores, plan: PruningPlan) -> Scores:
    """Return the scores of the model `plan` produced from the scored one: its kept layers, and in each the kept
    heads' and neurons' scores in the order surgery leaves them in the weights (ascending original index); raises
    ValueError when `scores` are not of the plan's base model (other per-layer shapes)."""
    plan.validate()
    problem = shape_mismatch(scores, plan.base_heads, plan.base_intermediate)
    if problem:
        raise ValueError(f"scores '{scores.criterion}' are not of the model the plan was made for ({problem}): they "
                         "are scores of another model (e.g. of the pruned checkpoint itself); compute them (notebook "
                         f"00) on the model the checkpoint was pruned from ({plan.source_model or 'its source model'})")

    def kept(t: Tensor, idx: list[int]) -> Tensor:
        return t.index_select(0, torch.tensor(sorted(idx), dtype=torch.long))

    layers = sorted(plan.kept_layers())  # surgery keeps layers, like heads and neurons, in their original order
    return Scores([kept(scores.heads[li], plan.kept_heads(li)) for li in layers],
                  [kept(scores.neurons[li], plan.kept_neurons(li)) for li in layers], scores.criterion,
                  dict(scores.provenance))


def save_scores(scores: dict[str, Scores], folder: str | Path) -> Path:
    """Write `importance.safetensors` (keys like `taylor.heads.3`, each criterion's provenance in its metadata) and a
    tidy per-layer summary CSV; return the folder."""
    import pandas as pd
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat, rows = {}, []
    for name, s in scores.items():
        if "." in name:
            raise ValueError(f"criterion name '{name}' must not contain '.' (it separates the stored keys)")
        for kind, per_layer in (("heads", s.heads), ("neurons", s.neurons)):
            for layer, t in enumerate(per_layer):
                t = t.detach().float().cpu().contiguous()
                flat[f"{name}.{kind}.{layer}"] = t
                rows.append(dict(criterion=name, kind=kind, layer=layer, n=t.numel(), mean=t.mean().item(),
                                 std=t.std().item() if t.numel() > 1 else 0.0, min=t.min().item(), max=t.max().item()))
    with atomic_file(folder / SCORES_FILE) as tmp:  # results: a full disk leaves the previous file, not half of one
        provenance = json.dumps({name: s.provenance for name, s in scores.items()}, default=str)
        save_file(flat, str(tmp), metadata={PROVENANCE_KEY: provenance})
    with atomic_file(folder / SUMMARY_FILE) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return folder


def load_scores(folder: str | Path) -> dict[str, Scores]:
    """Return the scores stored by `save_scores` in `folder`, with their provenance (empty when saved without)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; compute scores and store them with save_scores(scores, folder)")
    table: dict[str, dict[str, dict[int, Tensor]]] = {}
    for key, t in load_file(str(path)).items():
        name, kind, layer = key.rsplit(".", 2)
        table.setdefault(name, {"heads": {}, "neurons": {}})[kind][int(layer)] = t
    with safe_open(str(path), "pt") as f:
        provenance = json.loads((f.metadata() or {}).get(PROVENANCE_KEY, "{}"))
    return {name: Scores([k["heads"][i] for i in sorted(k["heads"])],
                         [k["neurons"][i] for i in sorted(k["neurons"])], name, provenance.get(name, {}))
            for name, k in table.items()}
