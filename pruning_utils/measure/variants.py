"""Build and measure model variants the same way in every stage: one tidy row per variant.

Columns of a variant row (every ablation CSV uses them):
- variant, source_model, criterion, allocation, reconstruction: what the variant is and how it was made.
- head_rate_requested, mlp_rate_requested: the rates asked of the planner (its input, not the result).
- head_frac_removed, mlp_frac_removed: what the weights show: 1 - kept query heads (MLP channels) / those of
  the source model, summed over all its layers. Rounding per KV group makes them differ from the request:
  head rate 0.2 on 9 heads in 3 KV groups removes 3 of 9 (0.333). Plot against these.
- query_heads, kv_heads, intermediate (compact per-layer shapes, `compact_shape`), layers.
- params_total, params_non_embedding, reduction_pct (non-embedding, vs the reference), flops_per_token,
  flops_reduction_pct, size_mb (weights as a checkpoint stores them).
- ppl, ppl_change_pct, ppl_reference, eval_tokens: perplexity on the evaluation text (the calibration domain's
  held-out part); the change is against `ppl_reference`, '<variant>@<eval_tokens>' of the reference row (a 2k-token
  screen and the full text have different baselines), the row itself without a reference.
- fidelity_ppl, fidelity_change_pct, fidelity_reference, fidelity_tokens: perplexity on held-out text sampled from
  the unpruned model (`data.fidelity_chunks`), its cross-entropy against the original's own distribution:
  domain-neutral; the change is against `fidelity_reference` ('<variant>@<fidelity_tokens>', empty without one).
- heldout_ppl, heldout_change_pct, heldout_reference, heldout_tokens: perplexity on general English prose no stage
  calibrates, searches or selects on (`data.heldout`: State of the Union addresses), NaN / 0 without it.
- kl_to_baseline: mean per-token KL(unpruned || variant) on the evaluation windows (NaN without a reference model).
- prefill_ms, prefill_ms_iqr, decode_tok_s, latency_noisy (`metrics.latency`; NaN / empty without `latency_kw`).
  A row with latency_noisy True was timed while the CPU was busy or the repeats disagreed. load_avg: the 1-minute
  load average while timing (the highest seen), else when the row was measured.
- peak_memory_mb (NaN without `memory_kw`): this model's own memory, weights + the peak extra memory of one
  prefill forward, measured alone (`metrics.variant_peak_memory_mb`; on CPU in a fresh process), so a model
  that keeps fewer weights shows less whatever else the notebook holds.
- device, dtype, commit: where and at which commit of this repository the row was measured.

Screen rows (`screens`, `neuronrank_screens`) add:
- criterion_options: the settings the criterion's scores were computed with, from their provenance
  (`importance.criterion_options`: 'alpha=1,beta=1,gamma=1.5,idf=smooth' for tfidf, ',topics=8' more for
  tfidf_topic; empty for criteria without settings), then what else the row's removal was told: 'last=N' (only the
  MLPs of the last N decoder layers pruned, NeuronRank's pruning_last), 'lm_head=R' (rows of the output matrix
  removed instead of neurons). Part of `SWEEP_KEY`.
- LM-head rows (`lm_head_sweep`) also: lm_head_rate_requested, vocab_kept (rows the output matrix keeps),
  lm_head_unreachable_pct (share of the row's evaluation targets whose row was removed: with any, `ppl` is inf),
  reference_decode_tok_s (the unpruned model's decode speed, timed in the same run just before) and
  decode_change_pct against it (decode_reference names it).
"""
from __future__ import annotations

import copy
import math

import torch

from pruning_utils.measure.metrics import (
    count_params,
    device_name,
    flops_per_token,
    git_commit,
    latency,
    load_avg,
    perplexity,
    variant_peak_memory_mb,
)
from pruning_utils.model.arch import layer_shapes
from pruning_utils.progress import progress as bar

