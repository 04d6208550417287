"""Compression methods side by side (notebook 03b): depth pruning, low-rank, sparse + low-rank and torchao INT8,
each built at a parameter target (S3's non-embedding count), screened, saved and measured like every variant.

The methods themselves live in `depth`, `lowrank`, `hybrid` and `quantize`; this module only turns them into
named variants and tidy rows. Rows carry `VARIANT_COLUMNS` plus `COMPRESSION_COLUMNS`:
- method: depth | lowrank | hybrid | int8; base: the model it was cut from (baseline or a saved checkpoint);
- form: how it was made (e.g. `block_influence+refit`, `whiten`, `rmt`, `wanda2:4+r16` (sparse weight + residual
  SVD), `svd-wanda0.5` (the truncated SVD of the Wanda-pruned weight), `int8` (weight-only), `int8-dynamic`);
- saved: True when the variant is a checkpoint under models/ measured on the full evaluation chunks (with latency
  and memory), False for a screen row (SWEEP_EVAL_MAX_TOKENS perplexity only);
- nonzero_params_non_embedding: non-zero non-embedding weights (below params_non_embedding only for sparsity);
- applicable, note: False and the reason when a method cannot run here (INT8 without torchao, or off CPU / CUDA).

Provenance (`PROVENANCE_COLUMNS`): a saved variant carries its screen row's; an INT8 variant its source's (the
baseline row or the saved checkpoint's), `+int8` appended to the criterion. Depth pruning requests the fraction of
layers it removes as both rates (a removed layer takes all its heads and channels). `measure_kw` of the candidate
functions, `save_measured` and `int8_row` (source_model, fidelity_chunks, reference_model) go to `measure_variant`.
"""
from __future__ import annotations

import copy

from pruning_utils.compress import depth, lowrank, sparse_lowrank
from pruning_utils.compress.quantize import quantize_int8
from pruning_utils.measure.metrics import checkpoint_size_mb, count_params, nonzero_params_non_embedding
from pruning_utils.measure.variants import PROVENANCE_COLUMNS, VARIANT_COLUMNS, first_windows, measure_variant
from pruning_utils.measure.variants import provenance as variant_provenance
from pruning_utils.model.arch import PROJECTIONS, decoder_layers, proj
from pruning_utils.model.checkpoint import (
    PLAN_FILE,
    read_checkpoint_meta,
    record_extra,
    resolve_checkpoint_dir,
    save_pruned,
)
from pruning_utils.model.linears import NotApplicableError, check_int8_device, int8_applicable
from pruning_utils.model.surgery import apply_plan

INT8_NOTES = {"weight_only": "int8 weights (one scale per output row), fp32 activations",
              "dynamic": "int8 weights (one scale per output row), activations int8 per token at run time"}
COMPRESSION_COLUMNS = ["method", "base", "form", "saved", "nonzero_params_non_embedding", "applicable", "note"]


