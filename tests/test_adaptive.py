"""Adaptive runtime (notebook 05): nested levels, KV window, prompt complexity, telemetry, controllers, evaluation."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from pruning_utils.adaptive import controller, nested_model, telemetry
from pruning_utils.adaptive.complexity import complexity, prompt_features
from pruning_utils.adaptive.telemetry import SimulatedLoad, read_telemetry
from pruning_utils.model import surgery
from pruning_utils.model.tiny import TinyTokenizer, tiny_model
from pruning_utils.prune.scores import Scores

LEVELS = "none,kv:4,heads:0.5,ffn:0.5,heads:0.25+ffn:0.3+layers:0.34"


def _scores(model, seed: int = 1) -> Scores:
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_hidden_layers
    return Scores([torch.rand(model.config.num_attention_heads, generator=g) for _ in range(n)],
                  [torch.rand(model.config.intermediate_size, generator=g) for _ in range(n)], "random")


def _nested(family="llama", levels=LEVELS):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    return nested_model.NestedModel(model, _scores(model), levels, layer_scores=torch.tensor([3.0, 1.0, 2.0])), original


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_each_level_equals_the_model_surgery_builds(family, tokens):
    nested, original = _nested(family)
    for name in nested.levels:
        nested.switch(name)
        kept = nested.kept(name)
        reference = copy.deepcopy(original)
        surgery.prune_heads(reference, kept["heads"])
        surgery.prune_neurons(reference, kept["neurons"])
        surgery.drop_layers(reference, kept["layers"])
        torch.testing.assert_close(_logits(nested.model, tokens), _logits(reference, tokens), atol=1e-5, rtol=0)
    # the levels really are smaller: a GQA-valid head count per group and fewer neurons / layers
    k = nested.kept("heads:0.25+ffn:0.3+layers:0.34")
    assert [len(h) for h in k["heads"].values()] == [6, 6, 6] and k["layers"] == [0, 2]
    assert len(k["neurons"][0]) == 96 - round(0.3 * 96)


def test_restore_and_unnest_return_the_original_logits(tokens):
    nested, original = _nested()
    full = _logits(nested.model, tokens)
    torch.testing.assert_close(full, _logits(original, tokens), atol=1e-5, rtol=0)  # summation order only
    for name in list(nested.levels)[::-1]:
        nested.switch(name)
    nested.restore()
    assert torch.equal(_logits(nested.model, tokens), full)
    assert torch.equal(_logits(nested.unnest(), tokens), _logits(original, tokens))
    assert type(nested.model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_levels_are_views_of_one_set_of_weights():
    nested, _ = _nested()
    storage = lambda: {p.data_ptr() for layer in nested.layers for p in layer.parameters()}  # noqa: E731
    before = storage()
    times = [nested.switch(name) for name in nested.levels for _ in range(5)]
    assert storage() == before  # no copy made by switching (skipped layers included)
    q = nested.model.model.layers[0].self_attn.q_proj
    assert q.size < q.full and q.weight[:q.size].data_ptr() == q.weight.data_ptr()
    assert nested.memory()["overhead_ratio"] <= 1.3
    assert float(np.median(times)) < 0.005, f"median level switch {1000 * np.median(times):.2f} ms"


def test_level_specs_are_checked():
    assert [lv.name for lv in nested_model.parse_levels("none, ffn:0.25")] == ["none", "ffn:0.25"]
    for bad in ("ffn:0.25", "none,mlp:0.2", "none,ffn:1.5", "none,kv:0"):
        with pytest.raises(ValueError, match="level"):
            nested_model.parse_levels(bad)
    with pytest.raises(ValueError, match="layer_scores"):
        nested_model.NestedModel(tiny_model(), _scores(tiny_model()), "none,layers:0.3")


def test_kv_window_caps_the_cache_and_matches_generate_without_it():
    model = tiny_model()
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    free = nested_model.decode(model, prompt, 10)
    reference = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert free["ids"] == reference and free["cache_tokens_max"] == 12 + 9
    capped = nested_model.decode(model, prompt, 10, kv_window=4)
    assert capped["cache_tokens_max"] == nested_model.KV_SINK_TOKENS + 4
    assert capped["cache_bytes_max"] < free["cache_bytes_max"]
    forced = nested_model.decode(model, prompt, forced=torch.tensor(free["ids"]))
    assert forced["ppl"] == pytest.approx(controller.answer_ppl(model, prompt, free["ids"]), rel=1e-4)


def test_complexity_is_monotone_on_an_easy_hard_pair():
    easy = prompt_features("Say hi.")
    hard = prompt_features("Write a Python function that solves 3x^2 + 2x - 5 = 0, explain why the method from "
                           "Cambridge and Paris works, and compare it with the approach NASA used in 1969, "
                           "because the integral of the error matters when the inputs are noisy.")
    assert hard.code and hard.math and hard.entities > easy.entities and hard.clauses > easy.clauses
    assert 0 <= complexity(easy) < complexity(hard) <= 1
    model, tok = tiny_model(), TinyTokenizer()
    with_entropy = prompt_features("Say hi.", tok, model)
    assert 0 <= with_entropy.entropy <= 1 and 0 <= complexity(with_entropy) <= 1


def test_telemetry_live_and_simulated():
    live = read_telemetry()
    assert 0 <= live.load <= 1 and not live.simulated
    a, b = SimulatedLoad(7, 0.2, 0.8).loads(5), SimulatedLoad(7, 0.2, 0.8).loads(5)
    assert a == b and all(0.2 <= x <= 0.8 for x in a)
    with pytest.raises(ValueError, match="low"):
        SimulatedLoad(0, 0.5, 0.2)


@pytest.mark.parametrize("n_levels", [1, 2, 3, 5])
def test_rule_table_covers_every_state(n_levels):
    rules = controller.RuleController(n_levels)
    assert set(controller.RULES) == {(c, lo) for c in controller.BINS for lo in controller.BINS}
    f = prompt_features("Say hi.")
    seen = set()
    for score in (0.0, 0.3, 0.9):
        for load in (0.0, 0.5, 0.95):
            seen.add(rules.state(score, load))
            assert 0 <= rules.choose(f, score, load) < n_levels
    assert seen == set(controller.RULES)
    with pytest.raises(ValueError, match="no entry"):
        controller.RuleController(3, rules={("low", "low"): 0.0})


def test_prompt_csv_needs_a_prompt_column(tmp_path):
    pd.DataFrame({"text": ["a", "b"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        controller.load_prompt_csv(tmp_path / "p.csv")
    pd.DataFrame({"prompt": ["a", "b", "c", "d", "e"]}).to_csv(tmp_path / "q.csv", index=False)
    df = controller.load_prompt_csv(tmp_path / "q.csv")
    train, test = controller.split_prompts(df, seed=0)
    assert len(train) == 4 and len(test) == 1 and set(train["id"]) | set(test["id"]) == set(df["id"])
    assert controller.split_prompts(df, seed=0)[1].equals(test)
    assert len(controller.prompt_pool()) >= 100
    pd.DataFrame({"id": [1, 1], "prompt": ["a", "b"]}).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(ValueError, match="repeats"):
        controller.load_prompt_csv(tmp_path / "r.csv")


class _Judge:
    def similarity(self, a, b):
        return [1.0 if x == y else 0.5 for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def tiny_run():
    torch.manual_seed(0)
    nested, _ = _nested(levels="none,kv:4,ffn:0.5,heads:0.5+ffn:0.5+layers:0.34")
    tok = TinyTokenizer()
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(6)],
                            "prompt": ["Say hi.", "Write code: def f(): return 1;", "What is 2 + 2?",
                                       "Explain why Paris and Rome differ, because history matters.", "List three",
                                       "Compute the integral of x^2."]})
    table = controller.featurize(prompts, tok, nested.model)
    train, test = controller.split_prompts(table, seed=0)
    outcomes = controller.measure_outcomes(nested, tok, train, max_new_tokens=3, judge=_Judge())
    return nested, tok, train, test, outcomes


def test_bandit_training_is_seeded_and_deterministic(tiny_run):
    nested, tok, train, test, outcomes = tiny_run
    assert len(outcomes) == len(train) * len(nested.levels) and outcomes["ppl"].gt(0).all()
    assert (outcomes[outcomes["level"] == "none"]["retention"] == 1.0).all()  # its own answer is the reference
    same = outcomes.merge(outcomes[outcomes["level"] == "none"][["id", "answer"]], on="id", suffixes=("", "_ref"))
    assert ((same["answer"] == same["answer_ref"]) == (same["retention"] == 1.0)).all()
    assert (outcomes.groupby("level")["cache_tokens_max"].max()["kv:4"] <= nested_model.KV_SINK_TOKENS + 4)
    kw = dict(n_levels=len(nested.levels), tps_ref=float(outcomes["tokens_per_s"].median()), epochs=5)
    a = controller.train_bandit(outcomes, train, seed=3, **kw)
    b = controller.train_bandit(outcomes, train, seed=3, **kw)
    assert np.array_equal(a.theta(), b.theta()) and a.history == b.history and len(a.history) == 5 * len(train)
    f = controller.features_from_row(test.iloc[0])
    assert len({a.choose(f, test.iloc[0]["complexity"], 0.5) for _ in range(3)}) == 1  # greedy at test time


def test_evaluation_and_summary_on_the_held_out_split(tiny_run):
    nested, tok, train, test, outcomes = tiny_run
    n = len(nested.levels)
    tps_ref = float(outcomes[outcomes["level"] == "none"]["tokens_per_s"].median())
    ctrls = [controller.Fixed(n, 0, "always_none"), controller.Fixed(n, -1, "always_max"),
             controller.RuleController(n).fit(train["complexity"]),
             controller.train_bandit(outcomes, train, n, tps_ref, epochs=3)]
    table = controller.evaluate(ctrls, nested, tok, test, SimulatedLoad(0).loads(len(test)), tps_ref,
                                max_new_tokens=3, judge=_Judge(), retention_weight=1.0)
    assert np.allclose(table["reward"], table["reward_ppl_only"] - (1.0 - table["retention"]))
    assert len(table) == len(ctrls) * len(test) and nested.current == "none"
    assert (table[table["controller"] == "always_max"]["level"] == list(nested.levels)[-1]).all()
    assert (table[table["controller"] == "always_none"]["retention"] == 1.0).all()
    # energy over each decode where a counter is there (telemetry.EnergyMeter), never a figure without one
    assert table["energy_source"].nunique() == 1 and table["energy_source"].iloc[0] in ("rapl", "nvml", "n/a")
    assert table["energy_j"].isna().all() == (table["energy_source"].iloc[0] == "n/a")
    summary = controller.summarize(table)
    assert list(summary["controller"]) == ["always_none", "always_max", "rules", "learned"]
    assert summary.loc[0, "speedup_pct"] == 0 and summary.loc[0, "retention_pct"] == 100
    from pruning_utils.pipeline import plots

    fig = plots.scatter_trend(table.assign(latency_s=table["latency_s"].where(table.index != 0, 1e3)), "complexity",
                              "latency_s")
    assert fig.axes[0].get_legend() is not None
    assert plots.iqr_inliers([1, 2, 3, 2, 100]).tolist() == [True, True, True, True, False]


def test_reward_is_the_documented_formula():
    assert controller.reward(10, 5, 0.0, 10, target=1.0) == pytest.approx(0.6 - 0.2)
    assert controller.reward(20, 5, 0.0, 10, target=1.0) == pytest.approx(0.6 - 0.2)  # beyond the target: capped
    assert controller.reward(10, 5, 0.5, 10, target=1.0) == pytest.approx(0.3 - 0.2)
    assert controller.reward(10, 5, 0.5, 10, target=1.0, retention=0.8, retention_weight=2.0) == \
        pytest.approx(0.3 - 0.2 - 0.4)
    assert controller.reward(10, 5, 0.5, 10, target=1.0, retention=0.8) == pytest.approx(0.3 - 0.2)  # w = 0


def _synthetic_outcomes(n_prompts=12, fast_retention=0.6):
    """Two levels: 'none' (10 tok/s, retention 1) and a fast one (30 tok/s, slightly worse PPL, lower retention)."""
    ids = [f"p{i}" for i in range(n_prompts)]
    rows = [dict(id=i, level=lv, level_index=k, tokens_per_s=tps, ppl=ppl, retention=ret)
            for i in ids for k, (lv, tps, ppl, ret) in enumerate((("none", 10.0, 2.0, 1.0),
                                                                   ("fast", 30.0, 2.1, fast_retention)))]
    prompts = pd.DataFrame(dict(id=ids, n_tokens=8, question=False, imperative=True, code=False, math=False,
                                entities=0, clauses=1, entropy=None, complexity=np.linspace(0, 1, n_prompts)))
    return pd.DataFrame(rows), prompts


def test_retention_weight_is_the_smallest_that_keeps_the_constraint():
    outcomes, prompts = _synthetic_outcomes()
    kw = dict(epochs=10, seed=0)
    policy, w, grid = controller.fit_retention_weight(outcomes, prompts, 2, 10.0, 0.9, **kw)
    assert list(grid["retention_weight"]) == list(controller.RETENTION_WEIGHTS)
    # without the retention term the fast level wins nearly everywhere and breaks the constraint ...
    assert grid.loc[0, "train_retention"] < 0.9 and grid.loc[0, "share_level_1"] > 0.5
    # ... the chosen w is the first of the grid that keeps it, and its policy is the one returned
    ok = grid[grid["train_retention"] >= 0.9]["retention_weight"]
    assert len(ok) and w == ok.min() and w > 0
    again, w2, grid2 = controller.fit_retention_weight(outcomes, prompts, 2, 10.0, 0.9, **kw)
    assert w2 == w and np.array_equal(again.theta(), policy.theta()) and grid2.equals(grid)
    same = controller.train_bandit(outcomes, prompts, 2, 10.0, retention_weight=w, **kw)
    assert np.array_equal(same.theta(), policy.theta())
    # an unreachable constraint takes the largest weight; outcomes without retention are refused
    assert (controller.fit_retention_weight(outcomes, prompts, 2, 10.0, 1.01, **kw)[1]
            == max(controller.RETENTION_WEIGHTS))
    with pytest.raises(ValueError, match="retention"):
        controller.fit_retention_weight(outcomes.drop(columns=["retention"]), prompts, 2, 10.0, 0.9)


class TestEmbeddedModel:
    """SmolLM2-135M (9 query heads in 3 KV groups, 30 layers): switch time, memory, exact restore on the real model."""

    def test_levels_on_the_embedded_model(self):
        from pruning_utils.model.loading import load_model

        model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
        ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
        original = _logits(model, ids)
        nested = nested_model.NestedModel(model, _scores(model), "none,kv:8,ffn:0.25,heads:0.34+ffn:0.5+layers:0.1",
                                      layer_scores=torch.arange(30.0))
        full = _logits(model, ids)
        torch.testing.assert_close(full, original, atol=1e-3, rtol=0)  # 30 layers of fp32 summation-order noise
        times = []
        for name in nested.levels:
            times += [nested.switch(name) for _ in range(10)]
            assert _logits(model, ids).shape == original.shape
        assert sum(len(h) for h in nested.kept("heads:0.34+ffn:0.5+layers:0.1")["heads"].values()) == 30 * 6
        assert float(np.median(times)) < 0.005 and nested.memory()["overhead_ratio"] <= 1.3
        nested.restore()
        assert torch.equal(_logits(model, ids), full)
        assert torch.equal(_logits(nested.unnest(), ids), original)


def test_refit_levels_equal_the_reconstructed_pruned_model(tokens):
    from pruning_utils.model.arch import layer_shapes
    from pruning_utils.model.plan import PruningPlan
    from pruning_utils.prune.reconstruction import collect_grams, prune_and_reconstruct

    model = tiny_model("llama")
    original = copy.deepcopy(model)
    windows = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(4))
    grams = collect_grams(model, windows)
    nested = nested_model.NestedModel(model, _scores(model), LEVELS, layer_scores=torch.tensor([3.0, 1.0, 2.0]),
                                  grams=grams)
    for name in ("heads:0.5", "ffn:0.5", "heads:0.25+ffn:0.3+layers:0.34"):
        nested.switch(name)
        kept = nested.kept(name)
        plan = PruningPlan.identity(layer_shapes(original))
        plan.heads, plan.neurons = kept["heads"], kept["neurons"]
        plan.layers = kept["layers"] if len(kept["layers"]) < 3 else None
        reference = prune_and_reconstruct(copy.deepcopy(original), plan, None, "lstsq", sequential=False, stats=grams)
        torch.testing.assert_close(_logits(nested.model, tokens), _logits(reference, tokens), atol=1e-5, rtol=0)
        plain = copy.deepcopy(original)  # and the refit changes the level: it is not plain slicing
        surgery.prune_heads(plain, kept["heads"])
        surgery.prune_neurons(plain, kept["neurons"])
        surgery.drop_layers(plain, kept["layers"])
        assert (_logits(nested.model, tokens) - _logits(plain, tokens)).abs().max() > 1e-4
    nested.restore()
    torch.testing.assert_close(_logits(nested.model, tokens), _logits(original, tokens), atol=1e-5, rtol=0)
    assert nested.memory()["refit_bytes"] > 0


def test_int8_level_serves_the_quantized_unpruned_model(tokens):
    from pruning_utils.compress.quantize import quantize_int8

    nested, original = _nested(levels="none,ffn:0.5,int8")
    reference = quantize_int8(original, embedding=False)  # the level keeps the fp32 lookup table (shared)
    nested.switch("int8")
    assert nested.active is nested.int8_model and nested.kv_window() == 0
    # the copy's neurons follow the nested order: the same function up to summation order
    torch.testing.assert_close(_logits(nested.active, tokens), _logits(reference, tokens), atol=1e-4, rtol=0)
    out = nested_model.decode(nested.active, tokens[:1], max_new_tokens=3)
    assert len(out["ids"]) == 3
    assert nested.active.get_input_embeddings() is nested.model.get_input_embeddings()  # shared, not copied
    memory = nested.memory()
    assert memory["int8_bytes"] > 0 and memory["overhead_ratio"] > 1
    nested.restore()
    assert nested.active is nested.model
    torch.testing.assert_close(_logits(nested.model, tokens), _logits(original, tokens), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="int8 is a level of its own"):
        nested_model.parse_levels("none,int8+ffn:0.5")


def test_int8_level_shares_the_projections_it_keeps_in_fp32(tokens):
    from pruning_utils.compress.quantize import quantize_int8
    from pruning_utils.model.arch import decoder_layers, proj

    model = tiny_model("llama")
    original = copy.deepcopy(model)
    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(keep_fp32=("down_proj",), smooth_windows=windows, smooth_alpha=0.5, progress=False)
    plain = nested_model.NestedModel(copy.deepcopy(model), _scores(model), "none,int8", int8_kw=dict(kw, keep_fp32=()))
    nested = nested_model.NestedModel(model, _scores(model), "none,ffn:0.5,int8", int8_kw=kw)
    for layer8, layer in zip(decoder_layers(nested.int8_model), nested.layers):
        assert proj(layer8, "down_proj").weight is proj(layer, "down_proj").weight  # one storage
    reference = quantize_int8(original, embedding=False, **kw)
    nested.switch("int8")
    # the fp32 down_proj sums its (reordered) neurons in another order, and those 1e-7 differences move a few
    # activations of the next layer across an INT8 rounding boundary: well below INT8's own error (a wrong order of
    # gate / up / down rows would put it far above)
    ours, theirs, fp32 = _logits(nested.active, tokens), _logits(reference, tokens), _logits(original, tokens)
    assert (ours - theirs).abs().mean() < 0.5 * (theirs - fp32).abs().mean()
    shared = nested.memory()
    own = sum(proj(layer, "down_proj").weight.numel() * 4 for layer in nested.layers)
    assert shared["int8_bytes"] < plain.memory()["int8_bytes"] < shared["int8_bytes"] + own  # no second fp32 copy
    int8_logits = _logits(nested.active, tokens)
    model_back = nested.unnest()  # the INT8 copy keeps working: it gets its own copy of the shared weights
    assert torch.equal(_logits(nested.int8_model, tokens), int8_logits)
    torch.testing.assert_close(_logits(model_back, tokens), _logits(original, tokens), atol=1e-5, rtol=0)



def test_levels_decode_on_from_the_unpruned_prefill(tokens):
    nested, _ = _nested(levels="none,kv:4,ffn:0.5,heads:0.25+ffn:0.3+layers:0.34")
    ids = tokens[:1, :8]
    pre = nested_model.prefill(nested.model, ids)
    plain = nested_model.decode(nested.model, ids, 6)
    assert nested_model.decode(nested.model, ids, 6, prefilled=pre)["ids"] == plain["ids"]
    assert nested_model.decode(nested.model, ids, 6, prefilled=pre)["ids"] == plain["ids"]  # copied, not consumed
    forced = torch.tensor([plain["ids"]])
    assert nested_model.decode(nested.model, ids, forced=forced, prefilled=pre)["ppl"] == \
        pytest.approx(nested_model.decode(nested.model, ids, forced=forced)["ppl"], rel=1e-5)
    assert nested.shares_prefill("ffn:0.5") and nested.shares_prefill("kv:4")
    assert not nested.shares_prefill("heads:0.25+ffn:0.3+layers:0.34")  # fewer layers than the cache holds
    nested.switch("ffn:0.5")  # a pruned level on the unpruned cache: the first token is the unpruned model's
    hybrid = nested_model.decode(nested.model, ids, 6, prefilled=pre)
    own = nested_model.decode(nested.model, ids, 6)
    assert hybrid["ids"][0] == plain["ids"][0] and len(hybrid["ids"]) == 6
    assert hybrid["seconds"] >= pre["seconds"] and len(own["ids"]) == 6
    with pytest.raises(ValueError, match="prompt tokens"):
        nested_model.decode(nested.model, tokens[:1, :5], 3, prefilled=pre)
    nested.restore()


def test_answer_ppl_from_a_prefill_equals_step_by_step_scoring(tokens):
    nested, _ = _nested(levels="none,ffn:0.5")
    ids, answer = tokens[:1, :8], tokens[0, 8:14].tolist()
    pre = nested_model.prefill(nested.model, ids)
    assert controller.answer_ppl(nested.model, ids, answer, prefilled=pre) == pytest.approx(
        controller.answer_ppl(nested.model, ids, answer), rel=1e-5)  # the same model: the same score
    nested.switch("ffn:0.5")
    stepwise = nested_model.decode(nested.model, ids, forced=torch.tensor([answer]), prefilled=pre)["ppl"]
    assert controller.answer_ppl(nested.model, ids, answer, prefilled=pre) == pytest.approx(stepwise, rel=1e-5)
    nested.restore()


def test_build_nested_follows_the_notebook_parameters(monkeypatch, capsys):
    from pruning_utils.adaptive import experiment
    from pruning_utils.compress import depth
    from pruning_utils.data.sources import calibration_windows, text_parts
    from pruning_utils.model import linears

    tok, kw = TinyTokenizer(), dict(text_source="embedded", n_calib=2, seq_len=16, seed=0)
    model = tiny_model("llama")
    windows = calibration_windows(tok, text_parts("embedded"), n_samples=4, seq_len=16, seed=0)
    influence = torch.tensor(depth.score_layers(copy.deepcopy(model), windows, "block_influence").scores)
    nested = experiment.build_nested(model, tok, _scores(model), "none,heads:0.5+layers:0.34,int8", refit=True,
                                     int8_keep_fp32=["down_proj"], int8_alpha=0.5, **kw)
    assert list(nested.levels) == ["none", "heads:0.5+layers:0.34", "int8"] and nested.int8_model is not None
    assert torch.equal(nested.layer_scores, influence) and nested.refit_s > 0
    monkeypatch.setattr(linears, "int8_applicable", lambda device: False)  # e.g. no torchao installed
    plain = experiment.build_nested(tiny_model("llama"), tok, _scores(model), "none,ffn:0.5,int8", **kw)
    assert list(plain.levels) == ["none", "ffn:0.5"] and plain.layer_scores is None and plain.refit_s == 0
    assert "the int8 level is left out" in capsys.readouterr().out


def test_experiment_steps_split_tabulate_train_and_summarize(tiny_run, monkeypatch):
    from pruning_utils.adaptive import experiment

    nested, tok, train, test, outcomes = tiny_run
    pool = pd.concat([train, test])[["id", "prompt"]].reset_index(drop=True)
    ours = experiment.split_prompts(pool, tok, nested.model, seed=1, n=5)
    for got, part in zip(ours, controller.split_prompts(pool, seed=1, n=5)):
        want = controller.featurize(part, tok, nested.model)
        timings = ["feature_ms", "entropy_ms"]
        pd.testing.assert_frame_equal(got.drop(columns=timings), want.drop(columns=timings))
    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    table = experiment.level_table(nested, outcomes, chunks, nested.memory(), refit=True, switch_repeats=3)
    assert list(table["level"]) == list(nested.levels) and nested.current == "none"
    assert table["refit"].tolist() == [True] * len(nested.levels) and table["switch_ms_median"].gt(0).all()
    by_level = outcomes.groupby("level", sort=False)[["ppl", "retention"]].mean()
    assert np.allclose(table.set_index("level")[["answer_ppl", "retention"]], by_level.loc[table["level"]])
    assert table["active_layers"].tolist() == [len(nested.active_layers(lv)) for lv in nested.levels.values()]
    n, tps_ref = len(nested.levels), float(outcomes["tokens_per_s"].median())
    policy, w, grid = experiment.train_policy(outcomes, train, n, tps_ref, None, epochs=3, seed=2)
    assert (w, grid) == (0.0, None)
    same = controller.train_bandit(outcomes, train, n, tps_ref, epochs=3, seed=2)
    assert np.array_equal(policy.theta(), same.theta())
    _, w, grid = experiment.train_policy(outcomes, train, n, tps_ref, 0.5, epochs=3, seed=2)
    assert w == controller.fit_retention_weight(outcomes, train, n, tps_ref, 0.5, epochs=3, seed=2)[1] and len(grid)
    assert experiment.training_rewards(policy).shape == (1, 3)  # one mean reward per epoch
    assert experiment.parse_load("live") is None and experiment.parse_load("0.1,0.5") == (0.1, 0.5)
    assert experiment.held_out_loads((0.1, 0.5), 3, seed=1) == SimulatedLoad(1, 0.1, 0.5).loads(3)
    assert experiment.held_out_loads(None, 2, seed=1) is None  # live: evaluate reads the machine per prompt
    ctrls = experiment.controllers(n, train, policy)
    assert [c.name for c in ctrls] == ["always_none", "always_max", "rules", "learned"]
    runtime = controller.evaluate(ctrls, nested, tok, test, [0.5] * len(test), tps_ref, max_new_tokens=3,
                                  judge=_Judge())
    summary = experiment.summary_table(runtime, 0.0, simulated_load=True)
    plain = controller.summarize(runtime)
    pd.testing.assert_frame_equal(summary[plain.columns], plain)
    assert summary["beats_fixed_on_reward"].tolist() == (plain["reward"] > plain["reward"][:2].max()).tolist()
    assert summary["simulated_load"].all() and (summary["retention_weight"] == 0.0).all()
    assert experiment.verdict(summary, 0.0).startswith("simulated load: learned (w = 0.0): reward ")
    readings = iter([0.25, 0.75] * len(ctrls) * len(test))  # the live run reads telemetry just before each prompt
    monkeypatch.setattr(telemetry, "read_telemetry", lambda: telemetry.Telemetry(cpu=next(readings), memory=0.1))
    live, live_summary = experiment.live_evaluation(ctrls, nested, tok, test, tps_ref, 0.0, max_new_tokens=3,
                                                    judge=_Judge())
    assert live["load"].tolist() == [0.25, 0.75] * (len(live) // 2) and len(live) == len(runtime)
    assert not live_summary["simulated_load"].any() and np.allclose(
        live_summary["load"], live.groupby("controller", sort=False)["load"].mean())
    both = pd.concat([summary, live_summary], ignore_index=True)
    assert experiment.verdict(both, 0.0).splitlines()[1].startswith("live load: learned")


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "float32"), ("qwen2", "bfloat16")])
def test_stage_05_plan_counts_the_int8_copy_the_runtime_builds(family, dtype):
    """In fp32 the INT8 level shares the model's norms and LM head; in bf16 it holds fp32 copies of them."""
    from pruning_utils.pipeline import memory_plan

    model = tiny_model(family, intermediate_size=256, hidden_size=128).to(getattr(torch, dtype))
    nested = nested_model.NestedModel(model, _scores(model), "none,ffn:0.5,int8")
    settings = memory_plan.choose(model.config, "05", dict(DEVICE="cpu", DTYPE=dtype,
                                                           ADAPTIVE_LEVELS="none,ffn:0.5,int8"))
    part = [x for x in settings.plan.parts if x["name"].startswith("INT8 level")]
    assert len(part) == 1 and part[0]["bytes"] == pytest.approx(nested.memory()["int8_bytes"], rel=0.05)
    without = memory_plan.choose(model.config, "05", dict(DEVICE="cpu", DTYPE="float32", ADAPTIVE_LEVELS="none,kv:4"))
    assert not [x for x in without.plan.parts if x["name"].startswith("INT8 level")]
