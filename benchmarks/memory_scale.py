"""Peak memory of each pipeline operation on CPU (fp32) for random Llama-family models of growing size, against
`memory_plan.plan_operation`'s estimate, and what a straight-line fit in parameters says for 3B / 8B models on a T4.

Every (size, operation) is measured in a fresh spawned process: peak RSS (VmHWM, reset before the operation)
minus the RSS of the process before the model was built, so the figure is weights + what the operation needs
held (e.g. the Grams a refit reads) + its working memory, and nothing an earlier measurement left behind.
Writes results/benchmarks/memory_scale.json.   Usage: python3 -m benchmarks.memory_scale [--sizes 135m,360m]
"""
import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pruning_utils.pipeline import memory_plan

MB = 2 ** 20
BASE = dict(model_type="llama", vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = {  # SmolLM2-135M / -360M-like, then ~0.7B and ~1.1B (TinyLlama-like widths at 24 layers)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, head_dim=64),
    "0.7b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=96),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64),
}
# operation measured -> the plan operation estimating it
STAGES = {"load": "load", "perplexity": "perplexity", "importance_forward": "importance_forward", "taylor": "taylor",
          "grams": "grams", "prune_refit": "prune_refit", "lora_step": "lora_step"}
TARGETS = {  # extrapolation targets (real configs; the fit itself knows only parameter counts)
    "Qwen2.5-3B": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False),
}
T4_BUDGET_GB = 14.0  # a 16 GB T4 leaves ~15 GiB free; 1 GiB kept for the CUDA context and fragmentation


def plan_params(n_windows: int, seq_len: int) -> dict:
    """Return the plan parameters matching what `measure` runs (fp32 on CPU, one batch of all windows)."""
    return dict(device="cpu", dtype="float32", n_calib=n_windows, calib_batch=n_windows, calib_seq_len=seq_len,
                eval_batch=n_windows, eval_seq_len=seq_len, criteria="fluctuation", lora_batch=n_windows,
                lora_seq_len=seq_len, grams="all", reserve=0.0)


def measure(config: dict, stage: str, n_windows: int = 4, seq_len: int = 256, threads: int | None = None) -> dict:
    """Return `peak_mb` (peak RSS during `stage` minus the RSS before the model was built) of one operation, here."""
    import peft  # noqa: F401  (imported before the baseline is read: its import is not the operation's memory)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from pruning_utils.measure import metrics, variants
    from pruning_utils.prune import allocation, importance, reconstruction
    from pruning_utils.recovery import lora

    if threads:
        torch.set_num_threads(threads)
    cfg = AutoConfig.for_model(**config)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # imports the modeling module now, not inside the measured build
    metrics.trim_heap()
    base = metrics.rss_bytes()

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    if stage == "load":
        with metrics.track_peak_memory("cpu") as mem:
            model = build()
        return _result(mem, base, model)
    model = build()
    windows = torch.randint(3, cfg.vocab_size, (n_windows, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # thread pools and kernel caches, paid once per process
        model(input_ids=windows[:1, :8], use_cache=False)
    run = None
    if stage == "perplexity":
        run = lambda: metrics.perplexity(model, windows, batch_size=n_windows, progress=False)  # noqa: E731
    elif stage in ("importance_forward", "taylor"):
        crit = ["fluctuation"] if stage == "importance_forward" else ["taylor"]
        run = lambda: importance.compute_importance(model, windows, crit, batch_size=n_windows, progress=False)  # noqa: E731
    elif stage == "grams":
        run = lambda: reconstruction.collect_grams(model, windows, batch_size=n_windows)  # noqa: E731
    elif stage == "prune_refit":
        grams = reconstruction.collect_grams(model, windows, batch_size=n_windows)
        scores = importance.compute_importance(model, windows, ["magnitude"], progress=False)["magnitude"]
        plan = allocation.plan_both(model, scores, head_rate=0.25, mlp_rate=0.25)
        run = lambda: variants.pruned_copy(model, plan, windows, reconstruction="lstsq", sequential=False,  # noqa: E731
                                           stats=grams)
    elif stage == "lora_step":
        rc = lora.RecoveryConfig(r=8, batch_size=n_windows, seq_len=seq_len, fp16="no")
        model = lora.attach_lora(model, rc)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            loss = model(input_ids=windows, labels=windows, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if run is None:
        raise ValueError(f"unknown stage '{stage}'; known: {', '.join(STAGES)}")
    metrics.trim_heap()
    with metrics.track_peak_memory("cpu") as mem:
        out = run()
    del out
    return _result(mem, base, model)


def _result(mem: dict, base: int, model) -> dict:
    from pruning_utils.measure import metrics

    return {"peak_mb": mem["peak_mb"] - base / MB, "start_mb": mem["start_mb"] - base / MB,
            "weights_mb": metrics.model_bytes(model) / MB, "memory_kind": mem["kind"]}


def measure_fresh(config: dict, stage: str, n_windows: int, seq_len: int, threads: int, timeout_s: float) -> dict:
    """Return `measure` run in a fresh spawned process (a forked one would start with this process's pages)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, config, stage, n_windows, seq_len, threads).result(timeout=timeout_s)


def fit(params: list[float], peaks: list[float]) -> dict | None:
    """Return the least-squares line peak_mb = a + b * params (numpy polyfit), or None under two points."""
    if len(params) < 2:
        return None
    b, a = np.polyfit(np.asarray(params, float), np.asarray(peaks, float), 1)
    return {"a_mb": float(a), "b_mb_per_param": float(b), "bytes_per_param": float(b) * MB, "points": len(params)}


def extrapolate(line: dict, stage: str, settings: dict) -> dict:
    """Return the fit's fp32 and fp16 figures and the plan's own fp16-on-T4 figure for each target model."""
    out = {}
    for name, cfg in TARGETS.items():
        n = memory_plan.n_params(cfg)
        fp32_gb = (line["a_mb"] + line["b_mb_per_param"] * n) / 1024
        plan = memory_plan.plan_operation(cfg, STAGES[stage], **{**settings, "device": "cuda", "dtype": "float16",
                                                            "available_gb": T4_BUDGET_GB, "host_available_gb": 29.0})
        out[name] = {"params": n, "fit_fp32_gb": fp32_gb, "fit_fp16_gb": fp32_gb * 2 / 4,
                     "fit_fp16_fits_14gb": fp32_gb * 2 / 4 <= T4_BUDGET_GB,
                     "plan_fp16_gb": plan.total_gb, "plan_fp16_fits_14gb": plan.total_gb <= T4_BUDGET_GB,
                     "plan_fp16_host_gb": plan.host_gb}
    return out


def fit_all(rows: list[dict], settings: dict) -> dict:
    """Return, per stage, the line through its measured rows and the line's extrapolation to `TARGETS`."""
    fits = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        got = [r for r in rows if r["stage"] == stage and "peak_mb" in r]
        line = fit([r["params"] for r in got], [r["peak_mb"] for r in got])
        fits[stage] = None if line is None else {**line, "extrapolation": extrapolate(line, stage, settings)}
    return fits


def replan(path) -> dict:
    """Return the results file with the plan columns, fits and extrapolations recomputed by the current formulas.

    The measurements stay as they were; only what the plan says about them changes (after a formula is fixed).
    """
    from pruning_utils.measure import metrics

    out = json.loads(path.read_text())
    settings = out["settings"]
    for r in out["rows"]:
        config = {**out["base_config"], **out["sizes"][r["size"]]}
        plan = memory_plan.plan_operation(config, STAGES[r["stage"]], **settings)
        r.update(plan_mb=plan.total_gb * 1024, plan_peak_operation=plan.peak_operation)
        if "peak_mb" in r:
            r["measured_over_plan"] = r["peak_mb"] / r["plan_mb"]
    out["fits"] = fit_all(out["rows"], settings)
    out["plan_recomputed"] = {"git_commit": metrics.git_commit(),
                              "note": "plan_mb and the extrapolations recomputed after the measured run "
                                      f"(measured at {out['env']['git_commit']}); measured figures unchanged"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--budget-s", type=float, default=840, help="skip the measurements left after this many seconds")
    ap.add_argument("--headroom-gb", type=float, default=2.0, help="skip a measurement the plan says leaves less free")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the plan columns of the results file, measure nothing")
    args = ap.parse_args()
    from pruning_utils.measure import metrics
    from pruning_utils.paths import PROJECT_ROOT

    path = PROJECT_ROOT / "results" / "benchmarks" / "memory_scale.json"
    if args.replan:
        out = replan(path)
        path.write_text(json.dumps(out, indent=1))
        print(markdown(out["rows"], out["fits"]))
        return

    settings = plan_params(args.windows, args.seq_len)
    rows, t_start = [], time.time()
    for size in args.sizes.split(","):
        config = {**BASE, **SIZES[size]}
        n = memory_plan.n_params(config)
        for stage in args.stages.split(","):
            plan = memory_plan.plan_operation(config, STAGES[stage], **settings)
            row = {"size": size, "params": n, "stage": stage, "plan_mb": plan.total_gb * 1024,
                   "plan_peak_operation": plan.peak_operation}
            if plan.total_gb > memory_plan.available_gb("cpu") - args.headroom_gb:  # the plan guards its own benchmark
                row.update(skipped=f"plan {plan.total_gb:.1f} GiB > available - {args.headroom_gb} GiB")
            elif time.time() - t_start > args.budget_s:
                row.update(skipped=f"time budget of {args.budget_s:.0f} s spent")
            else:
                t0 = time.time()
                row.update(measure_fresh(config, stage, args.windows, args.seq_len, args.threads, args.timeout))
                row.update(seconds=time.time() - t0, measured_over_plan=row["peak_mb"] / row["plan_mb"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    fits = fit_all(rows, settings)
    out = {
        "what": "peak memory per operation, CPU fp32, random Llama-family models; each in a fresh spawned process",
        "measure": "peak_mb = VmHWM during the operation (reset before it) - RSS before the model was built: weights "
                   "+ what the operation holds (Grams for prune_refit, LoRA/AdamW for lora_step) + working memory",
        "plan": "plan_mb = memory_plan.plan_operation(config, stage, **settings).total_gb, reserve 0",
        "settings": settings, "windows": args.windows, "seq_len": args.seq_len, "sizes": {k: SIZES[k] for k in
                                                                                          args.sizes.split(",")},
        "base_config": BASE, "rows": rows, "fits": fits,
        "extrapolation_method": (
            "fit_fp32_gb = (a + b * params) / 1024 at the target's parameter count; fit_fp16_gb = fit_fp32_gb * 2/4 "
            "(weights and activations take the dtype's bytes). It ignores what does not scale with parameters or "
            "dtype: fp64 Grams grow with layers x width^2 and stay fp64, LoRA/AdamW states stay fp32, and logits grow "
            "with the vocabulary (49152 here, 151936 in Qwen2.5, 128256 in Llama-3.1), so plan_fp16_gb (the memory "
            "plan for the real config, fp16 on CUDA, same batch and sequence) is the figure to trust "
            "where they differ"),
        "t4_budget_gb": T4_BUDGET_GB, "seconds": time.time() - t_start, "env": metrics.environment_info(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(markdown(rows, fits))


def markdown(rows: list[dict], fits: dict) -> str:
    """Return the measured / planned MB table (sizes x stages) and the fits with their extrapolations."""
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    cell = {(r["size"], r["stage"]): r for r in rows}
    lines = ["| size | params | " + " | ".join(stages) + " |", "|---|---:|" + "---:|" * len(stages)]
    for size in sizes:
        r0 = next(r for r in rows if r["size"] == size)
        vals = []
        for st in stages:
            r = cell.get((size, st))
            vals.append("-" if r is None else "skipped" if "skipped" in r
                        else f"{r['peak_mb']:.0f} / {r['plan_mb']:.0f}")
        lines.append(f"| {size} | {r0['params'] / 1e6:.0f}M | " + " | ".join(vals) + " |")
    lines += ["", "measured / planned peak MiB (CPU, fp32)", "",
              "| stage | a (MiB) | bytes/param | "
              + " | ".join(f"{t} fit fp16 GiB | {t} plan fp16 GiB" for t in TARGETS) + " |",
              "|---|---:|---:|" + "---:|---:|" * len(TARGETS)]
    for st, f in fits.items():
        if f is None:
            continue
        ex = f["extrapolation"]
        vals = " | ".join(f"{ex[t]['fit_fp16_gb']:.1f}{'' if ex[t]['fit_fp16_fits_14gb'] else ' ✗'} | "
                          f"{ex[t]['plan_fp16_gb']:.1f}{'' if ex[t]['plan_fp16_fits_14gb'] else ' ✗'}" for t in TARGETS)
        lines.append(f"| {st} | {f['a_mb']:.0f} | {f['bytes_per_param']:.2f} | {vals} |")
    lines.append(f"\n✗: over the {T4_BUDGET_GB} GiB T4 budget")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