def baseline_sets(model, tokenizer, baseline: dict, *, seed: int, selfgen_kw: dict | None,
                  screen_tokens: int) -> tuple[dict, dict]:
    """Return `(screen, saved)` keywords of `measure_variant`: the fidelity set and held-out prose notebook 00
    measured the baseline on (rebuilt from the row's token counts, 256-token windows of 255 scored tokens; the
    fidelity samples are cached there), the screens' share the first windows up to `screen_tokens`."""
    from pruning_utils.data import sources
    from pruning_utils.data.heldout import heldout_chunks

    fidelity = sources.fidelity_chunks(model, tokenizer, n_tokens=int(baseline["fidelity_tokens"]) // 255 * 256,
                                       seed=seed, selfgen_kw=selfgen_kw)
    prose = heldout_chunks(tokenizer, n_tokens=int(baseline["heldout_tokens"]) // 255 * 256)
    screen = {"fidelity_chunks": first_windows(fidelity, screen_tokens),
              "heldout_chunks": first_windows(prose, screen_tokens)}
    return screen, {"fidelity_chunks": fidelity, "heldout_chunks": prose}


def target_params(name: str = "mix_pruned") -> int:
    """Return the non-embedding parameter count recorded in a saved checkpoint's metadata (S3: `mix_pruned`)."""
    extra = read_checkpoint_meta(name)["extra"]
    if "params_non_embedding" not in extra:
        raise KeyError(f"checkpoint '{name}' records no params_non_embedding; re-run the stage that wrote it")
    return int(extra["params_non_embedding"])


def _row(model, chunks, variant: str, method: str, base: str, form: str, reference: dict, **kw) -> dict:
    row = measure_variant(model, chunks, variant=variant, reference=reference, criterion=form, **kw)
    row.update(method=method, base=base, form=form, saved=False,
               nonzero_params_non_embedding=nonzero_params_non_embedding(model),
               applicable=True, note="")
    return row


def save_measured(model, tok, name: str, row: dict, chunks, *, reference: dict, latency_kw: dict | None,
                  memory_kw: dict | None, **measure_kw) -> dict:
    """Save `model` as checkpoint `name`, measure it on the full `chunks` (latency, memory in a fresh process,
    size on disk) and record the row, with the provenance of its screen `row`, in its plan file; returns the row."""
    folder = save_pruned(model, tok, name)
    provenance = variant_provenance(row)
    full = measure_variant(model, chunks, variant=name, reference=reference, latency_kw=latency_kw,
                           memory_kw=None if memory_kw is None else dict(spec=name, **memory_kw),
                           **{"criterion": row["form"], **provenance, **measure_kw})
    full.update({k: row[k] for k in COMPRESSION_COLUMNS}, saved=True, size_mb=round(checkpoint_size_mb(folder), 2))
    full["nonzero_params_non_embedding"] = row["nonzero_params_non_embedding"] - row["params_non_embedding"] + \
        full["params_non_embedding"]
    record_extra(folder, full)  # the measured row goes where notebook 06 reads it (the manifest follows)
    return full


def depth_candidates(model, windows, chunks, target: int, criteria: list[str], *, reference: dict, refit: bool = True,
                     semantic_windows: int = 2, batch_size: int = 4, **measure_kw):
    """Yield `(row, model)` screens of depth pruning at `target` per layer criterion, plain and with the refit."""
    n_layers = len(decoder_layers(model))
    for crit in criteria:
        kw = {"max_windows": semantic_windows} if crit == "semantic" else {}
        scores = depth.score_layers(model, windows, crit, batch_size, **kw)
        plan = depth.plan_layers(scores, target_non_embedding=target)
        removed = plan.provenance["removed_layers"]
        rate = len(removed) / n_layers
        for do_refit in ([False, True] if refit else [False]):
            pruned = copy.deepcopy(model)
            if do_refit:
                depth.refit_before_spans(pruned, removed, windows, batch_size)
            apply_plan(pruned, plan)
            form = f"{crit}+refit" if do_refit else crit
            row = _row(pruned, chunks, f"depth-{form}", "depth", "baseline", form, reference,
                       reconstruction="lstsq" if do_refit else "none", allocation="depth", head_rate_requested=rate,
                       mlp_rate_requested=rate, **measure_kw)
            row["note"] = f"removed layers {removed}"
            yield row, pruned


def lowrank_ratio(model, target: int, projections=PROJECTIONS) -> float:
    """Return the fraction of every chosen projection's weights the factors may keep so the model meets `target`."""
    lin = sum(proj(layer, n).weight.numel() for layer in decoder_layers(model) for n in projections)
    ratio = (target - (count_params(model)["non_embedding"] - lin)) / lin
    if not 0 < ratio <= 1:
        raise ValueError(f"target {target:,} cannot be met by factorising {', '.join(projections)} (ratio {ratio:.3f})")
    return ratio


def lowrank_candidates(model, windows, chunks, target: int, methods: list[str], *, reference: dict, rmt: bool = True,
                       batch_size: int = 4, **measure_kw):
    """Yield `(row, model)` screens of low-rank factorisation at `target` per method, and at the RMT rank (plain)."""
    ratio = lowrank_ratio(model, target)
    forms = [(m, dict(param_ratio=ratio, method=m)) for m in methods] + ([("rmt", dict(rank="rmt"))] if rmt else [])
    for form, kw in forms:
        low = copy.deepcopy(model)
        ranks = lowrank.lowrank_model(low, windows=windows, batch_size=batch_size, **kw)
        row = _row(low, chunks, f"lowrank-{form}", "lowrank", "baseline", form, reference, allocation="lowrank",
                   reconstruction="none", **measure_kw)
        row["note"] = f"ranks {min(ranks.values())}..{max(ranks.values())}"
        yield row, low


def hybrid_candidates(model, windows, chunks, sparsities: list[str], rank: int, *, reference: dict,
                      forms: list[str] = ("residual",), target: int | None = None, batch_size: int = 4,
                      **measure_kw):
    """Yield `(row, model)` screens of Wanda sparsity (a fraction or '2:4') per form of `sparse_lowrank.HYBRID_FORMS`:
    `residual` (a rank-`rank` residual SVD: `hybrid-wanda<sparsity>+r<rank>`) and `svd` (the pruned weight's
    truncated SVD at the low-rank method's ranks for `target`: `hybrid-svd-wanda<sparsity>`)."""
    forms = list(forms)
    unknown = [f for f in forms if f not in sparse_lowrank.HYBRID_FORMS]
    if unknown:
        raise ValueError(f"unknown hybrid form(s) {unknown}; known: {', '.join(sparse_lowrank.HYBRID_FORMS)}")
    if "svd" in forms and target is None:
        raise ValueError("hybrid form 'svd' meets a parameter target: give target= (compare.target_params)")
    values = [sp if sp == "2:4" else float(sp) for sp in sparsities]
    if len(set(values)) < len(values):
        raise ValueError(f"sparsities {list(sparsities)} repeat a value: each names one row")
    ratio = lowrank_ratio(model, target) if "svd" in forms else None
    for kind in forms:
        for sp, sparsity in zip(sparsities, values):
            kw = dict(rank=rank) if kind == "residual" else dict(param_ratio=ratio)
            hyb = copy.deepcopy(model)
            sparse_lowrank.hybrid_model(hyb, windows, sparsity=sparsity, batch_size=batch_size, form=kind, **kw)
            form = f"wanda{sp}+r{rank}" if kind == "residual" else f"svd-wanda{sp}"
            row = _row(hyb, chunks, f"hybrid-{form}", "hybrid", "baseline", form, reference, allocation="hybrid",
                       reconstruction="none", **measure_kw)
            if kind == "residual":
                row["note"] = "zeros stored densely: dense kernels run at full cost"
            else:
                ranks = [m["rank"] for m in replaced_modules_of(hyb).values()]
                row["note"] = f"Wanda mask, then a truncated SVD of the pruned weight: ranks {min(ranks)}..{max(ranks)}"
            yield row, hyb
            del hyb  # with a consumer keeping only the best (`screen`), one candidate beside it while the next is built


def int8_row(base_name: str, device, chunks, *, reference: dict, model=None, tok=None, latency_kw=None,
             memory_kw=None, mode: str = "weight_only", smooth_windows=None, smooth_alpha: float | None = None,
             keep_fp32=(), embedding: bool = True, **measure_kw) -> dict:
    """Return the measured row of `<base>_int8` (saved under models/, measured on `device`), or a not-applicable row
    where torchao INT8 cannot run.

    The row carries the provenance of its source: `reference` for the baseline, else the checkpoint's recorded row.

    `mode` (weight_only | dynamic), `embedding`, `smooth_windows` / `smooth_alpha` / `keep_fp32`: see
    `quantize.quantize_int8` (benchmarks/int8_torchao.py measures what each buys).
    """
    from pruning_utils.model.checkpoint import load_pruned

    name = f"{base_name}_int8"
    try:
        check_int8_device(device)
    except NotApplicableError as err:
        return dict(variant=name, method="int8", base=base_name, form="int8", saved=False, applicable=False,
                    note=str(err))
    if model is None:
        # on CUDA in the device's dtype (activations stay fp16 / bf16 there), on CPU in fp32
        model, tok = load_pruned(base_name, device=str(device))
    q = quantize_int8(model, mode=mode, smooth_windows=smooth_windows, smooth_alpha=smooth_alpha,
                      keep_fp32=keep_fp32, embedding=embedding, progress=False).to(device)
    params = count_params(q)["non_embedding"]
    how = [f"smoothed (alpha {q.int8_smoothing})"] if q.int8_smoothing is not None else []
    how += [f"{', '.join(keep_fp32)} kept fp32"] if keep_fp32 else []
    form = "int8" if mode == "weight_only" else f"int8-{mode}"
    source = reference if base_name == "baseline" else read_checkpoint_meta(base_name)["extra"]
    provenance = {k: source[k] for k in PROVENANCE_COLUMNS if k in source and not _missing(source[k])}
    provenance["criterion"] = "+".join([str(provenance["criterion"]), form]) if provenance.get("criterion") else form
    row = dict(method="int8", base=base_name, form=form, saved=True, nonzero_params_non_embedding=params,
               params_non_embedding=params, applicable=True, **provenance,
               note=f"torchao {INT8_NOTES[mode]}" + ("; embedding table int8" if embedding else "")
                    + (f"; {'; '.join(how)}" if how else ""))
    return save_measured(q, tok, name, row, chunks, reference=reference, latency_kw=latency_kw, memory_kw=memory_kw,
                         **measure_kw)


def _missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and value != value)  # NaN: an empty CSV cell