VARIANT_COLUMNS = [
    "variant", "source_model", "criterion", "allocation", "reconstruction", "head_rate_requested",
    "mlp_rate_requested", "head_frac_removed", "mlp_frac_removed", "query_heads", "kv_heads", "intermediate",
    "layers", "params_total", "params_non_embedding", "reduction_pct", "flops_per_token", "flops_reduction_pct",
    "size_mb", "ppl", "ppl_change_pct", "ppl_reference", "eval_tokens", "fidelity_ppl", "fidelity_change_pct",
    "fidelity_reference", "fidelity_tokens", "heldout_ppl", "heldout_change_pct", "heldout_reference",
    "heldout_tokens", "kl_to_baseline", "prefill_ms", "prefill_ms_iqr", "decode_tok_s",
    "load_avg", "latency_noisy", "peak_memory_mb", "device", "dtype", "commit",
]
# how a variant was made: what a later stage copies from the row of the model it starts from
PROVENANCE_COLUMNS = ("criterion", "allocation", "reconstruction", "head_rate_requested", "mlp_rate_requested")
# one configuration measured on one evaluation text: a sweep table holds it once
SWEEP_KEY = ("criterion", "allocation", "reconstruction", "head_rate_requested", "mlp_rate_requested", "eval_tokens",
             "criterion_options")


def compact_shape(values: list[int]) -> str:
    """Return a run-length text of per-layer sizes: '9x30' when all 30 are 9, else e.g. '9x10,6x20'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ",".join(f"{v}x{n}" for v, n in runs)


def expand_shape(text: str) -> list[int]:
    """Return the per-layer sizes of a `compact_shape` text: '9x2,6x1' -> [9, 9, 6]."""
    try:
        return [int(v) for run in str(text).split(",") if run for v, n in [run.split("x")] for _ in range(int(n))]
    except ValueError as err:
        raise ValueError(f"'{text}' is not a compact shape such as '9x10,6x20' "
                         "(size x layers, comma-separated)") from err


def weight_size_mb(model) -> float:
    """Return the size of the model's weights in MiB as a checkpoint stores them (tied tensors once)."""
    from pruning_utils.measure.metrics import tensor_bytes

    return sum(tensor_bytes(p) for p in model.parameters()) / 2**20


def removed_fractions(model, reference: dict | None = None) -> tuple[float, float]:
    """Return `(head_frac_removed, mlp_frac_removed)`: 1 - kept query heads / MLP channels over the source's,
    all layers.

    The source shapes come from the cumulative `model.pruning_plan` (its `base_heads`, `base_intermediate`),
    else from the `reference` row's `query_heads` / `intermediate`; with neither, the model is its own source.
    """
    shapes = layer_shapes(model)
    plan = getattr(model, "pruning_plan", None)
    if plan is not None:
        base_heads, base_mlp = sum(plan.base_heads), sum(plan.base_intermediate)
    elif reference is not None and reference.get("query_heads") and reference.get("intermediate"):
        base_heads, base_mlp = sum(expand_shape(reference["query_heads"])), sum(expand_shape(reference["intermediate"]))
    else:
        return 0.0, 0.0
    return 1 - sum(s.n_heads for s in shapes) / base_heads, 1 - sum(s.intermediate for s in shapes) / base_mlp


