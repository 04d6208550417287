"""Compression methods as saved variants (notebook 03b): checkpoints that reload, the depth refit, targets,
bad input; the two forms of the Wanda hybrid (`residual`: sparse weight + residual SVD; `svd`, Wanda+SVD: the
truncated SVD of the pruned weight replaces it, at the low-rank method's parameter target) and their screen rows."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_utils.compress import compare
from pruning_utils.compress.depth import plan_layers, refit_before_spans, score_layers
from pruning_utils.compress.lowrank import layer_grams, lowrank_model
from pruning_utils.compress.quantize import quantize_int8
from pruning_utils.compress.sparse_lowrank import channel_norms, hybrid_model, nm_mask, wanda_mask
from pruning_utils.measure.metrics import count_params, flops_per_token
from pruning_utils.model.arch import PROJECTIONS, decoder_layers, proj
from pruning_utils.model.checkpoint import PLAN_FILE, load_pruned, read_checkpoint_meta, save_pruned
from pruning_utils.model.linears import LowRankLinear, NotApplicableError, SparseLowRankLinear, is_int8_tensor
from pruning_utils.model.surgery import apply_plan
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _nll(model, w):
    with torch.no_grad():
        return float(model(w, labels=w).loss)


def test_depth_pruned_checkpoint_loads_with_stock_from_pretrained(tmp_path, tokens, windows):
    model = tiny_model("llama")
    plan = plan_layers(score_layers(model, windows, "block_influence"), n_remove=1)
    refit_before_spans(model, plan.provenance["removed_layers"], windows)
    apply_plan(model, plan)
    folder = save_pruned(model, TinyTokenizer(), tmp_path / "depth")
    assert read_checkpoint_meta(folder)["stock_loadable"] is True
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert len(decoder_layers(stock)) == 2
    assert torch.equal(_logits(stock, tokens), _logits(model, tokens))


def test_depth_refit_beats_plain_removal_on_calibration_text(windows):
    torch.manual_seed(0)
    model = tiny_model("llama")
    plain, refit = tiny_model("llama"), tiny_model("llama")
    refit.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    assert refit_before_spans(refit, [2], windows) == [1]
    target = torch.log_softmax(_logits(model, windows), -1)

    def kl(m):
        return float((target.exp() * (target - torch.log_softmax(_logits(m, windows), -1))).sum(-1).mean())

    apply_plan(plain, plan_layers(score_layers(model, windows), n_remove=0))
    for m in (plain, refit):
        from pruning_utils.model.surgery import drop_layers
        drop_layers(m, [0, 1])
    assert kl(refit) < kl(plain)
    # a span starting at layer 0 has no layer before it: nothing is refit
    assert refit_before_spans(tiny_model("llama"), [0], windows) == []


@pytest.mark.parametrize("kind", ["lowrank", "hybrid"])
def test_factorised_checkpoints_reload_through_load_pruned(tmp_path, tokens, windows, kind):
    model = tiny_model("qwen2")
    if kind == "lowrank":
        lowrank_model(model, rank=3, layers=[0, 2])
    else:
        hybrid_model(model, windows, sparsity="2:4", rank=2)
    folder = save_pruned(model, TinyTokenizer(), tmp_path / kind)
    meta = read_checkpoint_meta(folder)
    assert meta["stock_loadable"] is False and meta["modules"]
    back, tok = load_pruned(folder, device="cpu", dtype=torch.float32)
    assert isinstance(tok, TinyTokenizer)
    assert compare.replaced_modules_of(back) == compare.replaced_modules_of(model)
    # same weights; a reloaded tensor's memory layout can pick another BLAS path (1.8e-7 apart on an AMD EPYC)
    torch.testing.assert_close(_logits(back, tokens), _logits(model, tokens), atol=1e-5, rtol=0)


def test_int8_checkpoint_reloads_through_load_pruned(tmp_path, tokens):
    model = tiny_model("llama")
    q = quantize_int8(model)
    assert count_params(q) == count_params(model)  # INT8 weights count their values
    assert flops_per_token(q) == flops_per_token(model)
    folder = save_pruned(q, TinyTokenizer(), tmp_path / "int8")
    meta = read_checkpoint_meta(folder)
    assert meta["weights"] == "int8" and not meta["stock_loadable"]
    back, _ = load_pruned(folder)
    assert getattr(back, "int8", False) and torch.equal(_logits(back, tokens), _logits(q, tokens))
    with pytest.raises(NotApplicableError, match="CPU and CUDA"):
        load_pruned(folder, device="mps")


def test_low_rank_flops_and_params_follow_the_rank():
    model = tiny_model("llama")
    before = flops_per_token(model), count_params(model)["non_embedding"]
    lowrank_model(model, rank=2)
    assert flops_per_token(model) < before[0] and count_params(model)["non_embedding"] < before[1]


def test_lowrank_ratio_meets_the_target_and_refuses_an_impossible_one():
    model = tiny_model("llama")
    ne = count_params(model)["non_embedding"]
    target = int(0.75 * ne)
    lowrank_model(model, param_ratio=compare.lowrank_ratio(model, target))
    assert count_params(model)["non_embedding"] <= target
    with pytest.raises(ValueError, match="cannot be met"):
        compare.lowrank_ratio(tiny_model("llama"), 10)


def test_int8_where_torchao_cannot_run_is_a_not_applicable_row_and_writes_nothing(models_dir, windows, monkeypatch):
    from pruning_utils.model import linears

    chunks = windows[:2]
    assert compare.available_variants(["baseline", "baseline_int8"], "cuda") == ["baseline", "baseline_int8"]
    assert compare.available_variants(["baseline", "baseline_int8"], "cpu") == ["baseline", "baseline_int8"]
    monkeypatch.setattr(linears, "_torchao_missing", lambda: True)  # an environment without torchao
    row = compare.int8_row("baseline", "cpu", chunks, reference={}, model=tiny_model("llama"), tok=TinyTokenizer())
    assert row["applicable"] is False and "pip install" in row["note"] and row["saved"] is False
    assert not (models_dir / "baseline_int8").exists()
    assert compare.available_variants(["baseline", "baseline_int8", "depth_pruned"], "cuda") == [
        "baseline", "depth_pruned"]


def test_a_depth_target_removing_every_layer_fails_before_any_surgery(windows):
    model = tiny_model("llama")
    scores = score_layers(model, windows)
    with pytest.raises(ValueError, match="removing every one of the 3 decoder layers"):
        list(compare.depth_candidates(model, windows, windows[:2], 1, ["block_influence"], reference=None))
    assert len(decoder_layers(model)) == 3 and scores.scores


def test_saved_variant_row_is_recorded_in_its_plan_file(models_dir, windows):
    model = tiny_model("llama")
    base = compare.measure_variant(model, windows[:2], variant="baseline")
    rows = list(compare.depth_candidates(model, windows, windows[:2], int(0.8 * base["params_non_embedding"]),
                                             ["block_influence"], reference=base))
    assert [r["form"] for r, _ in rows] == ["block_influence", "block_influence+refit"]
    row, best = compare.best(rows)
    full = compare.save_measured(best, TinyTokenizer(), "depth_pruned", row, windows[:3], reference=base,
                                     latency_kw=None, memory_kw=None)
    extra = json.loads((models_dir / "depth_pruned" / PLAN_FILE).read_text())["extra"]
    assert extra["saved"] is True and extra["eval_tokens"] == 3 * 23 and extra["ppl"] == full["ppl"]
    assert compare.target_params("depth_pruned") == full["params_non_embedding"]
    table = compare.table([r for r, _ in rows] + [full])
    assert list(table.columns[:8]) == ["variant"] + compare.COMPRESSION_COLUMNS


@pytest.mark.parametrize("rank", [0, -1, 40])
def test_a_bad_rank_leaves_the_model_untouched(rank, tokens):
    model = tiny_model("llama")  # rank 40 fits q_proj (128x64) but is above k_proj's full rank (32x64)
    before = _logits(model, tokens)
    with pytest.raises(ValueError, match=f"rank {rank} is invalid"):
        lowrank_model(model, rank=rank)
    assert not compare.replaced_modules_of(model) and torch.equal(_logits(model, tokens), before)


def test_smoothed_int8_row_saves_what_it_measured(models_dir, windows, tokens):
    from pruning_utils.model.checkpoint import load_pruned

    model = tiny_model("llama")
    kw = dict(smooth_windows=windows, smooth_alpha=0.5, keep_fp32=("down_proj",))
    reference = dict(params_non_embedding=1, flops_per_token=1, ppl=1.0)
    row = compare.int8_row("baseline", "cpu", windows[:2], reference=reference, model=model, tok=TinyTokenizer(),
                               **kw)
    assert row["saved"] and "smoothed (alpha 0.5)" in row["note"] and "down_proj kept fp32" in row["note"]
    back, _ = load_pruned("baseline_int8", device="cpu")
    assert back.int8_keep_fp32 == ("down_proj",) or list(back.int8_keep_fp32) == ["down_proj"]
    assert torch.equal(_logits(back, tokens), _logits(quantize_int8(model, progress=False, **kw), tokens))
    assert not torch.equal(_logits(back, tokens), _logits(quantize_int8(model), tokens))  # not the plain INT8


def test_int8_of_a_tied_model_counts_the_parameters_of_its_fp32_source():
    model = tiny_model("mistral", tie_word_embeddings=True)
    q = quantize_int8(model, progress=False)
    assert is_int8_tensor(proj(decoder_layers(q)[0], "up_proj").weight)
    assert q.get_output_embeddings().weight is q.get_input_embeddings().weight  # still one (INT8-valued) table
    assert count_params(q) == count_params(model)  # the tied INT8 table is the embedding matrix, counted once


def test_int8_of_a_saved_variant_carries_its_source_rates_and_count(models_dir, windows):
    from pruning_utils.measure.variants import PROVENANCE_COLUMNS, measure_variant
    from pruning_utils.prune import allocation, importance

    model = tiny_model("mistral", tie_word_embeddings=True)
    reference = measure_variant(model, windows[:2], variant="baseline")
    scores = importance.compute_importance(model, windows, ["magnitude"], progress=False)
    pruned = apply_plan(model, allocation.plan_heads(model, scores["magnitude"], 0.25))
    src = measure_variant(pruned, windows[:2], variant="head_pruned", reference=reference, criterion="magnitude",
                          allocation="uniform", reconstruction="lstsq", head_rate_requested=0.25)
    save_pruned(pruned, TinyTokenizer(), "head_pruned", extra=src)
    row = compare.int8_row("head_pruned", "cpu", windows[:2], reference=reference, source_model="tiny",
                           fidelity_chunks=windows[2:4],
                           reference_model=tiny_model("mistral", tie_word_embeddings=True))
    assert {k: row[k] for k in PROVENANCE_COLUMNS} == dict(
        criterion="magnitude+int8", allocation="uniform", reconstruction="lstsq", head_rate_requested=0.25,
        mlp_rate_requested=0.0)
    assert row["params_total"] == src["params_total"] and row["head_frac_removed"] == src["head_frac_removed"]
    assert row["source_model"] == "tiny" and row["fidelity_tokens"] > 0 and row["fidelity_reference"] == ""
    assert read_checkpoint_meta("head_pruned_int8")["extra"]["head_rate_requested"] == 0.25  # what notebook 06 reads


def test_depth_screens_request_the_layer_fraction_and_the_saved_row_keeps_the_refit(models_dir, windows):
    model = tiny_model("llama", num_hidden_layers=4)
    target = count_params(model)["non_embedding"] * 3 // 4
    reference = compare.measure_variant(model, windows[:2], variant="baseline")
    cands = list(compare.depth_candidates(model, windows, windows[:2], target, ["block_influence"],
                                          reference=reference, source_model="tiny", fidelity_chunks=windows[2:4]))
    for row, _ in cands:
        assert row["head_rate_requested"] == row["mlp_rate_requested"] == pytest.approx(row["head_frac_removed"])
        assert row["head_rate_requested"] > 0
        assert row["source_model"] == "tiny" and row["fidelity_tokens"] > 0
    row, best = [c for c in cands if c[0]["form"].endswith("+refit")][0]
    saved = compare.save_measured(best, TinyTokenizer(), "depth_pruned", row, windows[:2], reference=reference,
                                  latency_kw=None, memory_kw=None, source_model="tiny")
    assert (saved["reconstruction"], saved["allocation"]) == ("lstsq", "depth")
    assert saved["head_rate_requested"] == row["head_rate_requested"] and saved["source_model"] == "tiny"


# ------------------------------------------------------------------ the hybrid's forms: residual | svd


def _fresh(family: str = "llama"):
    torch.manual_seed(0)
    return tiny_model(family)


def _layer0_masks(model, windows, sparsity) -> dict[str, torch.Tensor]:
    """Wanda keep-masks of layer 0 (its inputs do not depend on any compression) on the unchanged model."""
    _, layer, grams = next(layer_grams(model, windows, [0], PROJECTIONS))
    out = {}
    for name in PROJECTIONS:
        w, norms = proj(layer, name).weight, channel_norms(grams[name])
        out[name] = nm_mask(w, norms) if sparsity == "2:4" else wanda_mask(w, norms, sparsity)
    return out


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_svd_form_factors_are_the_truncated_svd_of_the_wanda_pruned_weight(windows, sparsity):
    rank = 5
    original = _fresh()
    keeps = _layer0_masks(original, windows, sparsity)
    weights = {n: proj(decoder_layers(original)[0], n).weight.detach().double() for n in PROJECTIONS}
    model = _fresh()
    achieved = hybrid_model(model, windows, sparsity=sparsity, rank=rank, form="svd")
    assert achieved[(0, "q_proj")] == pytest.approx(0.5, abs=1e-6)
    for name in PROJECTIONS:
        low = proj(decoder_layers(model)[0], name)
        assert isinstance(low, LowRankLinear) and low.rank == rank
        masked = weights[name] * keeps[name]
        u, s, vh = torch.linalg.svd(masked, full_matrices=False)
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        product = low[1].weight.detach().double() @ low[0].weight.detach().double()
        torch.testing.assert_close(product, expected, atol=1e-5, rtol=1e-5)
        # not the SVD of the unpruned weight: the mask shaped the factors
        u, s, vh = torch.linalg.svd(weights[name], full_matrices=False)
        assert (product - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]).abs().max() > 1e-3
    # every layer is factorised, the bias kept on the second factor
    assert all(isinstance(proj(layer, n), LowRankLinear) for layer in decoder_layers(model) for n in PROJECTIONS)
    q0 = proj(decoder_layers(model)[0], "q_proj")
    assert torch.equal(q0[1].bias, proj(decoder_layers(original)[0], "q_proj").bias)


def test_svd_form_at_sparsity_zero_and_full_rank_reproduces_the_model(family, windows, tokens):
    original = tiny_model(family)
    model = tiny_model(family)
    model.load_state_dict(original.state_dict())
    # one full rank per projection shape: a call per group of projections sharing it
    groups = {}
    for name in PROJECTIONS:
        groups.setdefault(min(proj(decoder_layers(model)[0], name).weight.shape), []).append(name)
    for full, names in groups.items():
        achieved = hybrid_model(model, windows, sparsity=0.0, rank=full, projections=names, form="svd")
        assert set(achieved.values()) == {0.0}
    assert all(isinstance(proj(layer, n), LowRankLinear) for layer in decoder_layers(model) for n in PROJECTIONS)
    torch.testing.assert_close(_logits(model, tokens), _logits(original, tokens), atol=1e-4, rtol=1e-4)


def test_svd_variant_counts_what_its_row_reports_and_meets_the_target_as_lowrank_does(windows):
    model = _fresh()
    ne = count_params(model)["non_embedding"]
    target = int(0.75 * ne)
    reference = compare.measure_variant(model, windows[:2], variant="baseline")
    (row, hyb), = compare.hybrid_candidates(model, windows, windows[:2], ["0.5"], 2, reference=reference,
                                            forms=["svd"], target=target)
    assert row["variant"] == "hybrid-svd-wanda0.5" and row["form"] == "svd-wanda0.5" and row["method"] == "hybrid"
    counted = count_params(hyb)["non_embedding"]
    assert row["params_non_embedding"] == counted <= target
    assert row["nonzero_params_non_embedding"] <= counted
    low = _fresh()
    lowrank_model(low, param_ratio=compare.lowrank_ratio(low, target))
    assert counted == count_params(low)["non_embedding"]
    # the same rank per projection as the low-rank method, as its note says
    assert compare.replaced_modules_of(hyb) == compare.replaced_modules_of(low)
    ranks = [m["rank"] for m in compare.replaced_modules_of(hyb).values()]
    assert f"ranks {min(ranks)}..{max(ranks)}" in row["note"]
    assert count_params(model)["non_embedding"] == ne  # the screened model is a copy


def test_each_sparsity_and_form_is_its_own_row(windows):
    model = _fresh()
    target = int(0.75 * count_params(model)["non_embedding"])
    reference = compare.measure_variant(model, windows[:2], variant="baseline")
    cands = list(compare.hybrid_candidates(model, windows, windows[:2], ["0.3", "0.5", "2:4"], 2,
                                           reference=reference, forms=["residual", "svd"], target=target))
    rows = [r for r, _ in cands]
    assert [r["variant"] for r in rows] == [
        "hybrid-wanda0.3+r2", "hybrid-wanda0.5+r2", "hybrid-wanda2:4+r2",
        "hybrid-svd-wanda0.3", "hybrid-svd-wanda0.5", "hybrid-svd-wanda2:4"]
    table = compare.table(rows)
    assert not table.duplicated(["variant", "eval_tokens"]).any()
    by = {r["variant"]: r for r in rows}
    # 0.3 keeps more non-zero weights than 0.5, and the two screens differ in quality
    assert by["hybrid-wanda0.3+r2"]["nonzero_params_non_embedding"] > by["hybrid-wanda0.5+r2"][
        "nonzero_params_non_embedding"]
    assert by["hybrid-wanda0.3+r2"]["ppl"] != by["hybrid-wanda0.5+r2"]["ppl"]
    assert by["hybrid-svd-wanda0.3"]["ppl"] != by["hybrid-svd-wanda0.5"]["ppl"]
    # residual rows keep the sparse module (and add the residual's parameters); svd rows meet the target
    kinds = {r["variant"]: type(proj(decoder_layers(m)[0], "q_proj")) for r, m in cands}
    assert kinds["hybrid-wanda0.3+r2"] is SparseLowRankLinear and kinds["hybrid-svd-wanda0.3"] is LowRankLinear
    assert all(r["params_non_embedding"] <= target for r in rows if r["form"].startswith("svd-"))
    assert all(r["params_non_embedding"] > target for r in rows if not r["form"].startswith("svd-"))
    # `screen` returns the same rows and picks the lowest perplexity, as `best` does
    screened, (best_row, best_model) = compare.screen(iter(cands))
    assert screened == rows and best_row is compare.best(cands)[0] and best_model is compare.best(cands)[1]


def test_the_saved_svd_hybrid_reloads_through_load_pruned(tmp_path, windows, tokens):
    model = _fresh("qwen2")
    hybrid_model(model, windows, sparsity="2:4", param_ratio=0.5, form="svd")
    folder = save_pruned(model, TinyTokenizer(), tmp_path / "hybrid")
    meta = read_checkpoint_meta(folder)
    assert meta["stock_loadable"] is False and {m["kind"] for m in meta["modules"].values()} == {"lowrank"}
    back, _ = load_pruned(folder, device="cpu", dtype=torch.float32)
    assert compare.replaced_modules_of(back) == compare.replaced_modules_of(model)
    torch.testing.assert_close(_logits(back, tokens), _logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(form="svdd", rank=2), "unknown hybrid form 'svdd'; known: residual, svd"),
    (dict(form="svd"), "form 'svd' needs exactly one of rank"),
    (dict(form="svd", rank=2, param_ratio=0.5), "form 'svd' needs exactly one of rank"),
    (dict(form="svd", rank=40), "rank 40 is invalid"),  # above k_proj's full rank (32x64)
    (dict(form="svd", param_ratio=1.5), "param_ratio=1.5 must be in"),
    (dict(form="svd", rank=2, method="whiten"), "form 'svd' takes the plain SVD"),
    (dict(form="residual", rank=2, param_ratio=0.5), "form 'residual' takes rank"),
])
def test_bad_hybrid_input_fails_before_any_change(windows, tokens, kw, match):
    model = _fresh()
    before = _logits(model, tokens)
    with pytest.raises(ValueError, match=match):
        hybrid_model(model, windows, sparsity=0.5, **kw)
    assert not compare.replaced_modules_of(model) and torch.equal(_logits(model, tokens), before)


def test_bad_candidate_input_names_what_to_give(windows):
    model = _fresh()
    with pytest.raises(ValueError, match=r"unknown hybrid form\(s\) \['bogus'\]; known: residual, svd"):
        next(compare.hybrid_candidates(model, windows, windows[:2], ["0.5"], 2, reference=None,
                                       forms=["residual", "bogus"]))
    with pytest.raises(ValueError, match="give target="):
        next(compare.hybrid_candidates(model, windows, windows[:2], ["0.5"], 2, reference=None, forms=["svd"]))
    with pytest.raises(ValueError, match="repeat a value"):
        next(compare.hybrid_candidates(model, windows, windows[:2], ["0.5", "0.50"], 2, reference=None))
    with pytest.raises(ValueError, match="no candidates"):
        compare.screen(iter([]))
