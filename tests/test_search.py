"""Budget search: exact parameter budget, equal KV groups, the KL it reports, and a save/load round trip."""
import pytest
import torch

from pruning_utils.measure import metrics
from pruning_utils.model.checkpoint import load_pruned, save_pruned
from pruning_utils.model.tiny import TinyTokenizer, tiny_model
from pruning_utils.prune import reconstruction
from pruning_utils.prune.obs import obs_scores
from pruning_utils.prune.search import Counts, SearchError, counts_of, plan_from_counts, removed_params, search_budget


@pytest.fixture(scope="module")
def searched():
    model = tiny_model("llama", seed=1)
    windows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    held = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    grams = reconstruction.collect_grams(model, windows)
    scores = obs_scores(model, grams, step=4, progress=False)
    result = search_budget(model, scores, grams, held, head_rate=0.25, mlp_rate=0.25, group=8, iterations=30,
                           progress=False)
    return model, grams, held, scores, result


def _kl(model, pruned, windows) -> float:
    with torch.no_grad():
        ref = torch.log_softmax(model(windows).logits.float(), -1)
        got = torch.log_softmax(pruned(windows).logits.float(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_search_keeps_the_budget_exactly_and_groups_equal(searched):
    model, grams, held, scores, result = searched
    uniform = counts_of(result.uniform, model)
    assert removed_params(model, result.counts) == removed_params(model, uniform)
    assert result.counts.key() != uniform.key()  # the search moved budget between layers
    assert result.kl < result.kl_uniform and result.history["best_kl"].is_monotonic_decreasing
    pruned = reconstruction.prune_and_reconstruct(tiny_model("llama", seed=1), result.plan, None, "lstsq",
                                                  sequential=False, stats=grams)
    base = metrics.count_params(model)["non_embedding"]
    assert base - metrics.count_params(pruned)["non_embedding"] == removed_params(model, uniform)
    for li in range(3):  # every KV group of a layer keeps the same number of query heads
        kept = result.plan.kept_heads(li)
        assert len([h for h in kept if h < 4]) == len([h for h in kept if h >= 4])
    # the KL the search reports is the KL of the sliced, refit model on the held-out windows
    assert _kl(model, pruned, held) == pytest.approx(result.kl, rel=1e-4)


def test_searched_nonuniform_plan_round_trips(searched, tmp_path):
    model, grams, held, scores, result = searched
    assert result.plan.allocation == "search" and len(set(result.plan.result_shapes())) > 1
    pruned = reconstruction.prune_and_reconstruct(tiny_model("llama", seed=1), result.plan, None, "lstsq",
                                                  sequential=False, stats=grams)
    folder = save_pruned(pruned, TinyTokenizer(), tmp_path / "searched", plan=result.plan)
    loaded, _ = load_pruned(folder)
    with torch.no_grad():
        assert torch.equal(pruned(held).logits, loaded(held).logits)


def test_counts_out_of_range_are_refused(searched):
    model, _, _, scores, _ = searched
    with pytest.raises(SearchError, match="heads per group"):
        plan_from_counts(model, scores, Counts([4, 0, 0], [0, 0, 0]))
    with pytest.raises(SearchError, match="layers"):
        plan_from_counts(model, scores, Counts([0], [0]))


@pytest.fixture(scope="module")
def plan_inputs(tmp_path_factory):
    from pruning_utils import paths
    from pruning_utils.prune.importance import compute_importance

    model = tiny_model("llama", seed=1)
    windows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    grams = reconstruction.collect_grams(model, windows)
    scores = compute_importance(model, windows, ["fluctuation"])
    mp = pytest.MonkeyPatch()
    mp.setattr(paths, "MODELS_DIR", tmp_path_factory.mktemp("models"))  # the selfgen cache stays there
    yield model, grams, scores, TinyTokenizer()
    mp.undo()


SEARCH_KW = dict(text_source="embedded:0.75+selfgen:0.25", seq_len=32, windows=2, iterations=8, group=8,
                 progress=False)


def test_main_plan_uniform_is_the_allocation_planners(plan_inputs):
    from pruning_utils.prune import allocation
    from pruning_utils.prune.search import main_plan

    model, grams, scores, tok = plan_inputs
    got = main_plan(model, dict(scores), head_criterion="fluctuation", head_rate=0.25)
    want = allocation.plan_heads(model, scores["fluctuation"], 0.25)
    assert got.heads == want.heads and not got.neurons
    both = main_plan(model, dict(scores), head_criterion="fluctuation", mlp_criterion="fluctuation", head_rate=0.25,
                     mlp_rate=0.25, allocation_name="global")
    assert both.heads == allocation.plan_both(model, scores["fluctuation"], 0.25, 0.25, allocation="global").heads


def test_main_plan_search_keeps_kinds_and_budget(plan_inputs):
    from pruning_utils.prune import allocation
    from pruning_utils.prune.search import main_plan

    model, grams, scores, tok = plan_inputs
    pool = dict(scores)
    heads_only = main_plan(model, pool, head_criterion="obs", head_rate=0.25, allocation_name="search", grams=grams,
                           tokenizer=tok, **SEARCH_KW)
    assert "obs" in pool  # computed once from the Grams and kept
    assert not heads_only.neurons and heads_only.head_rate == 0.25
    uniform = allocation.plan_heads(model, pool["obs"], 0.25)
    assert removed_params(model, counts_of(heads_only, model)) == removed_params(model, counts_of(uniform, model))
    assert heads_only.provenance["search"]["kl_windows"] == "embedded:0.5+selfgen:0.5"
    assert heads_only.provenance["search"]["trade"] is False
    joint = main_plan(model, pool, head_criterion="obs", mlp_criterion="fluctuation", head_rate=0.25, mlp_rate=0.25,
                      allocation_name="search", grams=grams, tokenizer=tok, **SEARCH_KW)
    start = allocation.plan_both(model, pool["obs"], 0.25, 0.25, neuron_scores=scores["fluctuation"])
    assert removed_params(model, counts_of(joint, model)) == removed_params(model, counts_of(start, model))
    assert joint.provenance["search"]["trade"] is True and joint.criterion in ("obs+fluctuation", )


def test_main_plan_errors_say_what_to_do(plan_inputs):
    from pruning_utils.prune.search import equal_parts, main_plan

    model, grams, scores, tok = plan_inputs
    with pytest.raises(ValueError, match="unknown allocation 'best'"):
        main_plan(model, dict(scores), head_criterion="fluctuation", head_rate=0.25, allocation_name="best")
    with pytest.raises(KeyError, match="CRITERIA of notebook 00"):
        main_plan(model, dict(scores), head_criterion="wanda", head_rate=0.25)
    with pytest.raises(SearchError, match="GRAMS=device or host"):
        main_plan(model, dict(scores), head_criterion="obs", head_rate=0.25)
    with pytest.raises(SearchError, match="GRAMS=device or host"):
        main_plan(model, dict(scores), head_criterion="fluctuation", head_rate=0.25, allocation_name="search",
                  tokenizer=tok, **SEARCH_KW)
    with pytest.raises(ValueError, match="head_rate > 0 or mlp_rate > 0"):
        main_plan(model, dict(scores), head_criterion="fluctuation")
    assert equal_parts("embedded") == "embedded"
    assert equal_parts("wikitext2:0.9+selfgen:0.1") == "wikitext2:0.5+selfgen:0.5"