def measure_variant(model, chunks: torch.Tensor, *, variant: str, source_model: str = "", reference: dict | None = None,
                    criterion: str = "", allocation: str = "", reconstruction: str = "",
                    head_rate_requested: float = 0.0, mlp_rate_requested: float = 0.0, latency_kw: dict | None = None,
                    memory_kw: dict | None = None, batch_size: int = 4, flops_seq_len: int = 512,
                    known: dict | None = None, compute_device: str | None = None,
                    fidelity_chunks: torch.Tensor | None = None, reference_model=None,
                    logits_rows: int | None = None, heldout_chunks: torch.Tensor | None = None,
                    reference_device: str | None = None) -> dict:
    """Return a variant row (columns in the module docstring): shapes, size and cost, perplexity on `chunks`,
    latency unless `latency_kw` is None, own peak memory unless `memory_kw` is None.

    `reference` is the row of the model this variant was cut from; reductions and changes are relative to it.
    `known` is a row measured earlier on the same chunks: its perplexity is reused (it is deterministic) when its
    token count matches `chunks`, instead of another full pass. `memory_kw` goes to
    `metrics.variant_peak_memory_mb` (e.g. `spec=` the checkpoint name, so a CPU child loads it directly).
    `compute_device` (offload mode): perplexity runs one decoder layer at a time there.
    `fidelity_chunks` (held-out samples of the unpruned model) give `fidelity_ppl`, `heldout_chunks` (general English,
    `data.heldout.heldout_chunks`) `heldout_ppl`; `reference_model` (the
    unpruned model) gives `kl_to_baseline` on `chunks`, in the same pass as the perplexity (not in offload mode);
    `reference_device` (`StageSettings.reference_compute`): that model stays on the host and its outputs come from a
    layer walk on this device.
    `logits_rows` (`StageSettings.logits_rows`): the LM heads run that many token rows at a time (`perplexity`).
    """
    shapes = layer_shapes(model)
    params = count_params(model)
    flops = flops_per_token(model, flops_seq_len)
    predicted = chunks.shape[0] * (chunks.shape[1] - 1)
    if compute_device is not None:
        reference_model = None  # offload mode holds one model: no second one to compare with
    is_reference = reference_model is None or reference_model is model
    if reuses_perplexity(known, predicted, needs_kl=not is_reference):
        ppl = {"ppl": float(known["ppl"]), "tokens": predicted, "kl": known.get("kl_to_baseline")}
    else:
        ppl = perplexity(model, chunks, batch_size=batch_size, desc=f"ppl {variant}", device=compute_device,
                         reference=reference_model, logits_rows=logits_rows,  # itself: outputs kept for its variants
                         reference_device=None if is_reference else reference_device)
    kl = 0.0 if reference_model is model else ppl.get("kl", float("nan"))
    side = dict(known=known, batch_size=batch_size, device=compute_device, logits_rows=logits_rows, variant=variant)
    fidelity = _side_perplexity(model, fidelity_chunks, "fidelity", **side)
    heldout = _side_perplexity(model, heldout_chunks, "heldout", **side)
    param = next(model.parameters())
    head_frac, mlp_frac = removed_fractions(model, reference)
    own_reference = f"{variant}@{ppl['tokens']}"
    row = dict(
        variant=variant, source_model=source_model, criterion=criterion, allocation=allocation,
        reconstruction=reconstruction, head_rate_requested=head_rate_requested, mlp_rate_requested=mlp_rate_requested,
        head_frac_removed=head_frac, mlp_frac_removed=mlp_frac, query_heads=compact_shape([s.n_heads for s in shapes]),
        kv_heads=compact_shape([s.n_kv_heads for s in shapes]),
        intermediate=compact_shape([s.intermediate for s in shapes]), layers=len(shapes),
        params_total=params["total"], params_non_embedding=params["non_embedding"], reduction_pct=0.0,
        flops_per_token=flops, flops_reduction_pct=0.0, size_mb=round(weight_size_mb(model), 2),
        ppl=ppl["ppl"], ppl_change_pct=0.0, ppl_reference=own_reference, eval_tokens=ppl["tokens"],
        fidelity_ppl=fidelity["ppl"], fidelity_change_pct=float("nan"), fidelity_reference="",
        fidelity_tokens=fidelity["tokens"], heldout_ppl=heldout["ppl"], heldout_change_pct=float("nan"),
        heldout_reference="", heldout_tokens=heldout["tokens"],
        kl_to_baseline=float("nan") if kl is None else float(kl),
        prefill_ms=float("nan"), prefill_ms_iqr=float("nan"), decode_tok_s=float("nan"), load_avg=load_avg(),
        latency_noisy=None, peak_memory_mb=float("nan"), device=device_name(param.device),
        dtype=str(param.dtype).replace("torch.", ""), commit=git_commit(),
    )
    if reference is not None:
        name = reference.get("variant") or "reference"
        row["reduction_pct"] = 100 * (1 - params["non_embedding"] / reference["params_non_embedding"])
        row["flops_reduction_pct"] = 100 * (1 - flops / reference["flops_per_token"])
        row["ppl_change_pct"] = 100 * (ppl["ppl"] / reference["ppl"] - 1)
        row["ppl_reference"] = f"{name}@{_tokens(reference.get('eval_tokens'))}"
        for kind, measured in (("fidelity", fidelity), ("heldout", heldout)):
            if _finite(reference.get(f"{kind}_ppl")) and _finite(measured["ppl"]):
                row[f"{kind}_change_pct"] = 100 * (measured["ppl"] / float(reference[f"{kind}_ppl"]) - 1)
                row[f"{kind}_reference"] = f"{name}@{_tokens(reference.get(f'{kind}_tokens'))}"
    if latency_kw is not None:
        lat = latency(model, **latency_kw)
        row.update(prefill_ms=lat["prefill_ms_median"], prefill_ms_iqr=lat["prefill_ms_iqr"],
                   decode_tok_s=lat.get("decode_tok_s_median", float("nan")), load_avg=lat["load_avg"],
                   latency_noisy=lat["latency_noisy"])
    if memory_kw is not None:
        row["peak_memory_mb"] = variant_peak_memory_mb(model, **memory_kw)["peak_memory_mb"]
    return row


