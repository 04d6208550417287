"""A DQN level controller: a small Q-network (context -> one Q value per level), a replay buffer, epsilon-greedy
exploration with a linear decay and a target network, trained offline on the measured outcome table the bandit
learns from (`controller.outcome_table`, `controller.outcome_reward`), with the same seeded simulated loads.

One decision is one episode: the level chosen for a prompt changes neither the next prompt nor the simulated load,
so the default discount `gamma = 0` makes the Q target the reward itself (the bandit's objective, learned by a
non-linear function instead of one ridge regression per level). With `gamma > 0` the target bootstraps from the
target network on the next request of the stream.

Train mode (`train`) explores and updates; test mode (`eval`, where `train` leaves it) is greedy and never updates.
`save` writes the weights (safetensors) and a JSON of the hyper-parameters, the context names and the levels;
`DQNController.load` refuses a policy trained for other levels or another context.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pruning_utils.adaptive import controller
from pruning_utils.adaptive.controller import CONTEXT_NAMES, Controller, context, features_from_row
from pruning_utils.atomic import atomic_folder

POLICY_FORMAT = "semantic-llm-pruning-dqn/1"
WEIGHTS_FILE, CONFIG_FILE = "policy.safetensors", "policy.json"


@dataclass
class DQNConfig:
    """Hyper-parameters of the Q-network and its training (saved with the policy)."""

    hidden: int = 64
    lr: float = 1e-3
    batch: int = 64
    warmup: int = 32  # transitions stored before the first update (batches are drawn with replacement)
    buffer: int = 10_000
    gamma: float = 0.0
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay: float = 0.5  # share of the training steps over which epsilon falls linearly to eps_end
    target_every: int = 100  # steps between copies of the online network into the target network
    updates_per_step: int = 2


def _q_network(dim: int, hidden: int, n_levels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_levels))


class ReplayBuffer:
    """A ring buffer of (context, level, reward, next context, done) transitions, sampled with a numpy generator."""

    def __init__(self, capacity: int, dim: int):
        self.x = np.zeros((capacity, dim), np.float32)
        self.next_x = np.zeros((capacity, dim), np.float32)
        self.arm = np.zeros(capacity, np.int64)
        self.r = np.zeros(capacity, np.float32)
        self.done = np.ones(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, x: np.ndarray, arm: int, r: float, next_x: np.ndarray | None = None) -> None:
        """Store one transition (`next_x` None: the episode ended)."""
        i = self.pos
        self.x[i], self.arm[i], self.r[i] = x, arm, r
        self.done[i] = float(next_x is None)
        self.next_x[i] = 0.0 if next_x is None else next_x
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """Return `n` transitions drawn uniformly (with replacement) as tensors."""
        i = rng.integers(0, self.size, n)
        return tuple(torch.from_numpy(a[i]) for a in (self.x, self.arm, self.r, self.next_x, self.done))


@dataclass
class DQNController(Controller):
    """Chooses a level by the largest Q value of `context(features, score, load)` (epsilon-greedy in train mode)."""

    n_levels: int
    seed: int = 0
    config: DQNConfig = field(default_factory=DQNConfig)
    levels: list[str] | None = None  # level names, checked when a saved policy is loaded
    history: list = field(default_factory=list)  # (epoch, id, load, level, reward), as LinUCB's
    losses: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # what the training ran on (reward weights, epochs, seconds)

    name = "dqn"
    uses_features = True

    def __post_init__(self):
        if self.levels is not None and len(self.levels) != self.n_levels:
            raise ValueError(f"{len(self.levels)} level names for {self.n_levels} levels")
        dim = len(CONTEXT_NAMES)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the global generator
            torch.manual_seed(self.seed)
            self.q = _q_network(dim, self.config.hidden, self.n_levels)
            self.target = _q_network(dim, self.config.hidden, self.n_levels)
        self.target.load_state_dict(self.q.state_dict())
        self.x_mean, self.x_std = torch.zeros(dim), torch.ones(dim)  # input standardisation (training contexts)
        self.rng = np.random.default_rng(self.seed)
        self.buffer = ReplayBuffer(self.config.buffer, dim)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=self.config.lr)
        self.epsilon, self.steps, self.training = self.config.eps_start, 0, False
        self.path: Path | None = None  # the folder it was saved to or loaded from

    # --------------------------------------------------------------------------------------------- acting

    def q_values(self, x: np.ndarray) -> np.ndarray:
        """Return the online network's Q value of each level for one context vector."""
        with torch.no_grad():
            return self.q(self._scale(torch.as_tensor(np.asarray(x, np.float32))[None]))[0].numpy()

    def act(self, x: np.ndarray) -> int:
        """Return a level: random with probability epsilon in train mode, else the largest Q value."""
        if self.training and self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.n_levels))
        return int(np.argmax(self.q_values(x)))

    def choose(self, features, score, load) -> int:
        return self.act(context(features, score, load))

    def eval(self) -> "DQNController":
        """Switch to test mode (greedy, no updates); returns self."""
        self.training = False
        self.q.eval()
        return self

    # -------------------------------------------------------------------------------------------- training

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def observe(self, x: np.ndarray, arm: int, r: float, next_x: np.ndarray | None = None) -> float | None:
        """Store one transition and take `updates_per_step` gradient steps once a batch is there; returns the last
        loss (None before the first step). Raises RuntimeError in test mode."""
        if not self.training:
            raise RuntimeError("the DQN policy is in test mode (eval()): it takes no updates; train it with "
                               "train(...) or train_dqn(...)")
        self.buffer.add(np.asarray(x, np.float32), arm, r, None if next_x is None else np.asarray(next_x, np.float32))
        self.steps += 1
        loss = None
        if self.buffer.size >= min(self.config.warmup, self.config.batch):
            for _ in range(self.config.updates_per_step):
                loss = self._update()
        if self.steps % self.config.target_every == 0:
            self.target.load_state_dict(self.q.state_dict())
        return loss

    def _update(self) -> float:
        x, arm, r, next_x, done = self.buffer.sample(self.config.batch, self.rng)
        q = self.q(self._scale(x)).gather(1, arm[:, None])[:, 0]
        with torch.no_grad():
            target = r
            if self.config.gamma:
                target = r + self.config.gamma * (1 - done) * self.target(self._scale(next_x)).max(1).values
        loss = nn.functional.smooth_l1_loss(q, target)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.q.parameters(), 10.0)
        self.optimizer.step()
        return loss.detach().item()

    def train(self, outcomes: pd.DataFrame, prompts: pd.DataFrame, tps_ref: float, epochs: int = 30,
              load_range: tuple[float, float] = (0.0, 0.9), target: float = 0.8,
              retention_weight: float = 0.0) -> "DQNController":
        """Train on the measured outcomes of `prompts` (as `controller.train_bandit`: a seeded shuffle of the prompts
        per epoch, a seeded simulated load per round, the reward of the chosen level revealed), then switch to test
        mode; returns self."""
        from pruning_utils.adaptive.telemetry import SimulatedLoad

        t0 = time.perf_counter()
        table = controller.outcome_table(outcomes)
        missing = [(pid, k) for pid in prompts["id"] for k in range(self.n_levels) if (pid, k) not in table]
        if missing:
            raise ValueError(f"the outcome table lacks {len(missing)} (prompt, level) pairs, e.g. {missing[:3]}: "
                             f"measure every level of every training prompt (controller.measure_outcomes)")
        feats = [features_from_row(r) for _, r in prompts.iterrows()]
        scores = prompts["complexity"].to_numpy(float)
        load = SimulatedLoad(self.seed, *load_range)
        rounds = [(i, load().load) for _ in range(epochs) for i in self.rng.permutation(len(prompts))]
        xs = np.stack([context(feats[i], scores[i], lo) for i, lo in rounds]).astype(np.float32)
        if not self.steps:  # standardise by the training contexts (constant entries, e.g. the bias, keep scale 1)
            std = np.where(xs.std(0) > 1e-6, xs.std(0), 1.0).astype(np.float32)
            self.x_mean, self.x_std = torch.from_numpy(xs.mean(0)), torch.from_numpy(std)
        self.training = True
        self.q.train()
        decay_steps = max(1, int(self.config.eps_decay * len(rounds)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 64-wide MLP: one thread is fastest, and a fixed count keeps sums reproducible
        try:
            self._train_rounds(rounds, xs, prompts["id"].tolist(), table, decay_steps, tps_ref, target,
                               retention_weight, len(prompts))
        finally:
            torch.set_num_threads(threads)
        self.meta = dict(epochs=epochs + self.meta.get("epochs", 0), tps_ref=tps_ref, target=target,
                         retention_weight=retention_weight, load_range=list(load_range), n_prompts=len(prompts),
                         train_s=round(time.perf_counter() - t0, 3))
        return self.eval()

    def _train_rounds(self, rounds, xs, ids, table, decay_steps, tps_ref, target, retention_weight, n_prompts):
        for k, (i, lo) in enumerate(rounds):
            self.epsilon = max(self.config.eps_end, self.config.eps_start
                               - (self.config.eps_start - self.config.eps_end) * k / decay_steps)
            arm = self.act(xs[k])
            r = controller.outcome_reward(table, ids[i], arm, lo, tps_ref, target, retention_weight)
            loss = self.observe(xs[k], arm, r, xs[k + 1] if k + 1 < len(rounds) else None)
            self.history.append((k // n_prompts, ids[i], lo, arm, r))
            if loss is not None:
                self.losses.append(loss)

    # ------------------------------------------------------------------------------------------ save / load

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return the tensors a saved policy holds: the online network's weights and the input standardisation."""
        return {**{f"q.{k}": v.detach().clone().contiguous() for k, v in self.q.state_dict().items()},
                "x_mean": self.x_mean.clone(), "x_std": self.x_std.clone()}

    def save(self, path: str | Path) -> Path:
        """Write the policy to the folder `path` (atomically: weights, JSON, manifest); returns the folder."""
        from safetensors.torch import save_file

        info = dict(format=POLICY_FORMAT, n_levels=self.n_levels, levels=self.levels, context=list(CONTEXT_NAMES),
                    seed=self.seed, config=asdict(self.config), meta=self.meta)
        with atomic_folder(path) as tmp:
            save_file(self.state_tensors(), str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path, n_levels: int | None = None, levels: list[str] | None = None
             ) -> "DQNController":
        """Return a saved policy in test mode; raises ValueError when it was trained on another context, for another
        number of levels than `n_levels` or for other level names than `levels`."""
        from safetensors.torch import load_file

        from pruning_utils.atomic import folder_problem

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no saved DQN policy ({CONFIG_FILE} and {WEIGHTS_FILE}); give the "
                                    "folder DQNController.save wrote, or '' to train one")
        problem = folder_problem(path)
        if problem:
            raise ValueError(f"the saved DQN policy {path} is damaged: {problem}; train it again")
        info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("format") != POLICY_FORMAT:
            raise ValueError(f"{path} is not a DQN policy of this version (format {info.get('format')!r}, "
                             f"expected {POLICY_FORMAT!r})")
        if info["context"] != list(CONTEXT_NAMES):
            raise ValueError(f"the DQN policy {path} was trained on the context {info['context']}, this code builds "
                             f"{list(CONTEXT_NAMES)}: train it again")
        if n_levels is not None and info["n_levels"] != n_levels:
            raise ValueError(f"the DQN policy {path} chooses among {info['n_levels']} levels "
                             f"({info['levels']}), the runtime has {n_levels}: train it again for these levels")
        if levels is not None and info["levels"] is not None and list(info["levels"]) != list(levels):
            raise ValueError(f"the DQN policy {path} was trained for the levels {info['levels']}, the runtime has "
                             f"{list(levels)}: train it again for these levels")
        policy = cls(info["n_levels"], seed=info["seed"], config=DQNConfig(**info["config"]), levels=info["levels"],
                     meta=info.get("meta", {}))
        tensors = load_file(str(path / WEIGHTS_FILE))
        policy.q.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("q.")})
        policy.target.load_state_dict(policy.q.state_dict())
        policy.x_mean, policy.x_std, policy.path = tensors["x_mean"], tensors["x_std"], path
        return policy.eval()


def train_dqn(outcomes: pd.DataFrame, prompts: pd.DataFrame, n_levels: int, tps_ref: float, epochs: int = 30,
              seed: int = 0, load_range: tuple[float, float] = (0.0, 0.9), target: float = 0.8,
              retention_weight: float = 0.0, levels: list[str] | None = None,
              config: DQNConfig | None = None) -> DQNController:
    """Return a DQN policy in test mode trained on the measured outcomes of the training prompts (seeded,
    deterministic; arguments as `controller.train_bandit`'s)."""
    policy = DQNController(n_levels, seed=seed, config=config or DQNConfig(), levels=levels)
    return policy.train(outcomes, prompts, tps_ref, epochs=epochs, load_range=load_range, target=target,
                        retention_weight=retention_weight)
