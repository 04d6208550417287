"""NeuronRank's LM-head pruning: remove rows of the output matrix (whole vocabulary entries), keep the vocabulary.

The rule is magnitude: the rows with the smallest L2 norm ||W_v||_2 go first. A row's norm bounds how far its
token's logit can move, not how often the token is the next one (a frequent token may have a small row), so every
LM-head row reports `unreachable_fraction` of its evaluation targets beside its perplexity. `plan_lm_head` picks
them, `prune_lm_head` removes them: the LM head becomes a `PrunedLMHead`, a smaller Linear holding the kept rows
plus a buffer of the kept token ids (the vocabulary mapping). It still returns logits over the whole vocabulary, the
removed tokens at -inf, so perplexity and generation run unchanged and a removed token is never generated (its
probability is exactly 0, so a text containing it has infinite perplexity).

A model whose input embedding and LM head share one matrix (SmolLM2, Qwen2.5, Llama 3.2) is untied: the input
embedding keeps every row, so such a model *stores more* parameters after LM-head pruning than before (its
`params_total` goes up); an untied model stores fewer. Screens only: `checkpoint.save_pruned` does not store it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pruning_utils.model.arch import lm_head
from pruning_utils.model.plan import PlanMismatchError
from pruning_utils.model.surgery import sliced_linear
from pruning_utils.prune.allocation import round_half_up
from pruning_utils.serialization import JsonMixin

RULE = "magnitude_l2"  # the rows with the smallest L2 norm are removed first


@dataclass
class LMHeadPlan(JsonMixin):
    """Kept rows (token ids) of an output matrix of `vocab_size` rows, and why; round-trips through JSON."""

    vocab_size: int
    kept: list[int]
    rate: float = 0.0
    rule: str = RULE
    provenance: dict[str, Any] = field(default_factory=dict)

    def removed(self) -> list[int]:
        """Return the removed token ids, ascending."""
        return sorted(set(range(self.vocab_size)) - set(self.kept))

    def validate(self) -> None:
        """Raise PlanMismatchError when the kept ids are empty, repeated or out of range."""
        if not self.kept:
            raise PlanMismatchError("LM-head plan keeps no vocabulary row; keep at least one (a lower rate)")
        if len(set(self.kept)) != len(self.kept) or min(self.kept) < 0 or max(self.kept) >= self.vocab_size:
            raise PlanMismatchError(f"LM-head plan: kept rows must be distinct token ids in [0, {self.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {**asdict(self), "kept": [int(i) for i in self.kept]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMHeadPlan":
        """Return the plan stored in a dict made by `to_dict`."""
        plan = cls(**d)
        plan.validate()
        return plan


class PrunedLMHead(nn.Module):
    """An LM head holding only the kept rows of the output matrix (`linear`) and their token ids (`kept_ids`):
    returns logits over all `vocab_size` tokens, the removed ones at -inf."""

    def __init__(self, linear: nn.Linear, kept_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        if linear.out_features != kept_ids.numel():
            raise ValueError(f"the kept Linear has {linear.out_features} rows but {kept_ids.numel()} token ids")
        self.linear = linear
        self.register_buffer("kept_ids", kept_ids.to(device=linear.weight.device, dtype=torch.long))
        self.vocab_size = int(vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return [..., vocab_size] logits: the kept rows' products scattered into a tensor of -inf."""
        kept = self.linear(hidden)
        full = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.kept_ids, kept)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, kept={self.kept_ids.numel()}"


def row_norms(model) -> torch.Tensor:
    """Return the L2 norm of every row of the model's (unpruned) output matrix, float32 on the CPU."""
    head = lm_head(model)
    if isinstance(head, PrunedLMHead):
        raise ValueError("the LM head is already pruned; plan on the unpruned model")
    return head.weight.detach().float().norm(dim=1).cpu()


def plan_lm_head(model, rate: float) -> LMHeadPlan:
    """Return a plan removing round(rate x vocabulary) rows of the LM head, those of smallest L2 norm (`RULE`)."""
    if not 0 < rate < 1:
        raise ValueError(f"LM-head rate must be in (0, 1), got {rate}")
    norms = row_norms(model)
    vocab = norms.numel()
    n_removed = round_half_up(vocab * rate)
    if n_removed >= vocab:
        raise ValueError(f"LM-head rate {rate} removes all {vocab} rows; keep at least one (a lower rate)")
    removed = norms.argsort(stable=True)[:n_removed]
    kept = sorted(set(range(vocab)) - set(removed.tolist()))
    plan = LMHeadPlan(vocab, kept, float(rate), provenance={"removed": n_removed, "tied": _tied(model),
                                                             "norm_kept_min": float(norms[kept].min())})
    plan.validate()
    return plan


def prune_lm_head(model, plan: LMHeadPlan):
    """Replace the model's LM head in place by a `PrunedLMHead` keeping `plan.kept` (untied from the input
    embedding, which stays whole); return the model."""
    plan.validate()
    head = lm_head(model)
    if isinstance(head, PrunedLMHead):
        raise ValueError("the LM head is already pruned; apply an LM-head plan to an unpruned model")
    if head.weight.shape[0] != plan.vocab_size:
        raise PlanMismatchError(f"the LM-head plan was made for {plan.vocab_size} rows, this model's head has "
                                f"{head.weight.shape[0]}; plan on this model")
    ids = torch.tensor(plan.kept, dtype=torch.long)
    new = PrunedLMHead(sliced_linear(head, rows=ids), ids, plan.vocab_size)  # sliced: a copy, never the shared matrix
    name = next(n for n, m in model.named_modules() if m is head)
    model.set_output_embeddings(new)
    # untie for good: transformers re-ties the output matrix to the input embedding when the config says so
    model.config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for key in [k for k in tied if k.startswith(f"{name}.")]:
            tied.pop(key)
    model.lm_head_plan = plan
    return model


def unreachable_fraction(plan: LMHeadPlan, chunks: torch.Tensor) -> float:
    """Return the share of the next-token targets of `chunks` [n, seq_len] (every token but each window's first)
    whose LM-head row `plan` removes: tokens the pruned model gives probability 0."""
    targets = chunks[:, 1:].reshape(-1).cpu()
    removed = torch.tensor(plan.removed(), dtype=targets.dtype)
    return float(torch.isin(targets, removed).float().mean()) if targets.numel() else 0.0


def _tied(model) -> bool:
    head, embed = lm_head(model), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight
