"""The steps of notebook 05 that are more than a call: the full level (the unpruned model or a pruned checkpoint) and
the nested model its parameters describe, the featurized prompt split, the table of levels, the policies (the bandit
with the retention weight, the DQN) and the summary of the controllers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.adaptive import controller
from pruning_utils.adaptive.dqn import DQNController, train_dqn
from pruning_utils.adaptive.nested_model import NestedModel, parse_levels
from pruning_utils.adaptive.telemetry import SimulatedLoad, read_telemetry
from pruning_utils.prune.scores import Scores, restrict_scores


def full_level(model_spec: str, adaptive_model: str, scores: Scores, device: str | None = None, dtype=None
               ) -> tuple[torch.nn.Module, object, Scores]:
    """Return `(model, tokenizer, scores)` of the full level every other level slices: the unpruned `model_spec` and
    its `scores`, or (`adaptive_model` set) that pruned checkpoint under models/ with `scores` restricted to its plan
    (`scores.restrict_scores`), saying so in one printed line. A missing, INT8 or factorised checkpoint (levels slice
    the rows and columns of plain projections) and scores of another model raise ValueError before the weights load."""
    from pruning_utils.atomic import recover_folder
    from pruning_utils.model.checkpoint import (
        PLAN_FILE,
        is_pruned_checkpoint,
        load_pruned,
        read_json,
        resolve_checkpoint_dir,
    )
    from pruning_utils.model.loading import load_model
    from pruning_utils.model.plan import PruningPlan

    if not adaptive_model:
        return (*load_model(model_spec, device=device, dtype=dtype), scores)
    folder = resolve_checkpoint_dir(adaptive_model)
    recover_folder(folder)  # a copy an interrupted save left is put back first, as load_pruned would
    if not is_pruned_checkpoint(folder):
        raise ValueError(f"ADAPTIVE_MODEL '{adaptive_model}': no pruned checkpoint at {folder} (no {PLAN_FILE}); run "
                         "the stage that writes it first (see run_all.sh), or give '' for the unpruned MODEL")
    meta = read_json(folder / PLAN_FILE)  # checked before the weights load, which verifies the whole folder
    if meta.get("weights", "fp32") == "int8":
        raise ValueError(f"ADAPTIVE_MODEL '{adaptive_model}' is an INT8 checkpoint, and levels slice floating-point "
                         "weights: give the checkpoint it was quantized from (e.g. mix_pruned for mix_pruned_int8); "
                         "the int8 level of ADAPTIVE_LEVELS quantizes that one")
    if meta.get("modules"):
        raise ValueError(f"ADAPTIVE_MODEL '{adaptive_model}' stores factorised projections "
                         f"({', '.join(sorted(meta['modules'])[:3])}, ...), and levels slice plain ones: give a "
                         "width-pruned checkpoint (head_pruned, mlp_pruned, mix_pruned or one recovered from them), "
                         "or '' for the unpruned MODEL")
    plan = PruningPlan.from_dict(meta["plan"])
    restricted = restrict_scores(scores, plan)
    model, tok = load_pruned(folder, device=device, dtype=dtype)
    if tok is None:
        raise ValueError(f"ADAPTIVE_MODEL '{adaptive_model}' was saved without a tokenizer; re-save it with one "
                         "(checkpoint.save_pruned(model, tokenizer, ...))")
    layers = sorted(plan.kept_layers())
    print(f"full level: checkpoint {adaptive_model} of {plan.source_model or model_spec} ({len(layers)} of "
          f"{plan.base_layers} layers, {sum(len(plan.kept_heads(i)) for i in layers)} of {sum(plan.base_heads)} "
          f"query heads, {sum(len(plan.kept_neurons(i)) for i in layers)} of {sum(plan.base_intermediate)} MLP "
          "neurons); every level, 'none' included, is relative to it, not to the unpruned model")
    return model, tok, restricted


def build_nested(model, tokenizer, scores: Scores, levels: str, *, text_source: str, n_calib: int, seq_len: int,
                 seed: int = 0, refit: bool = False, int8_keep_fp32: list[str] | None = None,
                 int8_alpha: float | None = None, int8_mode: str = "weight_only") -> NestedModel:
    """Return the `NestedModel` of `levels` on `model`: an int8 level (torchao, `int8_mode`) is left out where
    torchao INT8 cannot run,
    a `layers:` level skips the layers of least block influence (4 windows of the text parts of `text_source`),
    `refit` gives every level width the lstsq refit from `n_calib` calibration windows, and `int8_alpha` smooths
    activation outliers into the INT8 weights (16 calibration windows)."""
    from pruning_utils.compress import depth
    from pruning_utils.data.sources import calibration_windows, text_parts
    from pruning_utils.model import linears
    from pruning_utils.prune.reconstruction import collect_grams

    parsed = parse_levels(levels)
    device = next(model.parameters()).device
    if any(lv.int8 for lv in parsed) and not linears.int8_applicable(device):
        parsed = [lv for lv in parsed if not lv.int8]
        print(f"torchao INT8 cannot run on {device} (or torchao is missing): the int8 level is left out")
    layer_scores = None
    if any(lv.layers for lv in parsed):
        windows = calibration_windows(tokenizer, text_parts(text_source), n_samples=4, seq_len=seq_len, seed=seed)
        layer_scores = torch.tensor(depth.score_layers(model, windows, "block_influence").scores)
    grams = None
    if refit:  # one-shot Grams of o_proj / down_proj inputs
        calib = calibration_windows(tokenizer, text_source, n_samples=n_calib, seq_len=seq_len, seed=seed, model=model)
        grams = collect_grams(model, calib)
    int8_kw = dict(mode=int8_mode, keep_fp32=list(int8_keep_fp32 or []), progress=False)
    if any(lv.int8 for lv in parsed) and int8_alpha is not None:
        int8_kw.update(smooth_alpha=int8_alpha, smooth_windows=calibration_windows(
            tokenizer, text_source, n_samples=16, seq_len=seq_len, seed=seed, model=model))
    return NestedModel(model, scores, parsed, layer_scores=layer_scores, grams=grams, int8_kw=int8_kw)


def split_prompts(pool: pd.DataFrame, tokenizer, model=None, seed: int = 0, n: int | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the seeded 80/20 (train, test) split of `n` prompts of `pool`, featurized (`controller.featurize`;
    with `model`, the first-token entropy too)."""
    train, test = controller.split_prompts(pool, seed=seed, n=n)
    return controller.featurize(train, tokenizer, model), controller.featurize(test, tokenizer, model)


