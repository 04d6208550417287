"""Per-prompt choice of a pruning level: the reward, the prompt set and its split, rules, a contextual bandit,
fixed baselines, and the measurement loops that feed and evaluate them (notebook 05).

Reward of answering a prompt at a level under load L (the issue's 0.6 * tokens/s - 0.4 * perplexity / 10):

    reward = 0.6 * min(1, tokens/s * (1 - L) / (target * tokens/s of the unpruned model at no load)) - 0.4 * ppl / 10

The speed term is normalised to a service target: the share of the CPU left to the model, (1 - L), slows every level
alike, and speed beyond the target earns nothing; so at low load the unpruned model wins and under load pruning pays.
`ppl` is the level's perplexity of the unpruned model's answer to that prompt (teacher-forced, KV window applied):
how far the level drifts from the answer it replaces.

Rules (`RULES`, complexity bin x load bin -> pruning intensity in [0, 1], 0 = 'none', 1 = the last level):

    complexity \\ load   low   mid   high
    low                 0.5   1.0   1.0
    mid                 0.0   0.5   1.0
    high                0.0   0.0   0.5

Bin edges: complexity tertiles of the training split (`RuleController.fit`), load 1/3 and 2/3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .adaptive import NestedModel, decode
from .complexity import PromptFeatures, complexity, prompt_features

SPEED_WEIGHT, PPL_WEIGHT, PPL_SCALE = 0.6, 0.4, 10.0
BINS = ("low", "mid", "high")
RULES: dict[tuple[str, str], float] = {
    ("low", "low"): 0.5, ("low", "mid"): 1.0, ("low", "high"): 1.0,
    ("mid", "low"): 0.0, ("mid", "mid"): 0.5, ("mid", "high"): 1.0,
    ("high", "low"): 0.0, ("high", "mid"): 0.0, ("high", "high"): 0.5,
}


def reward(tokens_per_s: float, ppl: float, load: float, tps_ref: float, target: float = 0.8) -> float:
    """Return the reward of one answer (module docstring): speed normalised to `target` x `tps_ref`, minus ppl / 10."""
    speed = min(1.0, tokens_per_s * (1.0 - load) / (target * tps_ref))
    return SPEED_WEIGHT * speed - PPL_WEIGHT * ppl / PPL_SCALE


# ------------------------------------------------------------------------------------------------ prompt set


def prompt_pool() -> pd.DataFrame:
    """Return the project's packaged prompts (judge + training instructions) as a table id, category, source, prompt."""
    from .evaluation import PROMPTS_FILE, TRAIN_PROMPTS_FILE, load_instructions

    rows = [dict(id=it["id"], category=it["category"], source=src, prompt=it["prompt"])
            for src, path in (("judge", PROMPTS_FILE), ("train", TRAIN_PROMPTS_FILE)) for it in load_instructions(path)]
    return pd.DataFrame(rows)


def load_prompt_csv(path: str | Path) -> pd.DataFrame:
    """Return a prompt CSV (any columns, one of them `prompt`); raises ValueError without a `prompt` column."""
    df = pd.read_csv(path)
    if "prompt" not in df.columns:
        raise ValueError(f"{path} has no 'prompt' column (columns: {', '.join(map(str, df.columns))}); "
                         "give a CSV with one prompt per row in a column named 'prompt'")
    df = df[df["prompt"].astype(str).str.strip() != ""].dropna(subset=["prompt"]).reset_index(drop=True)
    if "id" not in df.columns:
        df.insert(0, "id", [f"p{i}" for i in range(len(df))])
    elif df["id"].duplicated().any():
        raise ValueError(f"{path}: the 'id' column repeats {sorted(df['id'][df['id'].duplicated()].astype(str))[:5]}; "
                         "make the ids unique or drop the column (rows are then numbered)")
    return df


