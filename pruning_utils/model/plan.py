"""A pruning plan: which query heads, MLP neurons and decoder layers to keep, and why.

Indices are relative to the model the plan is applied to. A plan records that
model's shapes (`base_heads`, `base_intermediate`, `base_layers`) so applying it
to any other model fails loudly instead of silently cutting the wrong rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pruning_utils.serialization import JsonMixin


class PlanMismatchError(ValueError):
    """Raised when a plan does not fit the model it is applied to."""


@dataclass
class PruningPlan(JsonMixin):
    """Kept indices per layer plus provenance; round-trips through JSON."""

    base_heads: list[int]  # query heads per layer of the model the plan was made for
    base_intermediate: list[int]  # MLP width per layer of that model
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept query heads (absent: keep all)
    neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept MLP channels (absent: keep all)
    layers: list[int] | None = None  # kept decoder layers, applied after heads/neurons (None: keep all)
    source_model: str = ""
    criterion: str = ""
    allocation: str = ""
    head_rate: float = 0.0
    mlp_rate: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def base_layers(self) -> int:
        """Return the number of decoder layers of the model the plan was made for."""
        return len(self.base_heads)

    def kept_heads(self, layer: int) -> list[int]:
        """Return the kept query heads of a layer (all when the plan leaves it alone)."""
        return self.heads.get(layer, list(range(self.base_heads[layer])))

    def kept_neurons(self, layer: int) -> list[int]:
        """Return the kept MLP channels of a layer (all when the plan leaves it alone)."""
        return self.neurons.get(layer, list(range(self.base_intermediate[layer])))

    def kept_layers(self) -> list[int]:
        """Return the kept decoder layers."""
        return list(range(self.base_layers)) if self.layers is None else list(self.layers)

    def result_shapes(self) -> list[tuple[int, int]]:
        """Return (query heads, MLP width) of every layer left after the plan."""
        return [(len(self.kept_heads(i)), len(self.kept_neurons(i))) for i in self.kept_layers()]

    def validate(self) -> None:
        """Raise PlanMismatchError when indices are out of range, repeated or empty."""
        if len(self.base_intermediate) != self.base_layers:
            raise PlanMismatchError("plan base_heads and base_intermediate have different lengths")
        for name, table, base in (("heads", self.heads, self.base_heads),
                                  ("neurons", self.neurons, self.base_intermediate)):
            for layer, kept in table.items():
                if not 0 <= layer < self.base_layers:
                    raise PlanMismatchError(f"plan {name} names layer {layer}, the model has {self.base_layers}")
                if not kept:
                    raise PlanMismatchError(f"plan keeps no {name} in layer {layer}; "
                                            "keep at least one or drop the layer")
                if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= base[layer]:
                    raise PlanMismatchError(
                        f"plan {name} of layer {layer} must be distinct indices in [0, {base[layer]}), "
                        f"got {kept[:8]}..."
                    )
        if self.layers is not None:
            if not self.layers:
                raise PlanMismatchError("plan keeps no decoder layer")
            if (len(set(self.layers)) != len(self.layers) or min(self.layers) < 0
                    or max(self.layers) >= self.base_layers):
                raise PlanMismatchError(f"plan layers must be distinct indices in [0, {self.base_layers})")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (layer keys become strings, as JSON requires)."""
        d = asdict(self)
        d["heads"] = {str(k): [int(i) for i in v] for k, v in sorted(self.heads.items())}
        d["neurons"] = {str(k): [int(i) for i in v] for k, v in sorted(self.neurons.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningPlan":
        """Return the plan stored in a dict made by `to_dict`."""
        d = dict(d)
        d["heads"] = {int(k): list(v) for k, v in d.get("heads", {}).items()}
        d["neurons"] = {int(k): list(v) for k, v in d.get("neurons", {}).items()}
        plan = cls(**d)
        plan.validate()
        return plan

    def composed_with(self, earlier: "PruningPlan") -> "PruningPlan":
        """Return this plan (made on a model that `earlier` produced) expressed in the original model's indices."""
        # surgery keeps heads, neurons and layers in their original order, whatever order `earlier` lists them in
        kept_layers = sorted(earlier.kept_layers())
        if len(kept_layers) != self.base_layers:
            raise PlanMismatchError("plans do not chain: layer counts differ")
        heads, neurons = {}, {}
        for new_idx, orig in enumerate(kept_layers):
            eh, en = sorted(earlier.kept_heads(orig)), sorted(earlier.kept_neurons(orig))
            h = [eh[i] for i in self.kept_heads(new_idx)]
            n = [en[i] for i in self.kept_neurons(new_idx)]
            if len(h) != earlier.base_heads[orig]:
                heads[orig] = h
            if len(n) != earlier.base_intermediate[orig]:
                neurons[orig] = n
        layers = None
        if self.layers is not None or earlier.layers is not None:
            layers = [kept_layers[i] for i in self.kept_layers()]
        return PruningPlan(
            base_heads=list(earlier.base_heads),
            base_intermediate=list(earlier.base_intermediate),
            heads=heads,
            neurons=neurons,
            layers=layers,
            source_model=earlier.source_model or self.source_model,
            criterion="+".join(c for c in (earlier.criterion, self.criterion) if c),
            allocation="+".join(a for a in (earlier.allocation, self.allocation) if a),
            head_rate=max(self.head_rate, earlier.head_rate),
            mlp_rate=max(self.mlp_rate, earlier.mlp_rate),
            provenance={"stages": [earlier.provenance, self.provenance]},
        )

    def combined_with(self, other: "PruningPlan") -> "PruningPlan":
        """Return the plan removing what either plan removes; both must be made for the same model."""
        if (self.base_heads, self.base_intermediate) != (other.base_heads, other.base_intermediate):
            raise PlanMismatchError("plans made for models of different shapes cannot be combined; use "
                                    "composed_with for a plan made on the model another plan produced")

        def both(mine: dict, theirs: dict, base: list[int]) -> dict[int, list[int]]:
            out = {}
            for layer in sorted(set(mine) | set(theirs)):
                kept = set(mine.get(layer, range(base[layer]))) & set(theirs.get(layer, range(base[layer])))
                out[layer] = sorted(kept)
            return out

        layers = None
        if self.layers is not None or other.layers is not None:
            layers = sorted(set(self.kept_layers()) & set(other.kept_layers()))
        plan = PruningPlan(
            base_heads=list(self.base_heads), base_intermediate=list(self.base_intermediate),
            heads=both(self.heads, other.heads, self.base_heads),
            neurons=both(self.neurons, other.neurons, self.base_intermediate), layers=layers,
            source_model=self.source_model or other.source_model,
            criterion="+".join(dict.fromkeys(c for c in (other.criterion, self.criterion) if c)),
            allocation="+".join(dict.fromkeys(a for a in (other.allocation, self.allocation) if a)),
            head_rate=max(self.head_rate, other.head_rate), mlp_rate=max(self.mlp_rate, other.mlp_rate),
            provenance={"combined": [other.provenance, self.provenance]},
        )
        plan.validate()
        return plan

    @classmethod
    def identity(cls, shapes, source_model: str = "") -> "PruningPlan":
        """Return a plan that keeps everything of a model with the given `arch.LayerShape` list."""
        return cls(
            base_heads=[s.n_heads for s in shapes],
            base_intermediate=[s.intermediate for s in shapes],
            source_model=source_model,
        )
