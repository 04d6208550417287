"""The unpruned model's outputs on the evaluation chunks, computed once per run and reused by every KL measure.

`kl_to_baseline` needs the unpruned model's logits on the same tokens as the variant's. Every stage measures
several variants against the same unpruned model on the same chunks, so its full forward would be repeated for
each. The LM head's *input* (the final hidden states, `[tokens, hidden]`: 576 floats a token for SmolLM2-135M, not
a vocabulary's 49k) is kept instead, in memory and under `models/_cache/reference/`; the logits are then the LM head
applied to it — the same module on the same tensor in the same batch shapes, so the same numbers bit for bit, at
the cost of the LM head alone. The first tokens of the first batch check that claim (a family whose logits are
post-processed after the head, e.g. soft-capped, falls back to full forwards).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pruning_utils.atomic import atomic_file
from pruning_utils.data.selfgen import model_fingerprint
from pruning_utils.paths import models_dir


class ReferenceOutputs:
    """The unpruned `model`'s logits on `chunks` in batches of `batch_size`: `logits(start, ids)` returns those of
    rows `start:start + len(ids)`, from the cached LM-head input when it is known, else from one forward that fills
    the cache. Once every batch is known the cache is written to `cache_dir` for later stages."""

    def __init__(self, model, chunks: torch.Tensor, batch_size: int, cache_dir: str | Path | None = None,
                 digest: str | None = None):
        self.model, self.batch_size = model, batch_size
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.digest = digest or _digest(model, chunks, batch_size)
        self.path = Path(cache_dir or models_dir() / "_cache" / "reference") / f"{self.digest}.pt"
        self.hidden: dict[int, torch.Tensor] = {}
        self.exact: bool | None = None  # unknown until the first forward compares head(input) with the logits
        self.n_batches = (len(chunks) + batch_size - 1) // batch_size
        if self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved.get("digest") == self.digest:
                self.hidden, self.exact = dict(saved["hidden"]), True

    def head_input(self, start: int, ids: torch.Tensor) -> torch.Tensor:
        """Return the LM head's input `[len(ids), seq, hidden]` of rows `start:start + len(ids)`: the cached one, else
        the decoder body's output (no logits computed), cached (`metrics.perplexity(logits_rows=)` applies the head
        a few rows at a time)."""
        if start not in self.hidden or self.exact is False:
            from pruning_utils.model.arch import base_model

            with torch.inference_mode():
                body = base_model(self.model)(input_ids=ids.to(self.device), use_cache=False)
            if self.exact is False:  # logits post-processed after the head: nothing to cache
                return body.last_hidden_state
            self._keep(start, body.last_hidden_state)
        return self.hidden[start].to(self.device)

    def _keep(self, start: int, hidden: torch.Tensor) -> None:
        self.hidden[start] = hidden.detach().to("cpu")
        if len(self.hidden) == self.n_batches and not self.path.exists():
            with atomic_file(self.path) as tmp:
                torch.save({"digest": self.digest, "hidden": self.hidden}, tmp)

    def logits(self, start: int, ids: torch.Tensor) -> torch.Tensor:
        """Return the reference logits `[len(ids), seq, vocab]` of rows `start:start + len(ids)` of the chunks: the LM
        head on the (cached) head input, one logits tensor at a time; full forwards where the family changes the
        logits after the head."""
        if self.exact is None:
            self.exact = self._head_gives_the_logits(ids)
        if self.exact:
            hidden = self.head_input(start, ids)
            with torch.inference_mode():
                return self.head(hidden)
        with torch.inference_mode():
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    def _head_gives_the_logits(self, ids: torch.Tensor) -> bool:
        """Return whether the model's logits are its LM head applied to its decoder body's output, bit for bit, on
        the first tokens of `ids` (not, e.g., soft-capped after the head): then the cached head input reproduces
        them. A few tokens decide it: a whole batch's second logits tensor would double the peak of a
        150k-vocabulary model."""
        from pruning_utils.model.arch import base_model

        few = ids[:1, :CHECK_TOKENS].to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=few, use_cache=False).logits
            body = base_model(self.model)(input_ids=few, use_cache=False).last_hidden_state
            return bool(torch.equal(self.head(body), logits))


CHECK_TOKENS = 16  # tokens of the first row that `_head_gives_the_logits` compares


_OPEN: dict[str, ReferenceOutputs] = {}


def reference_outputs(model, chunks: torch.Tensor, batch_size: int) -> ReferenceOutputs:
    """Return the `ReferenceOutputs` of `model` on `chunks`, the same object for every call with the same weights,
    chunks and batch size (a model pruned in place since gets a new fingerprint, hence new outputs)."""
    digest = _digest(model, chunks, batch_size)
    if digest not in _OPEN:
        _OPEN.clear()  # one unpruned model and one set of chunks per stage: keep the memory of one
        _OPEN[digest] = ReferenceOutputs(model, chunks, batch_size, digest=digest)
    return _OPEN[digest]


def _digest(model, chunks: torch.Tensor, batch_size: int) -> str:
    param = next(model.parameters())
    tokens = hashlib.sha256(chunks.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
    fields = [model_fingerprint(model), tokens, tuple(chunks.shape), batch_size, param.device.type, str(param.dtype),
              torch.__version__]
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:20]
