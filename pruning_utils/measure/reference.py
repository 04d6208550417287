"""The unpruned model's outputs on the evaluation chunks, computed once per run and reused by every KL measure.

`kl_to_baseline` needs the unpruned model's logits on the same tokens as the variant's. Every stage measures
several variants against the same unpruned model on the same chunks, so its full forward would be repeated for
each. The LM head's *input* (the final hidden states, `[tokens, hidden]`: 576 floats a token for SmolLM2-135M, not
a vocabulary's 49k) is kept instead, in memory and under `models/_cache/reference/`; the logits are then the LM head
applied to it — the same module on the same tensor in the same batch shapes, so the same numbers bit for bit, at
the cost of the LM head alone. The first tokens of the first batch check that claim (a family whose logits are
post-processed after the head, e.g. soft-capped, falls back to full forwards).

With a `compute_device` (the unpruned model kept on the host, as an 8B model next to its pruned student on a 15 GiB
T4), the head inputs come from a layer walk on that device (`calibration.last_hidden`: one decoder layer there at a
time, about `calibration.OFFLOAD_WINDOWS` windows per walk) and the LM head visits the device while a pass scores
(`scoring`).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from pruning_utils.atomic import atomic_file
from pruning_utils.data.selfgen import model_fingerprint
from pruning_utils.paths import models_dir


class ReferenceOutputs:
    """The unpruned `model`'s logits on `chunks` in batches of `batch_size`: `logits(start, ids)` returns those of
    rows `start:start + len(ids)`, from the cached LM-head input when it is known, else from one forward that fills
    the cache. Once every batch is known the cache is written to `cache_dir` for later stages."""

    def __init__(self, model, chunks: torch.Tensor, batch_size: int, cache_dir: str | Path | None = None,
                 digest: str | None = None, compute_device: torch.device | str | None = None):
        self.model, self.batch_size, self.chunks = model, batch_size, chunks
        self.head = model.get_output_embeddings()
        # offload: the model stays where it is, its outputs are computed on `compute_device`
        self.compute = None if compute_device is None else torch.device(compute_device)
        self.device = self.compute or next(model.parameters()).device
        self.digest = digest or _digest(model, chunks, batch_size, self.device)
        self.path = Path(cache_dir or models_dir() / "_cache" / "reference") / f"{self.digest}.pt"
        self.hidden: dict[int, torch.Tensor] = {}
        self.exact: bool | None = None  # unknown until the first forward compares head(input) with the logits
        if self.compute is not None:
            self.exact = _head_gives_the_logits_by_config(model)
        self.n_batches = (len(chunks) + batch_size - 1) // batch_size
        if self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved.get("digest") == self.digest:
                self.hidden, self.exact = dict(saved["hidden"]), True

    @contextmanager
    def scoring(self, model=None) -> Iterator["ReferenceOutputs"]:
        """Have the LM head on the compute device for the block. Offload: `model`'s own head where it holds the same
        weights (a variant keeps the unpruned LM head; LoRA does not wrap it), else the host's head visits."""
        from pruning_utils.model.arch import lm_head
        from pruning_utils.model.calibration import on_device

        if self.compute is None:
            yield self
        elif model is not None and _same_weights(self.head, lm_head(model)):
            self.head, own = lm_head(model), self.head
            try:
                yield self
            finally:
                self.head = own
        else:
            with on_device(self.head, self.compute):
                yield self

    def head_input(self, start: int, ids: torch.Tensor) -> torch.Tensor:
        """Return the LM head's input `[len(ids), seq, hidden]` of rows `start:start + len(ids)`: the cached one, else
        the decoder body's output (no logits computed), cached (`metrics.perplexity(logits_rows=)` applies the head
        a few rows at a time)."""
        if start not in self.hidden and self.compute is not None:
            self._walk(start)
        if start not in self.hidden or self.exact is False:
            from pruning_utils.model.arch import base_model

            with torch.inference_mode():
                body = base_model(self.model)(input_ids=ids.to(self.device), use_cache=False)
            if self.exact is False:  # logits post-processed after the head: nothing to cache
                return body.last_hidden_state
            self._keep(start, body.last_hidden_state)
        return self.hidden[start].to(self.device)

    def _walk(self, start: int) -> None:
        """Keep the head inputs of the batches of the layer walk (offload) that holds row `start`."""
        from pruning_utils.model.calibration import last_hidden, offload_group

        step = offload_group(self.batch_size)
        first = start // step * step
        with torch.inference_mode():
            hidden = last_hidden(self.model, self.chunks[first:first + step], self.batch_size, device=self.compute)
        for i, h in enumerate(hidden):
            self._keep(first + i * self.batch_size, h)

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


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, rows: int = 8192) -> bool:
    """Return whether two linear modules hold equal weights (and no bias), compared `rows` rows at a time wherever
    each one lives (no whole copy of a 150k-row matrix on either side)."""
    if getattr(a, "bias", None) is not None or getattr(b, "bias", None) is not None:
        return False
    wa, wb = a.weight, b.weight
    if wa.shape != wb.shape or wa.dtype != wb.dtype:
        return False
    with torch.no_grad():
        return all(torch.equal(wa[i:i + rows].to(wb.device), wb[i:i + rows]) for i in range(0, wa.shape[0], rows))


