"""Per-prompt choice of a pruning level: the reward, the prompt set and its split, rules, a contextual bandit,
fixed baselines, and the measurement loops that feed and evaluate them (notebook 05).

Reward of answering a prompt at a level under load L (the issue's 0.6 * tokens/s - 0.4 * perplexity / 10, plus a
retention term):

    reward = 0.6 * min(1, tokens/s * (1 - L) / (target * tokens/s of the unpruned model at no load)) - 0.4 * ppl / 10
             - w * (1 - retention)

The speed term is normalised to a service target: the share of the CPU left to the model, (1 - L), slows every level
alike, and speed beyond the target earns nothing; so at low load the unpruned model wins and under load pruning pays.
`ppl` is the level's perplexity of the unpruned model's answer to that prompt (teacher-forced, KV window applied):
how far the level drifts from the answer it replaces. `retention` is the semantic similarity of the level's own
greedy answer to the unpruned one (all-MiniLM-L6-v2 cosine): the PPL term alone misses that a greedy answer drifts
after a few near-tied tokens (INT8 on the embedded model: README, adaptive runtime).
w = 0 is the issue's formula. `fit_retention_weight` makes the retention target a constraint: it trains the bandit
for each w of a grid and keeps the smallest w whose policy keeps `min_retention` of the unpruned answers' meaning on
the *training* prompts (a Lagrange multiplier found by search); the held-out prompts never see it.

Rules (`RULES`, complexity bin x load bin -> pruning intensity in [0, 1], 0 = 'none', 1 = the last level):

    complexity \\ load   low   mid   high
    low                 0.5   1.0   1.0
    mid                 0.0   0.5   1.0
    high                0.0   0.0   0.5

Bin edges: complexity tertiles of the training split (`RuleController.fit`), load 1/3 and 2/3.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pruning_utils.adaptive.complexity import (
    PromptFeatures,
    complexity,
    entropy_of_logits,
    first_token_entropy,
    prompt_features,
)
from pruning_utils.adaptive.nested_model import NestedModel, decode, prefill
from pruning_utils.data.files import read_csv
from pruning_utils.measure.metrics import load_avg

SPEED_WEIGHT, PPL_WEIGHT, PPL_SCALE = 0.6, 0.4, 10.0
BINS = ("low", "mid", "high")
RULES: dict[tuple[str, str], float] = {
    ("low", "low"): 0.5, ("low", "mid"): 1.0, ("low", "high"): 1.0,
    ("mid", "low"): 0.0, ("mid", "mid"): 0.5, ("mid", "high"): 1.0,
    ("high", "low"): 0.0, ("high", "mid"): 0.0, ("high", "high"): 0.5,
}


def reward(tokens_per_s: float, ppl: float, load: float, tps_ref: float, target: float = 0.8, retention: float = 1.0,
           retention_weight: float = 0.0) -> float:
    """Return the reward of one answer (module docstring): speed normalised to `target` x `tps_ref`, minus ppl / 10,
    minus `retention_weight` x the share of the unpruned answer's meaning lost."""
    speed = min(1.0, tokens_per_s * (1.0 - load) / (target * tps_ref))
    return SPEED_WEIGHT * speed - PPL_WEIGHT * ppl / PPL_SCALE - retention_weight * (1.0 - retention)


# ------------------------------------------------------------------------------------------------ prompt set


def prompt_pool() -> pd.DataFrame:
    """Return the project's packaged prompts (judge + training instructions) as a table id, category, source, prompt."""
    from pruning_utils.measure.evaluation import PROMPTS_FILE, TRAIN_PROMPTS_FILE, load_instructions

    rows = [dict(id=it["id"], category=it["category"], source=src, prompt=it["prompt"])
            for src, path in (("judge", PROMPTS_FILE), ("train", TRAIN_PROMPTS_FILE)) for it in load_instructions(path)]
    return pd.DataFrame(rows)


