"""NeuronRank's options on tiny random models: LM-head row removal (exact against masking, tied and untied, counted
as stored), pruning only the last N layers' MLPs, and the TF-IDF++ exponents from the notebook parameters to the
scores, their provenance and the sweep rows."""
import copy
import math

import pytest
import torch

from pruning_utils.measure.metrics import count_params, flops_per_token, perplexity, token_scores
from pruning_utils.measure.variants import (
    SWEEP_KEY,
    compact_shape,
    expand_shape,
    lm_head_sweep,
    measure_variant,
    neuronrank_screens,
    pruning_last_sweep,
    screens,
)
from pruning_utils.model.arch import layer_shapes
from pruning_utils.model.tiny import tiny_model
from pruning_utils.pipeline import results
from pruning_utils.prune import allocation, importance
from pruning_utils.prune.lm_head import (
    LMHeadPlan,
    PrunedLMHead,
    plan_lm_head,
    prune_lm_head,
    row_norms,
    unreachable_fraction,
)
from pruning_utils.prune.scores import load_scores, save_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, HIDDEN = 128, 64  # tiny_config's


def _model(tied: bool, family: str = "llama"):
    return tiny_model(family, seed=3, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def chunks():
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------------------- LM head


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lm_head_removal_is_exact_against_masking(tied, family, chunks):
    model = _model(tied, family)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    plan = plan_lm_head(model, 0.25)
    removed = torch.tensor(plan.removed())
    assert len(removed) == allocation.round_half_up(0.25 * VOCAB) and len(plan.kept) == VOCAB - len(removed)
    norms = row_norms(model)
    assert norms[removed].max() <= norms[torch.tensor(plan.kept)].min()  # the magnitude rule: smallest L2 rows go
    with torch.no_grad():
        full = model(input_ids=chunks).logits
        pruned = prune_lm_head(copy.deepcopy(model), plan)
        logits = pruned(input_ids=chunks).logits
    assert isinstance(pruned.get_output_embeddings(), PrunedLMHead) and logits.shape == full.shape
    kept = torch.tensor(plan.kept)
    torch.testing.assert_close(logits[..., kept], full[..., kept], atol=1e-6, rtol=0)
    assert torch.isneginf(logits[..., removed]).all()
    # the input embedding keeps every row (a tied matrix is copied, not cut), and re-tying does not undo the removal
    torch.testing.assert_close(pruned.get_input_embeddings().weight, model.get_input_embeddings().weight)
    pruned.tie_weights()
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=chunks).logits, logits)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_equals_generation_with_the_removed_tokens_masked(tied):
    model = _model(tied)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        free = model.generate(prompt, **gen)[:, prompt.shape[1]:]
    # remove the tokens the full model chose, so the pruned model must choose otherwise
    plan = LMHeadPlan(VOCAB, sorted(set(range(VOCAB)) - set(free.flatten().tolist())), rate=0.0)
    with torch.no_grad():
        masked = model.generate(prompt, suppress_tokens=plan.removed(), **gen)[:, prompt.shape[1]:]
        pruned = prune_lm_head(copy.deepcopy(model), plan).generate(prompt, **gen)[:, prompt.shape[1]:]
    assert torch.equal(pruned, masked) and not torch.equal(pruned, free)
    assert not set(pruned.flatten().tolist()) & set(plan.removed())


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_and_flops_count_what_the_pruned_head_stores(tied, chunks):
    model = _model(tied)
    before, flops_before = count_params(model), flops_per_token(model)
    plan = plan_lm_head(model, 0.25)
    n_removed, n_kept = VOCAB - len(plan.kept), len(plan.kept)
    pruned = prune_lm_head(copy.deepcopy(model), plan)
    after = count_params(pruned)
    assert after["non_embedding"] == before["non_embedding"]
    # untied: the output matrix loses its removed rows; tied: the shared matrix stays whole as the input
    # embedding and the kept rows are a second matrix, so the model stores more than before
    expected = before["total"] + n_kept * HIDDEN if tied else before["total"] - n_removed * HIDDEN
    assert after["total"] == expected == sum(p.numel() for p in pruned.parameters())
    assert (after["total"] > before["total"]) == tied
    assert flops_per_token(pruned) == flops_before - 2 * n_removed * HIDDEN
    row = measure_variant(pruned, chunks, variant="x")
    assert (row["params_total"], row["flops_per_token"]) == (after["total"], flops_per_token(pruned))