CHECK_TOKENS = 16  # tokens of the first row that `_head_gives_the_logits` compares


def _head_gives_the_logits_by_config(model) -> bool:
    """Return True for a model on the host whose logits are its LM head on the normed body output; raise for a family
    that post-processes them (soft-capped): its reference cannot come from a layer walk (a full forward on the host
    would take the CPU)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        raise ValueError(f"{type(model).__name__} soft-caps its logits after the LM head (final_logit_softcapping="
                         f"{cap}): its KL reference cannot be computed layer by layer from the host; keep the unpruned "
                         "model on the device (OFFLOAD='off') or leave the KL out (reference_model=None)")
    return True


_OPEN: dict[str, ReferenceOutputs] = {}


def reference_outputs(model, chunks: torch.Tensor, batch_size: int,
                      compute_device: torch.device | str | None = None) -> ReferenceOutputs:
    """Return the `ReferenceOutputs` of `model` on `chunks`, the same object for every call with the same weights,
    chunks, batch size and compute device (a model pruned in place since gets a new fingerprint, hence new outputs).
    `compute_device`: the model stays where it is (the host) and its outputs come from a layer walk there."""
    device = torch.device(compute_device) if compute_device is not None else next(model.parameters()).device
    digest = _digest(model, chunks, batch_size, device)
    if digest not in _OPEN:
        _OPEN.clear()  # one unpruned model and one set of chunks per stage: keep the memory of one
        _OPEN[digest] = ReferenceOutputs(model, chunks, batch_size, digest=digest, compute_device=compute_device)
    return _OPEN[digest]


def _digest(model, chunks: torch.Tensor, batch_size: int, device: torch.device) -> str:
    """Key of a model's outputs on `chunks`: its weights, the tokens, the batches and where they are computed."""
    param = next(model.parameters())
    tokens = hashlib.sha256(chunks.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
    fields = [model_fingerprint(model), tokens, tuple(chunks.shape), batch_size, torch.device(device).type,
              str(param.dtype), torch.__version__]
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:20]


def prepare(model, chunks: torch.Tensor, batch_size: int = 4, compute_device: torch.device | str | None = None,
            progress: bool = True) -> ReferenceOutputs:
    """Return `model`'s `ReferenceOutputs` on `chunks`; with `compute_device` (the unpruned model kept on the host)
    every batch is computed now, before anything else is on the device, so its layer walk has the device to itself
    (the plan of stages 04 / 06 counts it so). Without, the first KL computes them, as always. The same object
    serves every later KL on these chunks in batches of `batch_size`."""
    from pruning_utils.model.calibration import offload_group
    from pruning_utils.progress import progress as bar

    outputs = reference_outputs(model, chunks, batch_size, compute_device=compute_device)
    if outputs.compute is None:
        return outputs
    step = offload_group(batch_size)  # one walk covers several batches
    for start in bar(range(0, len(chunks), step), desc="unpruned model's outputs (layer walk)",
                     disable=not progress, leave=False):
        if start not in outputs.hidden:
            outputs.head_input(start, chunks[start:start + batch_size])
    return outputs