def first_windows(chunks: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Return the first windows of `chunks` [n, seq_len] holding at most `max_tokens` tokens (one at least): the
    short sets a screen is measured on."""
    return chunks[:max(1, max_tokens // chunks.shape[1])]


def provenance(row: dict) -> dict:
    """Return how a variant was made (`PROVENANCE_COLUMNS` that `row` has): what a variant derived from it copies."""
    return {k: row[k] for k in PROVENANCE_COLUMNS if k in row}


def reuses_perplexity(known: dict | None, predicted: int, needs_kl: bool) -> bool:
    """Return whether `measure_variant` reuses the perplexity (and KL, when `needs_kl`) of row `known`, measured
    earlier on `predicted` scored tokens, instead of another pass."""
    return (known is not None and known.get("eval_tokens") == predicted and known.get("ppl") is not None
            and (not needs_kl or _finite(known.get("kl_to_baseline"))))


def _side_perplexity(model, chunks: torch.Tensor | None, kind: str, *, known: dict | None, variant: str,
                     **kw) -> dict:
    """Return `{ppl, tokens}` of `model` on a second text (`kind`: fidelity | heldout), reused from `known` when it
    was measured on as many tokens; NaN / 0 without the text."""
    if chunks is None:
        return {"ppl": float("nan"), "tokens": 0}
    tokens = chunks.shape[0] * (chunks.shape[1] - 1)
    if known is not None and known.get(f"{kind}_tokens") == tokens and _finite(known.get(f"{kind}_ppl")):
        return {"ppl": float(known[f"{kind}_ppl"]), "tokens": tokens}
    return perplexity(model, chunks, desc=f"{kind} {variant}", **kw)


def _tokens(value) -> str:
    return str(int(value)) if _finite(value) else "?"


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def prune_in_place(model, plan, windows: torch.Tensor | None = None, reconstruction: str = "none", **recon_kw):
    """Return `model` pruned in place by `plan`, reconstructing weights when asked (see `reconstruction`)."""
    from pruning_utils.model.surgery import apply_plan

    if reconstruction in (None, "", "none"):
        return apply_plan(model, plan)
    from pruning_utils.prune.reconstruction import prune_and_reconstruct

    if windows is None:
        raise ValueError(f"reconstruction '{reconstruction}' needs calibration windows; pass windows=...")
    return prune_and_reconstruct(model, plan, windows, mode=reconstruction, **recon_kw)


def pruned_copy(model, plan, windows: torch.Tensor | None = None, reconstruction: str = "none", **recon_kw):
    """Return a pruned deep copy of `model` (the original stays intact), reconstructing weights when asked."""
    if isinstance(model, Unpruned):
        return model.variant(plan, windows, reconstruction, **recon_kw)
    return prune_in_place(copy.deepcopy(model), plan, windows, reconstruction, **recon_kw)


BUILDS = ("copy", "reload")


class Unpruned:
    """The unpruned model a stage cuts its variants from, and how: 'copy' deep-copies it beside the original;
    'reload' prunes the model itself in place and reloads it from its checkpoint when it is next needed, so one
    model is in memory at a time (a reload per variant instead of a second copy).

    `model` is the unpruned model, loaded on first use; `variant(plan, ...)` returns a pruned model.
    """

    def __init__(self, spec: str | None = None, device: str | None = None, dtype=None, build: str = "copy",
                 model=None, tokenizer=None):
        if build not in BUILDS:
            raise ValueError(f"unknown variant build '{build}'; known: {', '.join(BUILDS)}")
        if build == "reload" and spec is None:
            raise ValueError("build='reload' needs the spec the unpruned model is reloaded from (spec=MODEL)")
        self.spec, self.device, self.dtype, self.build = spec, device, dtype, build
        self._model, self._tokenizer = model, tokenizer
        self.reloads = 0

    @property
    def tokenizer(self):
        """Return the tokenizer loaded with the model (loading the model when it has not been yet)."""
        if self._tokenizer is None and self.spec is not None:
            self.model  # noqa: B018  (loads both)
        return self._tokenizer

    @property
    def model(self):
        """Return the unpruned model, reloading it when the last variant was pruned from it in place."""
        if self._model is None:
            from pruning_utils.model.loading import load_model

            self._model, tok = load_model(self.spec, device=self.device, dtype=self.dtype)
            self._tokenizer = self._tokenizer or tok
            self.reloads += 1
        return self._model

    def variant(self, plan, windows: torch.Tensor | None = None, reconstruction: str = "none", **recon_kw):
        """Return the unpruned model pruned by `plan`: a deep copy ('copy') or the model itself ('reload')."""
        if self.build == "copy":
            return prune_in_place(copy.deepcopy(self.model), plan, windows, reconstruction, **recon_kw)
        model, self._model = self.model, None  # handed over: the next use reloads the checkpoint
        return prune_in_place(model, plan, windows, reconstruction, **recon_kw)


def _source(model) -> "Unpruned":
    return model if isinstance(model, Unpruned) else Unpruned(model=model)


# what each kind of sweep prunes: the planner, the rate column of the row and the variant-name prefix
_SWEEP_KINDS = {"heads": ("plan_heads", "head_rate_requested", "heads"),
                "neurons": ("plan_neurons", "mlp_rate_requested", "mlp")}


def criteria_sweep(model, scores: dict, criteria: list[str], rates: list[float], kind: str, chunks: torch.Tensor, *,
                   allocation: str = "uniform", reference: dict | None = None, source_model: str = "",
                   progress: bool = True, compute_device: str | None = None,
                   fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
                   heldout_chunks: torch.Tensor | None = None) -> list[dict]:
    """Return one variant row per criterion x rate: `kind` ('heads' | 'neurons') removed plainly, no refit.

    Every variant is cut from `model` (a model, left intact, or an `Unpruned` source) and measured on `chunks`
    with `measure_variant` (offload mode: `compute_device`).
    """
    from pruning_utils.prune import allocation as alloc

    if kind not in _SWEEP_KINDS:
        raise ValueError(f"unknown sweep kind '{kind}'; known: {', '.join(_SWEEP_KINDS)}")
    missing = [c for c in criteria if c not in scores]
    if missing:
        raise KeyError(f"no scores for {missing}; known: {', '.join(scores)}. Compute them in notebook 00 first")
    from pruning_utils.prune.importance import criterion_options

    planner, rate_col, prefix = _SWEEP_KINDS[kind]
    if allocation == "search":  # a search per criterion and rate would cost minutes each: screens are uniform
        allocation = "uniform"
    source = _source(model)
    rows = []
    for crit, rate in bar([(c, r) for c in criteria for r in rates], desc=f"{kind} sweep", disable=not progress):
        plan = getattr(alloc, planner)(source.model, scores[crit], rate, allocation=allocation)
        pruned = source.variant(plan)
        rows.append(measure_variant(pruned, chunks, variant=f"{prefix}-{crit}-{rate}", source_model=source_model,
                                    reference=reference, criterion=crit, allocation=allocation,
                                    reconstruction="none", compute_device=compute_device,
                                    fidelity_chunks=fidelity_chunks, heldout_chunks=heldout_chunks,
                                    logits_rows=logits_rows, **{rate_col: rate}))
        rows[-1]["criterion_options"] = criterion_options(scores[crit])
        del pruned
    return rows


def reconstruction_sweep(model, plan, windows: torch.Tensor, modes: list[str], chunks: torch.Tensor, *,
                         criterion: str, rate: float, kind: str, allocation: str = "uniform",
                         reference: dict | None = None, source_model: str = "", stats: dict | None = None,
                         sequential: bool = False, compute_device: str | None = None,
                         fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
                         heldout_chunks: torch.Tensor | None = None, criterion_options: str | None = None,
                         **recon_kw) -> list[dict]:
    """Return one variant row per reconstruction mode for one plan, measured on `chunks` (with a
    `criterion_options` column when given: `screens` gives its criteria rows' value, so the 'none' row matches).

    `model` is a model or an `Unpruned` source. `stats` (one-shot Grams of `model` from
    `reconstruction.collect_grams`) lets every mode share one calibration pass; without them a one-shot refit
    streams its own, one layer at a time; sequential refits take their own statistics. `compute_device`
    (offload mode) is where each layer runs in the refits and the perplexity; `recon_kw` go to
    `reconstruction.prune_and_reconstruct`.
    """
    if kind not in _SWEEP_KINDS:
        raise ValueError(f"unknown sweep kind '{kind}'; known: {', '.join(_SWEEP_KINDS)}")
    _, rate_col, prefix = _SWEEP_KINDS[kind]
    source = _source(model)
    rows = []
    for mode in modes:
        kw = {} if mode == "none" else dict(sequential=sequential, stats=None if sequential else stats,
                                            device=compute_device, **recon_kw)
        pruned = source.variant(plan, windows, reconstruction=mode, **kw)
        rows.append(measure_variant(pruned, chunks, variant=f"{prefix}-{criterion}-{rate}-{mode}",
                                    source_model=source_model, reference=reference, criterion=criterion,
                                    allocation=allocation, reconstruction=mode, compute_device=compute_device,
                                    fidelity_chunks=fidelity_chunks, heldout_chunks=heldout_chunks,
                                    logits_rows=logits_rows, **{rate_col: rate}))
        if criterion_options is not None:
            rows[-1]["criterion_options"] = criterion_options
        del pruned
    return rows


def screens(model, scores: dict, kind: str, criteria: list[str], rates: list[float], plan, windows: torch.Tensor,
            modes: list[str], chunks: torch.Tensor, *, criterion: str, rate: float, source_model: str = "",
            allocation: str = "uniform", stats: dict | None = None, compute_device: str | None = None,
            fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
            heldout_chunks: torch.Tensor | None = None, **recon_kw) -> tuple[dict, list[dict], list[dict]]:
    """Return `(reference, criteria_rows, reconstruction_rows)`: the screens of notebooks 02 and 03 on the short
    `chunks` — the unpruned model's row, every criterion x rate removed plainly (`criteria_sweep`), then `plan` (the
    main criterion at the main rate) under every reconstruction mode (`reconstruction_sweep`, sharing `stats`)."""
    source = _source(model)
    measure = dict(source_model=source_model, compute_device=compute_device, fidelity_chunks=fidelity_chunks,
                   heldout_chunks=heldout_chunks, logits_rows=logits_rows)
    reference = measure_variant(source.model, chunks, variant="baseline", **measure)
    criteria_rows = criteria_sweep(source, scores, criteria, rates, kind, chunks, allocation=allocation,
                                   reference=reference, **measure)
    from pruning_utils.prune.importance import criterion_options

    options = criterion_options(scores[criterion]) if criterion in scores else ""
    recon_rows = reconstruction_sweep(source, plan, windows, modes, chunks, criterion=criterion, rate=rate, kind=kind,
                                      allocation=allocation, reference=reference, stats=stats,
                                      criterion_options=options, **measure, **recon_kw)
    return reference, criteria_rows, recon_rows


def pruning_last_sweep(model, scores: dict, criterion: str, rate: float, lasts: list[int], chunks: torch.Tensor, *,
                       reference: dict | None = None, source_model: str = "", compute_device: str | None = None,
                       fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
                       heldout_chunks: torch.Tensor | None = None) -> list[dict]:
    """Return one row per N of `lasts` (NeuronRank's pruning_last): `rate` of the MLP neurons of each of the last N
    decoder layers removed by `criterion`, plainly (no refit), the earlier layers untouched; variant
    'mlp-<criterion>-last<N>-<rate>'. Raises ValueError for an N outside 1..(decoder layers)."""
    from pruning_utils.prune import allocation as alloc
    from pruning_utils.prune.importance import criterion_options

    source = _source(model)
    n_layers = len(layer_shapes(source.model))
    bad = [n for n in lasts if not 1 <= int(n) <= n_layers]
    if bad:
        raise ValueError(f"pruning_last {bad} outside the model's 1..{n_layers} decoder layers; set MLP_PRUNING_LAST "
                         f"to layer counts from 1 to {n_layers}, comma-separated ('' for no such rows)")
    if lasts and criterion not in scores:
        raise KeyError(f"no scores for '{criterion}'; known: {', '.join(scores)}. Compute them in notebook 00 first")
    rows = []
    for n in lasts:
        plan = alloc.plan_neurons(source.model, scores[criterion], rate, allocation="uniform", only_last=int(n))
        pruned = source.variant(plan)
        rows.append(measure_variant(pruned, chunks, variant=f"mlp-{criterion}-last{n}-{rate}",
                                    source_model=source_model, reference=reference, criterion=criterion,
                                    allocation="uniform", reconstruction="none", mlp_rate_requested=rate,
                                    compute_device=compute_device, fidelity_chunks=fidelity_chunks,
                                    heldout_chunks=heldout_chunks, logits_rows=logits_rows))
        rows[-1]["criterion_options"] = ",".join(x for x in (criterion_options(scores[criterion]), f"last={n}") if x)
        del pruned
    return rows


def lm_head_sweep(model, rates: list[float], chunks: torch.Tensor, *, reference: dict | None = None,
                  latency_kw: dict | None = None, source_model: str = "", compute_device: str | None = None,
                  fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
                  heldout_chunks: torch.Tensor | None = None) -> list[dict]:
    """Return one row per rate (NeuronRank's LM-head pruning, `prune.lm_head`): that fraction of the output matrix's
    rows removed by the magnitude rule (smallest L2 norm), variant 'lm-head-magnitude-<rate>', with the LM-head
    columns of the module docstring. With `latency_kw` the unpruned model is timed first, then each row (not in
    offload mode: its model is on the host, so a timing would not say how the device decodes)."""
    from pruning_utils.model.plan import PruningPlan
    from pruning_utils.prune.lm_head import plan_lm_head, prune_lm_head, unreachable_fraction

    source = _source(model)
    timed = latency_kw is not None and compute_device is None and bool(rates)
    base_decode = latency(source.model, **latency_kw).get("decode_tok_s_median", float("nan")) if timed else None
    rows = []
    for rate in rates:
        plan = plan_lm_head(source.model, rate)
        pruned = prune_lm_head(source.variant(PruningPlan.identity(layer_shapes(source.model))), plan)
        row = measure_variant(pruned, chunks, variant=f"lm-head-magnitude-{rate}", source_model=source_model,
                              reference=reference, criterion="magnitude", allocation="", reconstruction="none",
                              latency_kw=latency_kw if timed else None, compute_device=compute_device,
                              fidelity_chunks=fidelity_chunks, heldout_chunks=heldout_chunks, logits_rows=logits_rows)
        row.update(criterion_options=f"lm_head={rate:g}", lm_head_rate_requested=rate, vocab_kept=len(plan.kept),
                   lm_head_unreachable_pct=100 * unreachable_fraction(plan, chunks))
        if timed:
            row.update(reference_decode_tok_s=base_decode,
                       decode_change_pct=100 * (row["decode_tok_s"] / base_decode - 1),
                       decode_reference="baseline, timed in the same run")
        rows.append(row)
        del pruned
    return rows


def neuronrank_screens(model, scores: dict, chunks: torch.Tensor, *, criterion: str, rate: float,
                       pruning_last: list[int], lm_head_rates: list[float], reference: dict | None = None,
                       latency_kw: dict | None = None, source_model: str = "", compute_device: str | None = None,
                       fidelity_chunks: torch.Tensor | None = None, logits_rows: int | None = None,
                       heldout_chunks: torch.Tensor | None = None, allocation: str = "uniform",
                       **refit_kw) -> list[dict]:
    """Return the NeuronRank option rows of notebook 03's screens: `pruning_last_sweep` then `lm_head_sweep`, on the
    same short `chunks` and against the same `reference` row as `screens`. They remove plainly with uniform counts,
    so `allocation` and the refit settings (`refit_kw`) that the notebooks' screen settings carry are not used."""
    measure = dict(reference=reference, source_model=source_model, compute_device=compute_device,
                   fidelity_chunks=fidelity_chunks, heldout_chunks=heldout_chunks, logits_rows=logits_rows)
    return (pruning_last_sweep(model, scores, criterion, rate, pruning_last, chunks, **measure)
            + lm_head_sweep(model, lm_head_rates, chunks, latency_kw=latency_kw, **measure))