def test_lm_head_plans_round_trip_and_reject_what_does_not_fit():
    model = _model(False)
    plan = plan_lm_head(model, 0.1)
    back = LMHeadPlan.from_json(plan.to_json())
    assert back == plan and back.rule == "magnitude_l2"
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        plan_lm_head(model, 1.0)
    with pytest.raises(ValueError, match="already pruned"):
        prune_lm_head(prune_lm_head(copy.deepcopy(model), plan), plan)
    with pytest.raises(ValueError, match="made for 64 rows"):
        prune_lm_head(copy.deepcopy(model), LMHeadPlan(64, list(range(10))))


def test_unreachable_targets_make_perplexity_inf_not_nan(chunks):
    model = _model(True)
    plan = plan_lm_head(model, 0.25)
    pruned = prune_lm_head(copy.deepcopy(model), plan)
    removed = set(plan.removed())
    share = sum(int(t) in removed for t in chunks[:, 1:].flatten()) / chunks[:, 1:].numel()
    assert share > 0 and unreachable_fraction(plan, chunks) == pytest.approx(share)
    for kw in ({}, {"logits_rows": 4}, {"device": "cpu"}):  # plain, LM head in row blocks, offloaded layer walk
        out = perplexity(pruned, chunks, progress=False, **kw)
        assert math.isinf(out["ppl"]) and out["ppl"] > 0, kw
    out = perplexity(pruned, chunks, progress=False, reference=model)
    assert math.isinf(out["kl"]) and out["kl"] > 0  # the unpruned model puts mass on every removed token
    # targets the pruned head keeps: a finite perplexity, exactly the full model's renormalised over the kept rows
    kept = torch.tensor(plan.kept)
    clean = kept[torch.randint(0, len(kept), (2, 16), generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        logits = model(input_ids=clean).logits[:, :-1]
    logp = torch.log_softmax(logits.masked_fill(~torch.isin(torch.arange(VOCAB), kept), float("-inf")), -1)
    nll = -logp.gather(-1, clean[:, 1:, None]).mean().item()
    assert perplexity(pruned, clean, progress=False)["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_token_scores_of_unreachable_tokens_are_inf_even_where_the_reference_mass_underflows():
    logits = torch.tensor([[[0.0, 1.0, float("-inf"), float("-inf")]]])
    ref = torch.tensor([[[0.0, 1.0, -1e4, float("-inf")]]])  # exp(-1e4) is 0.0 in float32: 0 * inf would be NaN
    nll, kl = token_scores(logits, torch.tensor([[1]]), ref)
    assert math.isfinite(nll) and math.isinf(kl) and kl > 0
    nll, kl = token_scores(logits, torch.tensor([[2]]), logits)  # a target the model cannot emit; the same model
    assert math.isinf(nll) and nll > 0 and kl == 0.0


def test_lm_head_rows_report_unreachable_targets_and_decode_speed_beside_the_baseline(chunks):
    model = _model(True)
    base = measure_variant(model, chunks, variant="baseline")
    rows = lm_head_sweep(model, [0.1, 0.25], chunks, reference=base,
                         latency_kw=dict(seq_len=8, new_tokens=2, warmup=0, repeats=1))
    assert [r["variant"] for r in rows] == ["lm-head-magnitude-0.1", "lm-head-magnitude-0.25"]
    for row, rate in zip(rows, (0.1, 0.25)):
        plan = plan_lm_head(model, rate)
        assert row["vocab_kept"] == len(plan.kept) and row["criterion_options"] == f"lm_head={rate}"
        assert row["lm_head_unreachable_pct"] == pytest.approx(100 * unreachable_fraction(plan, chunks))
        assert math.isinf(row["ppl"]) == (row["lm_head_unreachable_pct"] > 0) and not math.isnan(row["ppl"])
        assert row["params_total"] == base["params_total"] + len(plan.kept) * HIDDEN  # tied: stored counts go up
        assert row["params_non_embedding"] == base["params_non_embedding"] and row["flops_reduction_pct"] > 0
        assert row["decode_tok_s"] > 0 and row["reference_decode_tok_s"] > 0
        assert row["decode_change_pct"] == pytest.approx(100 * (row["decode_tok_s"] / row["reference_decode_tok_s"]
                                                                - 1))
    assert rows[0]["reference_decode_tok_s"] == rows[1]["reference_decode_tok_s"]  # one baseline timing
    # the source model is left intact, still tied
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings and model.all_tied_weights_keys


# ---------------------------------------------------------------------------------------------- pruning_last


@pytest.fixture(scope="module")
def tfidf_setup(windows):
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    scores = importance.compute_importance(model, windows, ["magnitude", "tfidf", "tfidf_topic"], progress=False,
                                           tfidf_gamma=2.0, n_topics=2)
    return model, scores


@pytest.mark.parametrize("last", [1, 3, 4])
def test_pruning_last_touches_only_the_last_layers_mlp_widths(tfidf_setup, chunks, last):
    model, scores = tfidf_setup
    n_layers, width, rate = 4, layer_shapes(model)[0].intermediate, 0.3
    (row,) = pruning_last_sweep(model, scores, "magnitude", rate, [last], chunks)
    cut = width - allocation.round_half_up(rate * width)
    assert cut != width and expand_shape(row["intermediate"]) == [width] * (n_layers - last) + [cut] * last
    assert row["query_heads"] == compact_shape([s.n_heads for s in layer_shapes(model)])
    assert row["variant"] == f"mlp-magnitude-last{last}-{rate}" and row["criterion_options"] == f"last={last}"
    assert row["mlp_rate_requested"] == rate and row["reconstruction"] == "none"
    assert row["mlp_frac_removed"] == pytest.approx(last * (width - cut) / (n_layers * width))


def test_pruning_last_beyond_the_layer_count_says_what_to_set(tfidf_setup, chunks):
    model, scores = tfidf_setup
    for bad in (5, 0):
        with pytest.raises(ValueError, match=r"MLP_PRUNING_LAST to layer counts from 1 to 4"):
            pruning_last_sweep(model, scores, "magnitude", 0.25, [bad], chunks)


# ---------------------------------------------------------------------------------------------- TF-IDF++ options


def test_tfidf_exponents_reach_the_scores_and_their_provenance(tfidf_setup, windows, tmp_path):
    model, scores = tfidf_setup
    other = importance.compute_importance(model, windows, ["tfidf"], progress=False, tfidf_gamma=1.0)["tfidf"]
    assert not torch.allclose(torch.cat(scores["tfidf"].neurons), torch.cat(other.neurons))
    assert not torch.allclose(torch.cat(scores["tfidf"].heads), torch.cat(other.heads))
    assert (scores["tfidf"].provenance["gamma"], other.provenance["gamma"]) == (2.0, 1.0)
    assert scores["tfidf_topic"].provenance["n_topics"] == 2
    back = load_scores(save_scores(scores, tmp_path))  # the provenance travels with the stored scores
    assert back["tfidf"].provenance["gamma"] == 2.0 and back["tfidf_topic"].provenance["n_topics"] == 2
    assert importance.criterion_options(back["tfidf"]) == "alpha=1,beta=1,gamma=2,idf=smooth"
    assert importance.criterion_options(back["tfidf_topic"]) == "alpha=1,beta=1,gamma=2,idf=smooth,topics=2"
    assert importance.criterion_options(back["magnitude"]) == ""


def test_sweep_rows_name_the_tfidf_options_and_stay_unique(tfidf_setup, windows, chunks):
    model, scores = tfidf_setup
    plan = allocation.plan_neurons(model, scores["tfidf"], 0.25)
    ref, rows, recon = screens(model, scores, "neurons", ["magnitude", "tfidf", "tfidf_topic"], [0.25], plan, windows,
                               ["none"], chunks, criterion="tfidf", rate=0.25)
    options = {r["criterion"]: r["criterion_options"] for r in rows}
    assert options == {"magnitude": "", "tfidf": "alpha=1,beta=1,gamma=2,idf=smooth",
                       "tfidf_topic": "alpha=1,beta=1,gamma=2,idf=smooth,topics=2"}
    assert recon[0]["criterion_options"] == options["tfidf"]
    extra = neuronrank_screens(model, scores, chunks, criterion="tfidf", rate=0.25, pruning_last=[2],
                               lm_head_rates=[0.1, 0.2], reference=ref, allocation="uniform", sequential=False)
    assert [r["criterion_options"] for r in extra] == ["alpha=1,beta=1,gamma=2,idf=smooth,last=2", "lm_head=0.1",
                                                       "lm_head=0.2"]
    table = results.unique_rows(rows + recon + extra, SWEEP_KEY)  # the refit 'none' row repeats the sweep's row
    assert table["variant"].tolist() == ["mlp-magnitude-0.25", "mlp-tfidf-0.25", "mlp-tfidf_topic-0.25",
                                         "mlp-tfidf-last2-0.25", "lm-head-magnitude-0.1", "lm-head-magnitude-0.2"]
