"""The DQN level controller (pruning_utils/adaptive/dqn.py) on synthetic outcome tables, and the energy counters of
the adaptive runtime (telemetry.py) on a fake sysfs."""
import collections
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pruning_utils import paths
from pruning_utils.adaptive import controller, dqn, experiment, telemetry
from pruning_utils.atomic import write_manifest

LEVELS = ["none", "kv:16", "ffn:0.25", "int8"]
KW = dict(epochs=6, seed=0)


def _table(n_prompts=24, best=None, seed=0):
    """Outcomes of 4 levels on synthetic prompts: faster levels lose quality on complex prompts, so the best level
    depends on the prompt and the load; with `best`, that level has the lowest perplexity everywhere (at equal
    speed), so it is the best answer to every prompt under every load."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i}" for i in range(n_prompts)]
    cx = rng.uniform(0, 1, n_prompts)
    rows = [dict(id=pid, level=lv, level_index=k,
                 tokens_per_s=10.0 if best is not None else 10.0 * (1 + 0.5 * k),
                 ppl=(1.0 if k == best else 6.0) if best is not None else 2 + 0.3 * k * (1 + 2 * cx[i]),
                 retention=1.0 if best is not None else 1 - 0.08 * k * cx[i])
            for i, pid in enumerate(ids) for k, lv in enumerate(LEVELS)]
    prompts = pd.DataFrame(dict(id=ids, n_tokens=rng.integers(4, 100, n_prompts), question=False, imperative=True,
                                code=rng.random(n_prompts) < 0.3, math=rng.random(n_prompts) < 0.3, entities=0,
                                clauses=1, entropy=rng.uniform(0, 5, n_prompts), complexity=cx))
    return pd.DataFrame(rows), prompts


def _actions(policy, prompts, loads=(0.0, 0.3, 0.6, 0.9)):
    return [policy.choose(controller.features_from_row(r), r["complexity"], lo)
            for _, r in prompts.iterrows() for lo in loads]


@pytest.fixture(scope="module")
def trained():
    outcomes, prompts = _table()
    return outcomes, prompts, dqn.train_dqn(outcomes, prompts, 4, 10.0, retention_weight=1.0, levels=LEVELS, **KW)


def test_training_is_seeded_and_deterministic(trained):
    outcomes, prompts, a = trained
    b = dqn.train_dqn(outcomes, prompts, 4, 10.0, retention_weight=1.0, levels=LEVELS, **KW)
    ta, tb = a.state_tensors(), b.state_tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.history == b.history and a.losses == b.losses and len(a.history) == KW["epochs"] * len(prompts)
    assert _actions(a, prompts) == _actions(b, prompts)
    other = dqn.train_dqn(outcomes, prompts, 4, 10.0, retention_weight=1.0, epochs=KW["epochs"], seed=1)
    assert not torch.equal(other.state_tensors()["q.0.weight"], ta["q.0.weight"])
    # the global generator is left alone: seeding is local to the policy
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    dqn.DQNController(4, seed=5)
    assert torch.equal(torch.rand(3), before)


def test_rewards_are_the_bandits(trained):
    outcomes, prompts, policy = trained
    table = controller.outcome_table(outcomes)
    for _, pid, load, arm, r in policy.history[:50]:
        assert r == controller.outcome_reward(table, pid, arm, load, 10.0, 0.8, 1.0)
    tps, ppl, ret = table[("p0", 2)]
    assert controller.outcome_reward(table, "p0", 2, 0.4, 10.0, 0.8, 1.0) == controller.reward(
        tps, ppl, 0.4, 10.0, 0.8, ret, 1.0)
    with pytest.raises(ValueError, match="lacks"):
        dqn.train_dqn(outcomes[outcomes["level_index"] != 3], prompts, 4, 10.0, epochs=1)


def test_saved_policy_reloads_and_gives_the_same_actions(trained, tmp_path):
    outcomes, prompts, policy = trained
    folder = policy.save(tmp_path / "policy")
    assert policy.path == folder and (folder / "manifest.json").is_file()
    again = dqn.DQNController.load(folder, n_levels=4, levels=LEVELS)
    assert not again.training and again.path == folder and again.meta == policy.meta
    assert _actions(again, prompts) == _actions(policy, prompts)
    grid = [controller.context(controller.features_from_row(prompts.iloc[0]), c, lo)
            for c in np.linspace(0, 1, 5) for lo in np.linspace(0, 1, 5)]
    assert all(np.array_equal(again.q_values(x), policy.q_values(x)) for x in grid)


def test_loading_refuses_a_policy_for_other_levels_or_context(trained, tmp_path):
    policy = trained[2]
    folder = policy.save(tmp_path / "policy")
    with pytest.raises(ValueError, match="4 levels.*runtime has 3"):
        dqn.DQNController.load(folder, n_levels=3)
    with pytest.raises(ValueError, match="trained for the levels"):
        dqn.DQNController.load(folder, n_levels=4, levels=["none", "kv:8", "ffn:0.25", "int8"])
    info = json.loads((folder / dqn.CONFIG_FILE).read_text())
    (folder / dqn.CONFIG_FILE).write_text(json.dumps(dict(info, context=info["context"][:-1])))
    with pytest.raises(ValueError, match="damaged"):  # changed after it was saved
        dqn.DQNController.load(folder)
    write_manifest(folder)
    with pytest.raises(ValueError, match="context"):
        dqn.DQNController.load(folder)
    with pytest.raises(FileNotFoundError, match="no saved DQN policy"):
        dqn.DQNController.load(tmp_path / "nothing")


def test_eval_mode_neither_explores_nor_updates(trained):
    outcomes, prompts, policy = trained
    assert not policy.training
    weights, size = policy.state_tensors(), policy.buffer.size
    policy.epsilon = 1.0  # exploration would pick at random: test mode ignores it
    f, c = controller.features_from_row(prompts.iloc[0]), prompts.iloc[0]["complexity"]
    assert len({policy.choose(f, c, 0.5) for _ in range(20)}) == 1
    with pytest.raises(RuntimeError, match="test mode"):
        policy.observe(controller.context(f, c, 0.5), 0, 1.0)
    assert policy.buffer.size == size and all(torch.equal(v, weights[k]) for k, v in policy.state_tensors().items())
    explorer = dqn.DQNController(4, seed=0)
    explorer.training, explorer.epsilon = True, 1.0
    assert len({explorer.choose(f, c, 0.5) for _ in range(40)}) > 1


def test_dqn_learns_an_obvious_table():
    outcomes, prompts = _table(n_prompts=30, best=2, seed=1)
    policy = dqn.train_dqn(outcomes, prompts, 4, 10.0, epochs=10, seed=0)
    actions = _actions(policy, prompts, loads=np.linspace(0, 0.9, 4))
    assert np.mean(np.array(actions) == 2) >= 0.9


def test_experiment_trains_saves_and_loads_the_dqn(trained, tmp_path, monkeypatch):
    outcomes, prompts, _ = trained
    monkeypatch.setattr(paths, "MODELS_DIR", tmp_path / "models")
    kw = dict(epochs=2, seed=0, load_range=(0.0, 0.9))
    assert experiment.dqn_policy(outcomes, prompts, LEVELS, 10.0, 0.5, False, **kw) is None
    policy = experiment.dqn_policy(outcomes, prompts, LEVELS, 10.0, 0.5, **kw)
    assert policy.path == tmp_path / "models" / experiment.DQN_FOLDER and policy.meta["retention_weight"] == 0.5
    loaded = experiment.dqn_policy(outcomes, prompts, LEVELS, 10.0, 0.5, True, str(policy.path), **kw)
    assert loaded.path == policy.path and _actions(loaded, prompts) == _actions(policy, prompts)
    with pytest.raises(ValueError, match="levels"):
        experiment.dqn_policy(outcomes, prompts, LEVELS[:3], 10.0, 0.5, True, str(policy.path))
    bandit = controller.train_bandit(outcomes, prompts, 4, 10.0, epochs=2)
    ctrls = experiment.controllers(4, prompts, bandit, policy)
    assert [c.name for c in ctrls] == ["always_none", "always_max", "rules", "learned", "dqn"]
    assert [c.name for c in experiment.controllers(4, prompts, bandit, None)][-1] == "learned"
    assert experiment.training_rewards(bandit, policy).shape == (2, 2)


# ---------------------------------------------------------------------------------------------------------- energy


def _zone(root, name, energy, span=1_000_000_000):
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{span}\n")


def test_rapl_counters_give_joules_and_unwrap(tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry, "_nvml_handle", lambda index=0: None)
    _zone(tmp_path, "intel-rapl:0", 5_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 1_000_000)  # a sub-zone: counted in its package already
    _zone(tmp_path, "intel-rapl:1", 990_000_000)
    assert [z.name for z in telemetry.rapl_zones(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    meter = telemetry.EnergyMeter(rapl_root=tmp_path)
    assert meter.source == "rapl"
    with meter.measure() as span:
        _zone(tmp_path, "intel-rapl:0", 7_500_000)  # +2.5 J
        _zone(tmp_path, "intel-rapl:1", 10_000_000)  # wrapped: +20 J
    assert span.source == "rapl" and span.joules == pytest.approx(22.5) and span.seconds >= 0
    assert telemetry.rapl_joules({"a": (10, 100)}, {"a": (30, 100)}) == pytest.approx(20e-6)


def test_no_counter_reads_not_available(tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry, "_nvml_handle", lambda index=0: None)
    assert telemetry.read_rapl(tmp_path / "missing") is None
    meter = telemetry.EnergyMeter(rapl_root=tmp_path / "missing")
    with meter.measure() as span:
        pass
    assert meter.source == "n/a" and span.joules is None
    _zone(tmp_path, "intel-rapl:0", 5)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(telemetry.Path, "read_text", denied)  # root-only counters (Linux >= 5.10)
    assert telemetry.read_rapl(tmp_path) is None and telemetry.EnergyMeter(rapl_root=tmp_path).source == "n/a"


def test_battery_reads_psutil_or_nothing(monkeypatch, tmp_path):
    import psutil

    monkeypatch.setattr(telemetry, "_nvml_handle", lambda index=0: None)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None, raising=False)
    assert telemetry.battery() is None
    battery = collections.namedtuple("sbattery", "percent secsleft power_plugged")
    monkeypatch.setattr(psutil, "sensors_battery", lambda: battery(57.0, 3600, False), raising=False)
    assert telemetry.battery() == dict(battery_percent=57.0, power_plugged=False)
    assert telemetry.power_status(tmp_path) == dict(energy_source="n/a", battery_percent=57.0, power_plugged=False)