def load_prompt_csv(path: str | Path) -> pd.DataFrame:
    """Return a prompt CSV (any columns, one of them `prompt`; every cell read as text), empty and duplicate prompts
    dropped (duplicates with a warning); raises ValueError without a `prompt` column, with repeated ids or with fewer
    than 2 distinct prompts (DataFileError, naming the file, for one that is empty, malformed or not UTF-8)."""
    df = read_csv(path, dtype=str, keep_default_na=False)
    if "prompt" not in df.columns:
        raise ValueError(f"{path} has no 'prompt' column (columns: {', '.join(map(str, df.columns))}); "
                         "give a CSV with one prompt per row in a column named 'prompt'")
    df = df[df["prompt"].str.strip() != ""].reset_index(drop=True)
    if "id" not in df.columns:
        df.insert(0, "id", [f"p{i}" for i in range(len(df))])
    elif df["id"].duplicated().any():
        raise ValueError(f"{path}: the 'id' column repeats {sorted(df['id'][df['id'].duplicated()].astype(str))[:5]}; "
                         "make the ids unique or drop the column (rows are then numbered)")
    return _distinct_prompts(df, str(path))


def _distinct_prompts(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Return the rows of the first occurrence of each prompt (whitespace runs count as one space), warning about
    the others: a prompt in both the training and the test split would be tested on what the policy learned from.
    Raises ValueError when fewer than 2 remain."""
    key = df["prompt"].astype(str).str.split().str.join(" ")
    dup = key.duplicated()
    if dup.any():
        warnings.warn(f"{what}: {int(dup.sum())} duplicate prompt(s) removed before the train/test split (the first "
                      f"of each kept), e.g. {key[dup].iloc[0][:60]!r}", stacklevel=3)
        df = df[~dup].reset_index(drop=True)
    if len(df) < 2:
        raise ValueError(f"{what} holds {len(df)} distinct prompt(s): the train/test split needs at least 2 (one to "
                         "train the controllers on, one to test them); add prompts")
    return df


def split_prompts(df: pd.DataFrame, seed: int = 0, train_frac: float = 0.8, n: int | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a seeded (train, test) split of `n` rows drawn from the table (all rows when n is None), duplicate
    prompts dropped first (with a warning); raises ValueError when fewer than 2 prompts would be drawn."""
    df = _distinct_prompts(df, "the prompt table")
    if n is not None and n < 2:
        raise ValueError(f"n={n} prompts cannot be split into training and test prompts: draw at least 2")
    order = np.random.default_rng(seed).permutation(len(df))[: n or len(df)]
    cut = max(1, min(len(order) - 1, round(train_frac * len(order))))
    return df.iloc[order[:cut]].reset_index(drop=True), df.iloc[order[cut:]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- controllers


LOAD_KNOTS = (0.25, 0.5, 0.75)  # hinge features: the speed term is piecewise linear in the load (capped at the target)


def context(features: PromptFeatures, score: float, load: float) -> np.ndarray:
    """Return the bandit's context vector: bias, complexity, load, hinges of the load at `LOAD_KNOTS`, complexity x
    load and the raw prompt features."""
    return np.array([1.0, score, load, *(max(0.0, load - k) for k in LOAD_KNOTS), score * load,
                     min(features.n_tokens / 128, 1.0), float(features.code), float(features.math),
                     features.entropy or 0.0])


CONTEXT_NAMES = ("bias", "complexity", "load", *(f"load_over_{k}" for k in LOAD_KNOTS), "complexity_x_load",
                 "n_tokens_128", "code", "math", "entropy")  # the order of `context`'s entries (saved DQN policies)
CONTEXT_DIM = len(CONTEXT_NAMES)


class Controller:
    """Chooses a level index (0 = 'none', n_levels - 1 = the most pruned) from a prompt's complexity and the load."""

    name = "controller"
    uses_features = True

    def __init__(self, n_levels: int):
        self.n_levels = n_levels

    def choose(self, features: PromptFeatures, score: float, load: float) -> int:
        raise NotImplementedError


class Fixed(Controller):
    """Always the same level (the baselines 'always none' and 'always max')."""

    uses_features = False

    def __init__(self, n_levels: int, index: int, name: str):
        super().__init__(n_levels)
        self.index, self.name = index % n_levels, name

    def choose(self, features, score, load) -> int:
        return self.index


def _bin(x: float, edges: tuple[float, float]) -> str:
    return BINS[int(x >= edges[0]) + int(x >= edges[1])]


class RuleController(Controller):
    """The documented table `RULES`: complexity bin x load bin -> intensity -> level index."""

    name = "rules"

    def __init__(self, n_levels: int, complexity_edges: tuple[float, float] = (0.2, 0.4),
                 load_edges: tuple[float, float] = (1 / 3, 2 / 3), rules: dict | None = None):
        super().__init__(n_levels)
        self.complexity_edges, self.load_edges = complexity_edges, load_edges
        self.rules = rules or RULES
        missing = [(c, lo) for c in BINS for lo in BINS if (c, lo) not in self.rules]
        if missing:
            raise ValueError(f"the rule table has no entry for (complexity, load) states {missing}")

    def fit(self, scores) -> "RuleController":
        """Set the complexity bin edges to the tertiles of the training prompts' scores; returns self."""
        lo, hi = np.quantile(np.asarray(scores, dtype=float), [1 / 3, 2 / 3])
        self.complexity_edges = (float(lo), float(max(hi, lo + 1e-9)))
        return self

    def state(self, score: float, load: float) -> tuple[str, str]:
        """Return the (complexity bin, load bin) of a prompt."""
        return _bin(score, self.complexity_edges), _bin(load, self.load_edges)

    def choose(self, features, score, load) -> int:
        return int(round(self.rules[self.state(score, load)] * (self.n_levels - 1)))


@dataclass
class LinUCB(Controller):
    """Contextual bandit: one ridge regression of the reward on `context` per level, UCB exploration while training,
    greedy (deterministic) at test time."""

    n_levels: int
    dim: int = CONTEXT_DIM
    alpha: float = 0.5
    ridge: float = 1.0
    history: list = field(default_factory=list)

    name = "learned"

    def __post_init__(self):
        self.A = np.stack([self.ridge * np.eye(self.dim) for _ in range(self.n_levels)])
        self.b = np.zeros((self.n_levels, self.dim))

    def theta(self) -> np.ndarray:
        """Return the fitted reward weights, one row per level."""
        return np.stack([np.linalg.solve(A, b) for A, b in zip(self.A, self.b)])

    def scores(self, x: np.ndarray, explore: bool) -> np.ndarray:
        """Return each level's predicted reward (plus its confidence bonus when exploring)."""
        mean = self.theta() @ x
        if not explore:
            return mean
        return mean + self.alpha * np.sqrt([x @ np.linalg.solve(A, x) for A in self.A])

    def update(self, x: np.ndarray, arm: int, r: float) -> None:
        """Add one observed reward."""
        self.A[arm] += np.outer(x, x)
        self.b[arm] += r * x

    def choose(self, features, score, load) -> int:
        return int(np.argmax(self.scores(context(features, score, load), explore=False)))


def outcome_table(outcomes: pd.DataFrame) -> dict:
    """Return `{(prompt id, level index): (tokens/s, ppl, retention)}` of measured outcomes (retention 1 without the
    column): what every trained policy learns from."""
    has_retention = "retention" in outcomes.columns
    return {(r.id, int(r.level_index)): (r.tokens_per_s, r.ppl, r.retention if has_retention else 1.0)
            for r in outcomes.itertuples()}


def outcome_reward(table: dict, prompt_id, level: int, load: float, tps_ref: float, target: float = 0.8,
                   retention_weight: float = 0.0) -> float:
    """Return the `reward` of answering `prompt_id` at `level` under `load`, from an `outcome_table`: the one reward
    the bandit and the DQN (dqn.py) both train on."""
    tps, ppl, ret = table[(prompt_id, level)]
    return reward(tps, ppl, load, tps_ref, target, ret, retention_weight)


def train_bandit(outcomes: pd.DataFrame, prompts: pd.DataFrame, n_levels: int, tps_ref: float, epochs: int = 30,
                 seed: int = 0, load_range: tuple[float, float] = (0.0, 0.9), target: float = 0.8,
                 alpha: float = 0.5, retention_weight: float = 0.0) -> LinUCB:
    """Return a LinUCB policy trained on the measured outcomes of the training prompts (seeded, deterministic).

    Each round takes a prompt (a seeded shuffle per epoch) and a simulated load, lets the bandit pick one level and
    reveals only that level's reward, computed from the measured tokens/s, perplexity and (when `outcomes` has the
    column) retention of (prompt, level). `prompts` needs columns id, complexity and the feature columns; `outcomes`
    id, level_index, tokens_per_s, ppl and optionally retention.
    """
    from pruning_utils.adaptive.telemetry import SimulatedLoad

    table = outcome_table(outcomes)
    rng = np.random.default_rng(seed)
    load = SimulatedLoad(seed, *load_range)
    policy = LinUCB(n_levels, alpha=alpha)
    feats = [features_from_row(r) for _, r in prompts.iterrows()]
    for epoch in range(epochs):
        for i in rng.permutation(len(prompts)):
            row, lo = prompts.iloc[i], load().load
            x = context(feats[i], row["complexity"], lo)
            arm = int(np.argmax(policy.scores(x, explore=True)))
            r = outcome_reward(table, row["id"], arm, lo, tps_ref, target, retention_weight)
            policy.update(x, arm, r)
            policy.history.append((epoch, row["id"], lo, arm, r))
    return policy


RETENTION_WEIGHTS = (0.0,) + tuple(round(float(w), 3) for w in np.geomspace(0.05, 8.0, 24))


def fit_retention_weight(outcomes: pd.DataFrame, prompts: pd.DataFrame, n_levels: int, tps_ref: float,
                         min_retention: float, weights=RETENTION_WEIGHTS, loads_per_prompt: int = 8,
                         **train_kw) -> tuple[LinUCB, float, pd.DataFrame]:
    """Return (policy, w, grid): the bandit trained with the smallest retention weight w of `weights` whose greedy
    policy keeps a mean retention >= `min_retention` on the training prompts (the largest w if none does).

    Each w trains a bandit (`train_bandit`, same seed) and replays it on every training prompt under
    `loads_per_prompt` seeded simulated loads, reading speed and retention from the measured outcomes; `grid` has one
    row per w: mean retention, mean tokens/s relative to the unpruned level, mean reward, and the chosen level shares.
    """
    from pruning_utils.adaptive.telemetry import SimulatedLoad

    if "retention" not in outcomes.columns:
        raise ValueError("fit_retention_weight needs outcomes with a 'retention' column "
                         "(measure_outcomes(..., judge=evaluation.SemanticJudge()))")
    table = outcome_table(outcomes)
    seed, load_range = train_kw.get("seed", 0), train_kw.get("load_range", (0.0, 0.9))
    loads = SimulatedLoad(seed + 7, *load_range).loads(len(prompts) * loads_per_prompt)
    feats = [features_from_row(r) for _, r in prompts.iterrows()]
    rows, policies = [], {}
    for w in weights:
        policy = train_bandit(outcomes, prompts, n_levels, tps_ref, retention_weight=w, **train_kw)
        picks = []
        for k, lo in enumerate(loads):
            i = k % len(prompts)
            row = prompts.iloc[i]
            arm = int(np.argmax(policy.scores(context(feats[i], row["complexity"], lo), explore=False)))
            tps, ppl, ret = table[(row["id"], arm)]
            picks.append((arm, ret, tps / table[(row["id"], 0)][0],
                          reward(tps, ppl, lo, tps_ref, train_kw.get("target", 0.8), ret, w)))
        arms, ret, speed, rew = (np.array(v, dtype=float) for v in zip(*picks))
        rows.append(dict(retention_weight=w, train_retention=ret.mean(), train_speed_ratio=speed.mean(),
                         train_reward=rew.mean(), **{f"share_level_{a}": float((arms == a).mean())
                                                    for a in range(n_levels)}))
        policies[w] = policy
    grid = pd.DataFrame(rows)
    ok = grid[grid["train_retention"] >= min_retention]
    w = float(ok["retention_weight"].min() if len(ok) else grid["retention_weight"].max())
    return policies[w], w, grid


# ------------------------------------------------------------------------------------------------ measurement


FEATURE_COLUMNS = ("n_tokens", "question", "imperative", "code", "math", "entities", "clauses", "entropy")


def features_from_row(row) -> PromptFeatures:
    """Return the PromptFeatures stored in a table row (the columns `FEATURE_COLUMNS`)."""
    entropy = row["entropy"]
    return PromptFeatures(int(row["n_tokens"]), bool(row["question"]), bool(row["imperative"]), bool(row["code"]),
                          bool(row["math"]), int(row["entities"]), int(row["clauses"]),
                          None if entropy is None or pd.isna(entropy) else float(entropy))


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    from pruning_utils.measure.evaluation import format_prompt

    templated = bool(getattr(tokenizer, "chat_template", None))
    return torch.tensor([tokenizer.encode(format_prompt(tokenizer, prompt), add_special_tokens=not templated)])


def featurize(prompts: pd.DataFrame, tokenizer, model=None) -> pd.DataFrame:
    """Return the prompt table with the feature columns, `complexity`, `feature_ms` (the text features' time) and,
    with a model, the first-token entropy (and `entropy_ms`, the time of its prompt forward: at serving time that
    forward is the prefill the chosen level decodes on from, `evaluate`)."""
    rows = []
    for prompt in prompts["prompt"]:
        t0 = time.perf_counter()
        f = prompt_features(prompt, tokenizer)
        feature_ms = 1000 * (time.perf_counter() - t0)
        row = f.to_dict()
        if model is not None:
            t0 = time.perf_counter()
            row["entropy"] = first_token_entropy(model, tokenizer, prompt)
            row["entropy_ms"] = 1000 * (time.perf_counter() - t0)
        row.update(complexity=complexity(features_from_row(row)), feature_ms=feature_ms)
        rows.append(row)
    return pd.concat([prompts.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def answer_ppl(model, prompt_ids: torch.Tensor, answer: list[int], kv_window: int = 0,
               prefilled: dict | None = None) -> float:
    """Return a level's perplexity of a given answer after the prompt (with the KV window when it has one; decoding
    on from a `prefilled` prompt cache when given, as the level serves)."""
    import math

    import torch.nn.functional as F

    forced = torch.tensor([answer])
    if kv_window:
        return decode(model, prompt_ids, forced=forced, kv_window=kv_window, prefilled=prefilled)["ppl"]
    device = next(model.parameters()).device
    n = prompt_ids.shape[1]
    with torch.inference_mode():
        if prefilled is not None:  # the first answer token from the prefill's logits, the rest in one forward
            from pruning_utils.adaptive.nested_model import cache_kw, prefilled_cache

            rest = model(input_ids=forced[:, :-1].to(device), **{cache_kw(model): prefilled_cache(prefilled)},
                         use_cache=True, position_ids=torch.arange(n, n + forced.shape[1] - 1, device=device)[None]
                         ).logits[0]
            logits = torch.cat([prefilled["logits"].reshape(1, -1).to(rest.dtype), rest], 0).float()
        else:
            ids = torch.cat([prompt_ids, forced], 1).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, n - 1:-1].float()
    return math.exp(F.cross_entropy(logits, forced[0].to(device)).item())


def measure_outcomes(nested: NestedModel, tokenizer, prompts: pd.DataFrame, max_new_tokens: int = 32,
                     judge=None) -> pd.DataFrame:
    """Return one row per (prompt, level): tokens/s, seconds, perplexity of the unpruned answer, cache size, answer;
    with a `judge` (evaluation.SemanticJudge) also `retention`, the level's answer vs the unpruned one."""
    from pruning_utils.progress import progress

    rows = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for _, p in progress(list(prompts.iterrows()), desc="outcomes", unit="prompt"):
        ids = _prompt_ids(tokenizer, p["prompt"])
        nested.restore()
        pre = prefill(nested.model, ids)  # the unpruned prompt cache every level that can decodes on from
        reference = None
        for index, name in enumerate(nested.levels):
            switch_s = nested.switch(name)
            shared = pre if nested.shares_prefill() else None
            out = decode(nested.active, ids, max_new_tokens, kv_window=nested.kv_window(), eos_token_id=eos,
                         prefilled=shared)
            reference = reference or out["ids"]  # level 'none' comes first
            rows.append(dict(id=p["id"], level=name, level_index=index, switch_ms=1000 * switch_s,
                             tokens_per_s=out["tokens_per_s"], seconds=out["seconds"], new_tokens=len(out["ids"]),
                             ppl=answer_ppl(nested.active, ids, reference, nested.kv_window(), shared),
                             cache_tokens_max=out["cache_tokens_max"], cache_bytes_max=out["cache_bytes_max"],
                             answer=tokenizer.decode(out["ids"], skip_special_tokens=True).strip(),
                             load_avg=load_avg()))
        nested.restore()
    table = pd.DataFrame(rows)
    if judge is not None:
        from pruning_utils.measure.evaluation import semantic_retention

        reference = table[table["level_index"] == 0].set_index("id")["answer"]
        scored = semantic_retention(list(reference.loc[table["id"]]), list(table["answer"]), judge)
        table["retention"] = [it["cosine"] for it in scored["per_item"]]
    return table


def evaluate(controllers: list[Controller], nested: NestedModel, tokenizer, prompts: pd.DataFrame,
             loads: list[float] | None,
             tps_ref: float, max_new_tokens: int = 32, target: float = 0.8, judge=None,
             retention_weight: float = 0.0) -> pd.DataFrame:
    """Return one row per (controller, test prompt): chosen level, latency, tokens/s, perplexity, reward, retention.

    `prompts` is featurized (`featurize`); every controller sees the same load per prompt (`loads`), or, with `loads`
    None, the machine's live load read just before each prompt (`telemetry.read_telemetry`). Serving a prompt: the
    unpruned model prefills it (its last logits give the entropy feature), the controller chooses, the level decodes
    on from that cache (`NestedModel.shares_prefill`; a level that skips layers prefills again, and the first
    prefill then counts as overhead). A fixed controller needs no features: it prefills only when its level shares
    the cache. Latency counts what a controller costs on top of generation: text features (`feature_ms`), decision,
    switch. The first controller must be 'always none': its answers are the reference of semantic retention.
    `energy_j` is the energy counter's joules over each decode (NaN without one; `energy_source`: 'rapl', 'nvml'
    or 'n/a', `telemetry.EnergyMeter`).
    """
    import dataclasses

    from pruning_utils.adaptive.telemetry import EnergyMeter, read_telemetry
    from pruning_utils.measure.evaluation import semantic_retention

    rows = []
    device = next(nested.model.parameters()).device
    meter = EnergyMeter(prefer_gpu=device.type == "cuda", gpu_index=device.index or 0)
    eos = getattr(tokenizer, "eos_token_id", None)
    names = list(nested.levels)
    for ctrl in controllers:
        for i, (_, p) in enumerate(prompts.iterrows()):
            load = read_telemetry().load if loads is None else loads[i]
            ids = _prompt_ids(tokenizer, p["prompt"])
            nested.restore()
            features, pre, extra_ms = features_from_row(p), None, 0.0
            if ctrl.uses_features and features.entropy is not None:
                pre = prefill(nested.model, ids)
                t0 = time.perf_counter()
                features = dataclasses.replace(features, entropy=entropy_of_logits(pre["logits"]))
                extra_ms = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            index = ctrl.choose(features, p["complexity"], load)
            decide_ms = 1000 * (time.perf_counter() - t0)
            shares = nested.shares_prefill(names[index])
            if shares and pre is None:
                pre = prefill(nested.model, ids)  # still the unpruned level: the switch comes next
            elif not shares and pre is not None:
                extra_ms += 1000 * pre["seconds"]  # prefilled for the feature only
                pre = None
            switch_ms = 1000 * nested.switch(names[index])
            with meter.measure() as energy:
                out = decode(nested.active, ids, max_new_tokens, kv_window=nested.kv_window(), eos_token_id=eos,
                             prefilled=pre)
            overhead_ms = (p["feature_ms"] if ctrl.uses_features else 0.0) + extra_ms + decide_ms + switch_ms
            latency = out["seconds"] + overhead_ms / 1000
            tps = len(out["ids"]) / latency
            rows.append(dict(controller=ctrl.name, id=p["id"], complexity=p["complexity"], load=load,
                             level=names[index],
                             level_index=index, decide_ms=decide_ms, switch_ms=switch_ms, overhead_ms=overhead_ms,
                             latency_s=latency, new_tokens=len(out["ids"]), tokens_per_s=tps,
                             cache_tokens_max=out["cache_tokens_max"], cache_bytes_max=out["cache_bytes_max"],
                             ids=out["ids"], answer=tokenizer.decode(out["ids"], skip_special_tokens=True).strip(),
                             load_avg=load_avg(),  # the machine's own load, beside the simulated `load`
                             energy_j=float("nan") if energy.joules is None else energy.joules,
                             energy_source=energy.source))
            nested.restore()  # reversible: every prompt starts from the unpruned model
    table = pd.DataFrame(rows)
    reference = table[table["controller"] == controllers[0].name].set_index("id")
    nested.restore()
    by_id = prompts.set_index("id")["prompt"]
    served = {}  # one unpruned prefill per prompt, shared by every controller's row (a copy is decoded on)
    for pid in table["id"].unique():
        ids = _prompt_ids(tokenizer, by_id.loc[pid])
        served[pid] = (ids, prefill(nested.model, ids))
    ppl = []
    for r in table.itertuples():
        ids, pre = served[r.id]
        nested.switch(r.level)
        ppl.append(answer_ppl(nested.active, ids, reference.loc[r.id, "ids"], nested.kv_window(),
                              pre if nested.shares_prefill() else None))
    nested.restore()
    table["ppl"] = ppl
    retention = semantic_retention(list(reference.loc[table["id"], "answer"]), list(table["answer"]), judge)
    table["retention"] = [it["cosine"] for it in retention["per_item"]]
    table["reward"] = [reward(r.tokens_per_s, r.ppl, r.load, tps_ref, target, r.retention, retention_weight)
                       for r in table.itertuples()]
    table["reward_ppl_only"] = [reward(r.tokens_per_s, r.ppl, r.load, tps_ref, target) for r in table.itertuples()]
    return table.drop(columns=["ids"])


def summarize(table: pd.DataFrame, baseline: str = "always_none") -> pd.DataFrame:
    """Return one row per controller: means of latency, tokens/s, retention, ppl, reward; per-level counts; the
    speed-up and retention relative to `baseline`."""
    g = table.groupby("controller", sort=False)
    out = g.agg(n_prompts=("id", "size"), latency_s=("latency_s", "mean"), tokens_per_s=("tokens_per_s", "mean"),
                retention=("retention", "mean"), ppl=("ppl", "mean"), reward=("reward", "mean"),
                reward_ppl_only=("reward_ppl_only", "mean"), load=("load", "mean"),
                switch_ms_mean=("switch_ms", "mean"), switch_ms_max=("switch_ms", "max"),
                overhead_ms=("overhead_ms", "mean"), cache_bytes_max=("cache_bytes_max", "max"),
                **({"load_avg": ("load_avg", "mean")} if "load_avg" in table.columns else {}),
                **({"energy_j": ("energy_j", "mean")} if "energy_j" in table.columns else {})).reset_index()
    out["level_counts"] = [";".join(f"{k}={v}" for k, v in part["level"].value_counts().sort_index().items())
                           for _, part in g]
    base = out.set_index("controller").loc[baseline]
    out["speedup_pct"] = 100 * (out["tokens_per_s"] / base["tokens_per_s"] - 1)
    out["retention_pct"] = 100 * out["retention"] / base["retention"]
    return out
