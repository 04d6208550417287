"""Importance scores: the `Scores` record every criterion returns, and its storage as safetensors + a summary CSV."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from pruning_utils.atomic import atomic_file

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