def best(rows_models: list[tuple[dict, object]]) -> tuple[dict, object]:
    """Return the `(row, model)` of lowest perplexity."""
    return min(rows_models, key=lambda rm: rm[0]["ppl"])


def screen(candidates) -> tuple[list[dict], tuple[dict, object]]:
    """Return the rows of `(row, model)` candidates and the `(row, model)` of lowest perplexity (as `best`), holding
    no model but the best one and the newest while the candidates are built."""
    rows, top = [], None
    for row, cand in candidates:
        rows.append(row)
        if top is None or row["ppl"] < top[0]["ppl"]:
            top = (row, cand)
        del cand
    if top is None:
        raise ValueError("no candidates to screen: give at least one sparsity and form")
    return rows, top


def available_variants(names: list[str], device) -> list[str]:
    """Return `names` without the INT8 variants when `device` cannot run them (notebook 03b wrote n/a rows instead)."""
    from pruning_utils.model.devices import resolve_device

    device = resolve_device(device)
    if int8_applicable(device):
        return list(names)
    dropped = [n for n in names if n.endswith("_int8")]
    if dropped:
        print(f"not measured on {device}: {', '.join(dropped)} (torchao INT8 runs on CPU and CUDA, with torchao)")
    return [n for n in names if n not in dropped]


def exists(name: str) -> bool:
    """Return True when checkpoint `name` exists under models/."""
    return (resolve_checkpoint_dir(name) / PLAN_FILE).is_file()


def table(rows: list[dict]):
    """Return the rows as the tidy `compression_methods.csv` table:
    variant, `COMPRESSION_COLUMNS`, `VARIANT_COLUMNS`."""
    import pandas as pd

    cols = ["variant"] + COMPRESSION_COLUMNS + [c for c in VARIANT_COLUMNS if c not in ("variant",)]
    return pd.DataFrame(rows).reindex(columns=cols)


def replaced_modules_of(model) -> dict[str, dict]:
    """Return the factorised projections of a model (`checkpoint.replaced_modules`)."""
    from pruning_utils.model.checkpoint import replaced_modules

    return replaced_modules(model)