def level_table(nested: NestedModel, outcomes: pd.DataFrame, chunks: torch.Tensor, memory: dict | None = None,
                refit: bool = False, switch_repeats: int = 50) -> pd.DataFrame:
    """Return one row per level: what it removes, its layers, the perplexity of `chunks` (KV window not applied),
    the means of its measured `outcomes` (answer perplexity, retention, tokens/s), its largest cache, the median of
    `switch_repeats` switches and the memory overhead of the nesting (`memory`: `nested.memory()`, read when None)."""
    from pruning_utils.measure.metrics import perplexity

    memory = memory or nested.memory()

    switch_ms = {name: 1000 * float(np.median([nested.switch(name) for _ in range(switch_repeats)]))
                 for name in nested.levels}
    nested.restore()
    rows = []
    for name, lv in nested.levels.items():
        nested.switch(name)
        part = outcomes[outcomes["level"] == name]
        rows.append(dict(level=name, heads_removed=lv.heads, ffn_removed=lv.ffn, layers_removed=lv.layers,
                         kv_window=lv.kv, int8=lv.int8, refit=bool(refit) and not lv.int8,
                         active_layers=len(nested.active_layers(lv)),
                         chunk_ppl=perplexity(nested.active, chunks, progress=False)["ppl"],
                         answer_ppl=part["ppl"].mean(), retention=part["retention"].mean(),
                         tokens_per_s=part["tokens_per_s"].mean(), cache_bytes_max=part["cache_bytes_max"].max(),
                         switch_ms_median=switch_ms[name], memory_overhead_ratio=memory["overhead_ratio"],
                         load_avg=part["load_avg"].mean() if "load_avg" in part else float("nan")))
    nested.restore()
    return pd.DataFrame(rows)


