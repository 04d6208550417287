"""Tests of the shared sweep helpers of notebooks 02/03 on a tiny random model."""
import math

import pytest
import torch

from pruning_utils.measure.variants import (
    VARIANT_COLUMNS,
    criteria_sweep,
    measure_variant,
    pruned_copy,
    reconstruction_sweep,
    removed_fractions,
    screens,
)
from pruning_utils.model.arch import layer_shapes
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune import allocation, importance
from pruning_utils.prune.reconstruction import collect_grams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=0)
    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    scores = importance.compute_importance(model, windows, ["random", "activation"], progress=False)
    return model, windows, chunks, scores


@pytest.mark.parametrize("kind,rate_col,shape", [("heads", "head_rate_requested", "query_heads"),
                                                  ("neurons", "mlp_rate_requested", "intermediate")])
def test_criteria_sweep_measures_each_plain_removal_and_leaves_the_model_intact(setup, kind, rate_col, shape):
    model, _, chunks, scores = setup
    before = [p.clone() for p in model.parameters()]
    rows = criteria_sweep(model, scores, ["random", "activation"], [0.25, 0.5], kind, chunks, progress=False)
    assert [(r["criterion"], r[rate_col]) for r in rows] == [("random", 0.25), ("random", 0.5),
                                                             ("activation", 0.25), ("activation", 0.5)]
    planner = allocation.plan_heads if kind == "heads" else allocation.plan_neurons
    for row in rows:  # each row is the plain-removal variant of its own plan
        expected = measure_variant(pruned_copy(model, planner(model, scores[row["criterion"]], row[rate_col])),
                                   chunks, variant="x")
        assert row["reconstruction"] == "none" and row[shape] == expected[shape]
        assert math.isclose(row["ppl"], expected["ppl"], rel_tol=1e-6)
    assert rows[1]["params_non_embedding"] < rows[0]["params_non_embedding"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sweeps_reject_unknown_kinds_and_criteria(setup):
    model, windows, chunks, scores = setup
    with pytest.raises(ValueError, match="unknown sweep kind 'layers'; known: heads, neurons"):
        criteria_sweep(model, scores, ["random"], [0.25], "layers", chunks)
    with pytest.raises(KeyError, match="no scores for \\['tfidf'\\]"):
        criteria_sweep(model, scores, ["tfidf"], [0.25], "heads", chunks)
    plan = allocation.plan_heads(model, scores["random"], 0.25)
    with pytest.raises(ValueError, match="unknown sweep kind"):
        reconstruction_sweep(model, plan, windows, ["none"], chunks, criterion="random", rate=0.25, kind="mlp")


def test_reconstruction_sweep_shares_one_gram_pass(setup):
    model, windows, _, scores = setup
    plan = allocation.plan_neurons(model, scores["random"], 0.5)
    grams = collect_grams(model, windows)
    rows = reconstruction_sweep(model, plan, windows, ["none", "lstsq"], windows, criterion="random", rate=0.5,
                                kind="neurons", stats=grams)
    fresh = reconstruction_sweep(model, plan, windows, ["lstsq"], windows, criterion="random", rate=0.5,
                                 kind="neurons")
    assert [r["reconstruction"] for r in rows] == ["none", "lstsq"]
    assert [r["variant"] for r in rows] == ["mlp-random-0.5-none", "mlp-random-0.5-lstsq"]
    assert rows[1]["ppl"] != rows[0]["ppl"]  # the refit changed the model (its error is tested in test_reconstruction)
    assert math.isclose(rows[1]["ppl"], fresh[0]["ppl"], rel_tol=1e-5)


def test_screens_measure_the_reference_then_both_sweeps_against_it(setup):
    model, windows, chunks, scores = setup
    plan = allocation.plan_heads(model, scores["activation"], 0.25)
    grams = collect_grams(model, windows, which=["o_proj"])
    ref, crit_rows, recon_rows = screens(model, scores, "heads", ["random", "activation"], [0.25], plan, windows,
                                         ["none", "lstsq"], chunks, criterion="activation", rate=0.25, stats=grams,
                                         source_model="tiny", fidelity_chunks=windows[:2])
    assert ref["variant"] == "baseline" and ref["ppl_change_pct"] == 0.0 and ref["fidelity_tokens"] > 0
    again = criteria_sweep(model, scores, ["random", "activation"], [0.25], "heads", chunks, reference=ref,
                           progress=False)
    assert [(r["variant"], r["ppl"]) for r in crit_rows] == [(r["variant"], r["ppl"]) for r in again]
    assert [r["reconstruction"] for r in recon_rows] == ["none", "lstsq"]
    assert all(r["ppl_reference"] == crit_rows[0]["ppl_reference"] for r in recon_rows), "one reference for all"
    # the plain 'none' refit of the main plan is the criteria sweep's own row for that criterion and rate
    assert math.isclose(recon_rows[0]["ppl"], crit_rows[1]["ppl"], rel_tol=1e-9)


def test_rows_report_achieved_fractions_next_to_requested_rates():
    # SmolLM2-like
    model = tiny_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    chunks = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    scores = importance.compute_importance(model, chunks, ["magnitude"], progress=False)["magnitude"]
    ref = measure_variant(model, chunks, variant="baseline")
    assert (ref["head_frac_removed"], ref["mlp_frac_removed"]) == (0.0, 0.0)
    plan = allocation.plan_both(model, scores, head_rate=0.2, mlp_rate=0.25)
    pruned = pruned_copy(model, plan)
    row = measure_variant(pruned, chunks, variant="s3", reference=ref, head_rate_requested=0.2, mlp_rate_requested=0.25)
    assert row["query_heads"] == "6x3"  # one head per KV group: 0.2 asked, a third removed
    assert (row["head_rate_requested"], row["mlp_rate_requested"]) == (0.2, 0.25)
    assert row["head_frac_removed"] == pytest.approx(1 / 3) and row["mlp_frac_removed"] == pytest.approx(24 / 96)
    assert list(row) == VARIANT_COLUMNS
    del pruned.pruning_plan  # without the plan the reference row's shapes are the source
    assert removed_fractions(pruned, ref) == pytest.approx((1 / 3, 0.25))
    assert removed_fractions(pruned) == (0.0, 0.0)
    # a second cut counts against the first source, not the intermediate model
    first = pruned_copy(model, plan)
    rescored = importance.compute_importance(first, chunks, ["magnitude"], progress=False)["magnitude"]
    again = pruned_copy(first, allocation.plan_heads(first, rescored, 0.5))
    kept = sum(s.n_heads for s in layer_shapes(again))
    assert kept < 18 and removed_fractions(again)[0] == pytest.approx(1 - kept / 27)


def test_reload_build_prunes_in_place_and_gives_the_copy_paths_weights():
    """Memory-short variants: the unpruned model pruned in place and reloaded for the next, same weights as copies."""
    from pruning_utils.measure.variants import Unpruned
    from pruning_utils.model.loading import load_model

    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    copy_src = Unpruned(model=load_model("tiny-llama", device="cpu")[0])
    reload_src = Unpruned("tiny-llama", device="cpu", build="reload")
    scores = importance.compute_importance(copy_src.model, windows, ["activation"], progress=False)["activation"]
    plan = allocation.plan_both(copy_src.model, scores, head_rate=0.5, mlp_rate=0.5)
    reload_src.model  # loaded once; the first variant takes it
    for recon, kw in (("none", {}), ("lstsq", dict(sequential=False)), ("lstsq", dict(sequential=True))):
        a = copy_src.variant(plan, windows, recon, **kw)
        b = reload_src.variant(plan, windows, recon, **kw)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert layer_shapes(b) != layer_shapes(copy_src.model)
    assert reload_src.reloads == 3 and copy_src.reloads == 0  # one load per variant, never two models at once
    assert layer_shapes(copy_src.model) == layer_shapes(reload_src.model)  # the source comes back unpruned
    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    by_copy = criteria_sweep(copy_src.model, {"activation": scores}, ["activation"], [0.5], "heads", chunks,
                             progress=False)
    by_reload = criteria_sweep(reload_src, {"activation": scores}, ["activation"], [0.5], "heads", chunks,
                               progress=False)
    assert by_copy[0]["ppl"] == by_reload[0]["ppl"]
    with pytest.raises(ValueError, match="known: copy, reload"):
        Unpruned("tiny-llama", build="inplace")


class _Judge:  # exact strings are fully similar, others half
    def similarity(self, a, b):
        return [1.0 if x == y else 0.5 for x, y in zip(a, b)]


def test_final_row_reuses_the_recorded_perplexity_and_adds_provenance_size_and_retention(setup, models_dir,
                                                                                         monkeypatch):
    from pruning_utils.measure import evaluation
    from pruning_utils.measure.final_eval import final_row
    from pruning_utils.measure.metrics import checkpoint_size_mb
    from pruning_utils.model.checkpoint import save_pruned
    from pruning_utils.model.tiny import TinyTokenizer

    model, _, chunks, scores = setup
    tok = TinyTokenizer()
    recorded = dict(measure_variant(model, chunks, variant="baseline", source_model="tiny-llama"), ppl=123.0)
    kw = dict(source_model="tiny-llama", recorded_baseline=recorded, prompts=["abc", "de"], judge=_Judge(),
              max_new_tokens=3)
    base, base_answers = final_row("baseline", model, tok, chunks, reference=None, **kw)
    assert base["ppl"] == 123.0 and base["criterion"] == ""  # reused as recorded; the baseline has no provenance
    assert (base["semantic_cosine"], base["exact_match"], base["n_prompts"]) == (1.0, 1.0, 2)
    pruned = pruned_copy(model, allocation.plan_heads(model, scores["activation"], 0.5))
    extra = measure_variant(pruned, chunks, variant="head_pruned", criterion="activation", head_rate_requested=0.5,
                            reference=recorded)
    folder = save_pruned(pruned, tok, "head_pruned", extra=extra)
    monkeypatch.setattr(evaluation, "zero_shot", lambda m, t, tasks, limit=None: {task: 0.5 for task in tasks})
    row, answers = final_row("head_pruned", pruned, tok, chunks, reference=base, reference_answers=base_answers,
                             zero_shot_tasks=["arc_easy"], **kw)
    assert (row["criterion"], row["head_rate_requested"], row["ppl"]) == ("activation", 0.5, extra["ppl"])
    assert row["size_mb"] == checkpoint_size_mb(folder) and row["zs_arc_easy"] == 0.5 and "zs_arc_easy" not in base
    assert answers == evaluation.generate_answers(pruned, tok, ["abc", "de"], max_new_tokens=3)
    assert row["semantic_cosine"] == evaluation.semantic_retention(base_answers, answers, _Judge())["cosine_mean"]



def test_final_row_of_a_host_held_baseline_takes_its_cost_from_the_record(setup, models_dir, monkeypatch):
    """An 8B baseline kept on the host beside a T4 (StageSettings.reference_host): its latency, memory and zero-shot
    would be the CPU's, so its cost columns are baseline.csv's and nothing is timed there."""
    from pruning_utils.measure import evaluation
    from pruning_utils.measure import variants as variants_module
    from pruning_utils.measure.final_eval import final_row
    from pruning_utils.model.tiny import TinyTokenizer

    model, _, chunks, _ = setup
    recorded = dict(measure_variant(model, chunks, variant="baseline", source_model="tiny-llama"), prefill_ms=12.5,
                    decode_tok_s=34.0, peak_memory_mb=56.0, device="Tesla T4")
    for module, name in ((evaluation, "zero_shot"), (variants_module, "latency"),
                         (variants_module, "variant_peak_memory_mb")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran on the host"))
    row, _ = final_row("baseline", model, TinyTokenizer(), chunks, source_model="tiny-llama",
                       recorded_baseline=recorded, reference=None, prompts=["abc"], judge=_Judge(), max_new_tokens=3,
                       latency_kw=dict(seq_len=8), memory_kw=dict(seq_len=8), zero_shot_tasks=["arc_easy"],
                       reference_model=model, reference_device="cpu", cost_from_record=True)
    assert (row["prefill_ms"], row["decode_tok_s"], row["peak_memory_mb"], row["device"]) == (12.5, 34.0, 56.0,
                                                                                              "Tesla T4")
    assert row["kl_to_baseline"] == 0.0 and row["ppl"] == recorded["ppl"]
    assert not any(k.startswith("zs_") for k in row)
    measured, _ = final_row("baseline", model, TinyTokenizer(), chunks, source_model="tiny-llama",
                            recorded_baseline=recorded, reference=None, prompts=["abc"], judge=_Judge(),
                            max_new_tokens=3, reference_model=model)
    assert measured["device"] != "Tesla T4"  # without the flag the row is measured where the model is

def test_mix_variant_keeps_the_head_pruned_heads_one_shot_or_rescored(setup, models_dir):
    from pruning_utils.measure.mix import mix_variant
    from pruning_utils.measure.variants import Unpruned, prune_in_place
    from pruning_utils.model.checkpoint import load_pruned, read_plan, save_pruned
    from pruning_utils.model.tiny import TinyTokenizer

    model, windows, _, scores = setup
    head_plan = allocation.plan_heads(model, scores["activation"], 0.5)
    head = pruned_copy(model, head_plan)
    save_pruned(head, TinyTokenizer(), "head_pruned", plan=head_plan)
    mlp_plan = allocation.plan_neurons(model, scores["random"], 0.5)
    kw = dict(head_row=dict(criterion="activation", head_rate_requested=0.5), mlp_criterion="activation",
              mlp_rate=0.5, plan_kw=dict(allocation_name="uniform", seed=0))
    grams = collect_grams(model, windows, which=["o_proj", "down_proj"])
    one_shot = mix_variant(Unpruned(model=model), scores, mlp_plan, windows, grams=grams, reconstruction="lstsq", **kw)
    expected = pruned_copy(model, mlp_plan.combined_with(read_plan("head_pruned")), windows, "lstsq", stats=grams,
                           sequential=False)
    assert layer_shapes(one_shot) == layer_shapes(expected)
    assert [s.n_heads for s in layer_shapes(one_shot)] == [s.n_heads for s in layer_shapes(head)]
    assert all(torch.equal(a, b) for a, b in zip(one_shot.parameters(), expected.parameters()))
    rescored = mix_variant(Unpruned(model=model), scores, mlp_plan, windows, rescore=True, **kw)
    head_model, _ = load_pruned("head_pruned")
    head_scores = importance.compute_importance(head_model, windows, ["activation"], progress=False)["activation"]
    expected = prune_in_place(head_model, allocation.plan_neurons(head_model, head_scores, 0.5))
    assert layer_shapes(rescored) == layer_shapes(expected)
    assert all(torch.equal(a, b) for a, b in zip(rescored.parameters(), expected.parameters()))


def test_first_windows_keep_whole_windows_up_to_the_token_budget():
    from pruning_utils.measure.variants import first_windows

    chunks = torch.arange(40).reshape(5, 8)
    assert torch.equal(first_windows(chunks, 20), chunks[:2])
    assert torch.equal(first_windows(chunks, 3), chunks[:1])  # one window at least
    assert torch.equal(first_windows(chunks, 10 ** 6), chunks)