def split_prompts(df: pd.DataFrame, seed: int = 0, train_frac: float = 0.8, n: int | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return a seeded (train, test) split of `n` rows drawn from the table (all rows when n is None)."""
    order = np.random.default_rng(seed).permutation(len(df))[: n or len(df)]
    cut = max(1, min(len(order) - 1, round(train_frac * len(order))))
    return df.iloc[order[:cut]].reset_index(drop=True), df.iloc[order[cut:]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- controllers


def context(features: PromptFeatures, score: float, load: float) -> np.ndarray:
    """Return the bandit's context vector: bias, complexity, load, their product and the raw prompt features."""
    return np.array([1.0, score, load, score * load, min(features.n_tokens / 128, 1.0), float(features.code),
                     float(features.math), features.entropy or 0.0])


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
    dim: int = 8
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


def train_bandit(outcomes: pd.DataFrame, prompts: pd.DataFrame, n_levels: int, tps_ref: float, epochs: int = 30,
                 seed: int = 0, load_range: tuple[float, float] = (0.0, 0.9), target: float = 0.8,
                 alpha: float = 0.5) -> LinUCB:
    """Return a LinUCB policy trained on the measured outcomes of the training prompts (seeded, deterministic).

    Each round takes a prompt (a seeded shuffle per epoch) and a simulated load, lets the bandit pick one level and
    reveals only that level's reward, computed from the measured tokens/s and perplexity of (prompt, level).
    `prompts` needs columns id, complexity and the feature columns; `outcomes` id, level_index, tokens_per_s, ppl.
    """
    from .telemetry import SimulatedLoad

    table = {(r.id, int(r.level_index)): (r.tokens_per_s, r.ppl) for r in outcomes.itertuples()}
    rng = np.random.default_rng(seed)
    load = SimulatedLoad(seed, *load_range)
    policy = LinUCB(n_levels, alpha=alpha)
    feats = [features_from_row(r) for _, r in prompts.iterrows()]
    for epoch in range(epochs):
        for i in rng.permutation(len(prompts)):
            row, lo = prompts.iloc[i], load().load
            x = context(feats[i], row["complexity"], lo)
            arm = int(np.argmax(policy.scores(x, explore=True)))
            tps, ppl = table[(row["id"], arm)]
            r = reward(tps, ppl, lo, tps_ref, target)
            policy.update(x, arm, r)
            policy.history.append((epoch, row["id"], lo, arm, r))
    return policy


# ------------------------------------------------------------------------------------------------ measurement


FEATURE_COLUMNS = ("n_tokens", "question", "imperative", "code", "math", "entities", "clauses", "entropy")


def features_from_row(row) -> PromptFeatures:
    """Return the PromptFeatures stored in a table row (the columns `FEATURE_COLUMNS`)."""
    entropy = row["entropy"]
    return PromptFeatures(int(row["n_tokens"]), bool(row["question"]), bool(row["imperative"]), bool(row["code"]),
                          bool(row["math"]), int(row["entities"]), int(row["clauses"]),
                          None if entropy is None or pd.isna(entropy) else float(entropy))


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    from .evaluation import format_prompt

    templated = bool(getattr(tokenizer, "chat_template", None))
    return torch.tensor([tokenizer.encode(format_prompt(tokenizer, prompt), add_special_tokens=not templated)])


def featurize(prompts: pd.DataFrame, tokenizer, model=None) -> pd.DataFrame:
    """Return the prompt table with the feature columns, `complexity` and `feature_ms` added (entropy needs model)."""
    rows = []
    for prompt in prompts["prompt"]:
        t0 = time.perf_counter()
        f = prompt_features(prompt, tokenizer, model)
        score = complexity(f)
        rows.append({**f.to_dict(), "complexity": score, "feature_ms": 1000 * (time.perf_counter() - t0)})
    return pd.concat([prompts.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def answer_ppl(model, prompt_ids: torch.Tensor, answer: list[int], kv_window: int = 0) -> float:
    """Return a level's perplexity of a given answer after the prompt (with the KV window when it has one)."""
    import math

    import torch.nn.functional as F

    forced = torch.tensor([answer])
    if kv_window:
        return decode(model, prompt_ids, forced=forced, kv_window=kv_window)["ppl"]
    ids = torch.cat([prompt_ids, forced], 1).to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.shape[1] - 1:-1].float()
    return math.exp(F.cross_entropy(logits, ids[0, prompt_ids.shape[1]:]).item())


def measure_outcomes(nested: NestedModel, tokenizer, prompts: pd.DataFrame, max_new_tokens: int = 32) -> pd.DataFrame:
    """Return one row per (prompt, level): tokens/s, seconds, perplexity of the unpruned answer, cache size, answer."""
    from .progress import progress

    rows = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for _, p in progress(list(prompts.iterrows()), desc="outcomes", unit="prompt"):
        ids = _prompt_ids(tokenizer, p["prompt"])
        reference = None
        for index, name in enumerate(nested.levels):
            switch_s = nested.switch(name)
            out = decode(nested.active, ids, max_new_tokens, kv_window=nested.kv_window(), eos_token_id=eos)
            reference = reference or out["ids"]  # level 'none' comes first
            rows.append(dict(id=p["id"], level=name, level_index=index, switch_ms=1000 * switch_s,
                             tokens_per_s=out["tokens_per_s"], seconds=out["seconds"], new_tokens=len(out["ids"]),
                             ppl=answer_ppl(nested.active, ids, reference, nested.kv_window()),
                             cache_tokens_max=out["cache_tokens_max"], cache_bytes_max=out["cache_bytes_max"],
                             answer=tokenizer.decode(out["ids"], skip_special_tokens=True).strip()))
        nested.restore()
    return pd.DataFrame(rows)


def evaluate(controllers: list[Controller], nested: NestedModel, tokenizer, prompts: pd.DataFrame, loads: list[float],
             tps_ref: float, max_new_tokens: int = 32, target: float = 0.8, judge=None) -> pd.DataFrame:
    """Return one row per (controller, test prompt): chosen level, latency, tokens/s, perplexity, reward, retention.

    `prompts` is featurized (`featurize`); every controller sees the same load per prompt. Latency counts what a
    controller costs on top of generation: its features (`feature_ms`, incl. the entropy forward), decision and
    switch. The first controller must be 'always none': its answers are the reference of semantic retention.
    """
    from .evaluation import semantic_retention

    rows = []
    eos = getattr(tokenizer, "eos_token_id", None)
    names = list(nested.levels)
    for ctrl in controllers:
        for (_, p), load in zip(prompts.iterrows(), loads):
            ids = _prompt_ids(tokenizer, p["prompt"])
            t0 = time.perf_counter()
            index = ctrl.choose(features_from_row(p), p["complexity"], load)
            decide_ms = 1000 * (time.perf_counter() - t0)
            switch_ms = 1000 * nested.switch(names[index])
            out = decode(nested.active, ids, max_new_tokens, kv_window=nested.kv_window(), eos_token_id=eos)
            overhead_ms = (p["feature_ms"] if ctrl.uses_features else 0.0) + decide_ms + switch_ms
            latency = out["seconds"] + overhead_ms / 1000
            tps = len(out["ids"]) / latency
            rows.append(dict(controller=ctrl.name, id=p["id"], complexity=p["complexity"], load=load, level=names[index],
                             level_index=index, decide_ms=decide_ms, switch_ms=switch_ms, overhead_ms=overhead_ms,
                             latency_s=latency, new_tokens=len(out["ids"]), tokens_per_s=tps,
                             cache_tokens_max=out["cache_tokens_max"], cache_bytes_max=out["cache_bytes_max"],
                             ids=out["ids"], answer=tokenizer.decode(out["ids"], skip_special_tokens=True).strip()))
            nested.restore()  # reversible: every prompt starts from the unpruned model
    table = pd.DataFrame(rows)
    reference = table[table["controller"] == controllers[0].name].set_index("id")
    ppl = []
    for r in table.itertuples():
        nested.switch(r.level)
        ppl.append(answer_ppl(nested.active, _prompt_ids(tokenizer, prompts.set_index("id").loc[r.id, "prompt"]),
                              reference.loc[r.id, "ids"], nested.kv_window()))
    nested.restore()
    table["ppl"] = ppl
    table["reward"] = [reward(r.tokens_per_s, r.ppl, r.load, tps_ref, target) for r in table.itertuples()]
    retention = semantic_retention(list(reference.loc[table["id"], "answer"]), list(table["answer"]), judge)
    table["retention"] = [it["cosine"] for it in retention["per_item"]]
    return table.drop(columns=["ids"])


def summarize(table: pd.DataFrame, baseline: str = "always_none") -> pd.DataFrame:
    """Return one row per controller: means of latency, tokens/s, retention, ppl, reward; per-level counts; the
    speed-up and retention relative to `baseline`."""
    g = table.groupby("controller", sort=False)
    out = g.agg(n_prompts=("id", "size"), latency_s=("latency_s", "mean"), tokens_per_s=("tokens_per_s", "mean"),
                retention=("retention", "mean"), ppl=("ppl", "mean"), reward=("reward", "mean"),
                switch_ms_mean=("switch_ms", "mean"), switch_ms_max=("switch_ms", "max"),
                overhead_ms=("overhead_ms", "mean"), cache_bytes_max=("cache_bytes_max", "max")).reset_index()
    out["level_counts"] = [";".join(f"{k}={v}" for k, v in part["level"].value_counts().sort_index().items())
                           for _, part in g]
    base = out.set_index("controller").loc[baseline]
    out["speedup_pct"] = 100 * (out["tokens_per_s"] / base["tokens_per_s"] - 1)
    out["retention_pct"] = 100 * out["retention"] / base["retention"]
    return out