def parse_load(text: str) -> tuple[float, float] | None:
    """Return the simulated load range of 'low,high', or None for 'live' (the machine's own readings)."""
    return None if text == "live" else tuple(float(v) for v in text.split(","))


def held_out_loads(load_range: tuple[float, float] | None, n: int, seed: int) -> list[float] | None:
    """Return `n` seeded simulated loads in `load_range` for the held-out prompts, or None for live telemetry
    (`load_range` None): `controller.evaluate` then reads the machine just before each prompt is served."""
    if load_range:
        return SimulatedLoad(seed, *load_range).loads(n)
    read_telemetry()  # primes psutil's CPU counter: the first prompt's reading then spans this call to it
    return None


def train_policy(outcomes: pd.DataFrame, prompts: pd.DataFrame, n_levels: int, tps_ref: float,
                 min_retention: float | None = None, **train_kw
                 ) -> tuple[controller.LinUCB, float, pd.DataFrame | None]:
    """Return `(policy, retention_weight, grid)`: the bandit of the issue's reward (w = 0, no grid) when
    `min_retention` is None, else `controller.fit_retention_weight`'s smallest w that keeps it on the training
    prompts, with its grid."""
    if min_retention is None:
        return controller.train_bandit(outcomes, prompts, n_levels, tps_ref, **train_kw), 0.0, None
    return controller.fit_retention_weight(outcomes, prompts, n_levels, tps_ref, min_retention, **train_kw)


def controllers(n_levels: int, train: pd.DataFrame, policy: controller.Controller,
                *extra: controller.Controller | None) -> list[controller.Controller]:
    """Return the controllers compared on the held-out prompts: always 'none' first (the reference of retention),
    always the last level, the rule table fitted to the training complexities, the trained `policy`, then each
    `extra` policy that is not None (the DQN)."""
    return [controller.Fixed(n_levels, 0, "always_none"), controller.Fixed(n_levels, -1, "always_max"),
            controller.RuleController(n_levels).fit(train["complexity"]), policy, *(p for p in extra if p is not None)]


DQN_FOLDER = "adaptive_dqn"  # under models/: the policy a later run loads with ADAPTIVE_DQN_POLICY


def dqn_policy(outcomes: pd.DataFrame, prompts: pd.DataFrame, levels, tps_ref: float, retention_weight: float,
               enabled: bool = True, policy_path: str = "", epochs: int = 30, seed: int = 0,
               load_range: tuple[float, float] | None = None, target: float = 0.8) -> DQNController | None:
    """Return the DQN controller (None when not `enabled`): the saved policy at `policy_path`, checked against
    `levels`; or, with '', one trained by `dqn.train_dqn` on the same outcomes and reward as the bandit (`load_range`
    None: the bandit's default simulated range) and saved atomically to models/adaptive_dqn. Its `path` says which."""
    if not enabled:
        return None
    levels = list(levels)
    if policy_path:
        return DQNController.load(policy_path, n_levels=len(levels), levels=levels)
    policy = train_dqn(outcomes, prompts, len(levels), tps_ref, epochs=epochs, seed=seed,
                       load_range=load_range or (0.0, 0.9), target=target, retention_weight=retention_weight,
                       levels=levels)
    policy.save(paths.models_dir() / DQN_FOLDER)
    return policy


def summary_table(runtime: pd.DataFrame, retention_weight: float, simulated_load: bool) -> pd.DataFrame:
    """Return `controller.summarize(runtime)` with whether each controller beats both fixed ones on reward, whether
    the load was simulated, and the retention weight."""
    summary = controller.summarize(runtime)
    ends = summary.set_index("controller").loc[["always_none", "always_max"]]
    summary["beats_fixed_on_reward"] = summary["reward"] > ends["reward"].max()
    summary["simulated_load"] = simulated_load
    summary["retention_weight"] = retention_weight
    return summary


def held_out_evaluation(controllers: list[controller.Controller], nested: NestedModel, tokenizer, test: pd.DataFrame,
                        loads: list[float] | None, tps_ref: float, retention_weight: float, live: bool = False,
                        **evaluate_kw) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Return `(runtime, summary, live_runtime)` of the trained controllers on the held-out prompts: under `loads`
    (None: live telemetry), then, with `live` and simulated `loads`, once more under the machine's live load
    (`live_evaluation`; its summary rows follow, `simulated_load` False; `live_runtime` None without it)."""
    runtime = controller.evaluate(controllers, nested, tokenizer, test, loads, tps_ref,
                                  retention_weight=retention_weight, **evaluate_kw)
    summary = summary_table(runtime, retention_weight, simulated_load=loads is not None)
    if not (live and loads is not None):
        return runtime, summary, None
    live_runtime, live_summary = live_evaluation(controllers, nested, tokenizer, test, tps_ref, retention_weight,
                                                 **evaluate_kw)
    return runtime, pd.concat([summary, live_summary], ignore_index=True), live_runtime


def live_evaluation(controllers: list[controller.Controller], nested: NestedModel, tokenizer, test: pd.DataFrame,
                    tps_ref: float, retention_weight: float, **evaluate_kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return `(runtime, summary)` of the same trained controllers served once more on the same test prompts, each
    reading the machine's live load (CPU since the previous reading, memory, GPU with pynvml) just before its prompt:
    the run beside the simulated one. The summary's `simulated_load` is False; the runtime rows keep every reading."""
    runtime = controller.evaluate(controllers, nested, tokenizer, test, held_out_loads(None, len(test), 0), tps_ref,
                                  retention_weight=retention_weight, **evaluate_kw)
    return runtime, summary_table(runtime, retention_weight, simulated_load=False)


def training_rewards(policy: controller.Controller, *extra: controller.Controller | None) -> pd.DataFrame:
    """Return each trained policy's mean training reward per epoch (one row per policy with a `history`, named
    after it; one column per epoch)."""
    rows = {}
    for p in (policy, *extra):
        if p is not None and getattr(p, "history", None):
            history = pd.DataFrame(p.history, columns=["epoch", "id", "load", "level_index", "reward"])
            rows[f"{p.name}: mean training reward"] = history.groupby("epoch")["reward"].mean().round(3)
    return pd.DataFrame(rows).T


def verdict(summary: pd.DataFrame, retention_weight: float) -> str:
    """Return one line comparing the learned controller with the fixed ones (reward) and with the issue's targets:
    >= 95% of the unpruned answers' meaning kept, >= +15% tokens/s."""
    lines = []
    for simulated, part in summary.groupby("simulated_load", sort=False) if "simulated_load" in summary else [
            (True, summary)]:
        by = part.set_index("controller")
        learned, ends = by.loc["learned"], by.loc[["always_none", "always_max"]]
        lines.append(f"{'simulated' if simulated else 'live'} load: learned (w = {retention_weight}): reward "
                     f"{learned['reward']:.3f} vs fixed {ends['reward'].round(3).to_dict()}; retention "
                     f"{learned['retention_pct']:.1f}% of baseline (target >= 95), tokens/s "
                     f"{learned['speedup_pct']:+.1f}% (target >= +15)")
    return "\n".join(lines)
