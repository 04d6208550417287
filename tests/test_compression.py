"""Other ways to compress: depth pruning, torchao INT8, low-rank factors and sparse + low-rank, on tiny models."""
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pruning_utils.compress.depth import LAYER_CRITERIA, LayerScores, bridged, fit_span_map, plan_layers, score_layers
from pruning_utils.compress.lowrank import factorize, lowrank_model, rmt_rank, svd_factors
from pruning_utils.compress.quantize import quantize_int8
from pruning_utils.compress.sparse_lowrank import hybrid_model, nm_mask, sparse_lowrank, wanda_mask
from pruning_utils.measure.metrics import checkpoint_size_mb as size_mb
from pruning_utils.measure.metrics import count_params, model_bytes
from pruning_utils.model import linears
from pruning_utils.model.arch import decoder_layers, layer_shapes, proj
from pruning_utils.model.checkpoint import load_quantized, save_pruned, save_quantized
from pruning_utils.model.hooks import hooks, masked
from pruning_utils.model.linears import (
    LowRankLinear,
    NotApplicableError,
    SparseLowRankLinear,
    check_int8_device,
    is_int8_tensor,
)
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramStats
from pruning_utils.model.surgery import apply_plan, drop_layers
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _gram(x: torch.Tensor) -> GramStats:
    g = GramStats.empty(x.shape[-1])
    g.add(x)
    return g


# --------------------------------------------------------------------------------------------- depth


def test_no_layer_removed_is_the_identity(family, tokens, windows):
    model = tiny_model(family)
    ref = _logits(model, tokens)
    plan = plan_layers(score_layers(model, windows, "block_influence"), n_remove=0)
    assert plan.kept_layers() == [0, 1, 2]
    apply_plan(model, plan)
    assert torch.equal(ref, _logits(model, tokens))


def test_dropping_the_planned_layer_equals_bypassing_it(family, tokens, windows):
    model = tiny_model(family, num_hidden_layers=4)
    scores = score_layers(model, windows, "angular")
    plan = plan_layers(scores, n_remove=1)
    (k,) = plan.provenance["removed_layers"]
    assert k == min(range(4), key=lambda i: scores.scores[i])
    with masked(model, layers=[k]):
        ref = _logits(model, tokens)
    apply_plan(model, plan)  # drop_layers under the hood
    assert len(decoder_layers(model)) == 3
    assert (ref - _logits(model, tokens)).abs().max() <= TOL
    other = tiny_model(family, num_hidden_layers=4)
    drop_layers(other, plan.kept_layers())
    assert (ref - _logits(other, tokens)).abs().max() <= TOL


def test_similarity_scores_are_finite_per_layer_and_deterministic(windows):
    model = tiny_model("qwen3", num_hidden_layers=4)
    for name in ("block_influence", "angular"):
        a, b = score_layers(model, windows, name, batch_size=4), score_layers(model, windows, name, batch_size=4)
        assert len(a.scores) == 4 and all(math.isfinite(s) for s in a.scores)
        assert a.scores == b.scores
        assert all(0 <= s <= 2 for s in a.scores)
    bi = score_layers(model, windows, "block_influence")
    # the two scales are one similarity: 1 - cos and arccos(cos) / pi rank the layers alike per token
    assert torch.allclose(torch.tensor(bi.scores), 1 - torch.tensor(bi.details["cos"]))
    assert LayerScores.from_json(bi.to_json()) == bi


def test_semantic_layer_damage_equals_full_bypassed_forwards(windows):
    model = tiny_model("llama")
    w = windows[:4]
    got = score_layers(model, windows, "semantic", batch_size=2, max_windows=4)
    clean = torch.log_softmax(_logits(model, w)[:, :-1], -1)
    nll = lambda lp: -lp.gather(-1, w[:, 1:, None]).mean()  # noqa: E731
    for k in range(3):
        with masked(model, layers=[k]):
            lp = torch.log_softmax(_logits(model, w)[:, :-1], -1)
        kl = float((clean.exp() * (clean - lp)).sum(-1).mean())
        assert got.details["kl"][k] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert got.details["dloss"][k] == pytest.approx(float(nll(lp) - nll(clean)), rel=1e-4, abs=1e-6)
        assert got.scores[k] == pytest.approx(kl + max(got.details["dloss"][k], 0.0), rel=1e-5)


def test_layer_plans_by_count_or_target_and_their_errors(windows):
    model = tiny_model("mistral", num_hidden_layers=4)
    scores = score_layers(model, windows, "block_influence")
    per_layer = scores.layer_params[0]
    plan = plan_layers(scores, target_non_embedding=scores.non_embedding - per_layer - 1)
    assert len(plan.kept_layers()) == 2  # one layer is not enough: the second lowest goes too
    assert plan.provenance["non_embedding_after"] == scores.non_embedding - 2 * per_layer
    apply_plan(model, plan)
    assert count_params(model)["non_embedding"] == plan.provenance["non_embedding_after"]
    with pytest.raises(ValueError, match="every one of the 4 decoder layers"):
        plan_layers(scores, n_remove=4)
    with pytest.raises(ValueError, match="every one of the 4"):
        plan_layers(scores, target_non_embedding=0)
    with pytest.raises(ValueError, match="negative"):
        plan_layers(scores, n_remove=-1)
    with pytest.raises(ValueError, match="exactly one"):
        plan_layers(scores)
    with pytest.raises(ValueError, match="unknown layer criterion 'cosine'; known: " + ", ".join(LAYER_CRITERIA)):
        score_layers(model, windows, "cosine")


def test_span_map_fits_better_than_dropping_and_reduces_to_it(windows, tokens):
    model = tiny_model("qwen2", num_hidden_layers=4)
    span = fit_span_map(model, windows, 1, 3, ridge=1e-6)
    assert span.weight.shape == (64, 64) and span.tokens == windows.numel()

    def err(ctx):
        with ctx:
            return float((_logits(model, windows) - full).pow(2).mean())

    full = _logits(model, windows)
    assert err(bridged(model, span)) < err(masked(model, layers=[1, 2]))
    # the ridge shrinks the map towards the identity (a drop), the intercept staying the mean change of the span
    huge = fit_span_map(model, windows, 1, 3, ridge=1e12)
    assert (huge.weight - torch.eye(64)).abs().max() < 1e-6
    h = decoder_layers(model)
    seen = {}

    def grab(key):
        def fn(module, args, kwargs, out=None):
            got = (args[0] if args else kwargs["hidden_states"]) if out is None else out
            seen[key] = got[0] if isinstance(got, tuple) else got
        return fn

    with torch.no_grad(), hooks((h[1], "pre_kw", grab("x")), (h[2], "forward_kw", grab("y"))):
        model(windows)
    assert torch.allclose(huge.bias, (seen["y"] - seen["x"]).mean((0, 1)), atol=1e-4)
    with pytest.raises(ValueError, match="non-empty range"):
        fit_span_map(model, windows, 2, 2)


# ---------------------------------------------------------------------------------------------- INT8


@pytest.mark.parametrize("mode,tol", [("weight_only", 0.02), ("dynamic", 0.05)])
def test_int8_runs_generates_and_round_trips(tmp_path, tokens, mode, tol):
    model = tiny_model("llama")
    plan = PruningPlan.identity(layer_shapes(model), "tiny-llama")
    plan.heads = {1: [0, 1, 4, 5]}  # per-layer shapes: the loader must rebuild them
    apply_plan(model, plan)
    fp32_dir = save_pruned(model, TinyTokenizer(), tmp_path / "fp32")
    q = quantize_int8(model, mode=mode)
    assert not is_int8_tensor(proj(decoder_layers(model)[0], "q_proj").weight)  # the input model is left alone
    assert is_int8_tensor(proj(decoder_layers(q)[0], "q_proj").weight)
    assert len(linears.int8_tables(q)) == 2  # the embedding and (untied) lm_head tables are INT8 on disk
    logits = _logits(q, tokens)
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    # INT8 rounding error only, well below the logits' own scale (max |logit| ~0.5 on this tiny model)
    assert (logits - _logits(model, tokens)).abs().max() < tol
    out = q.generate(tokens[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 21) and int(out.max()) < 128
    folder = save_quantized(q, TinyTokenizer(), tmp_path / "int8")
    assert not list(folder.glob("*.bin")) and (folder / "model_int8.safetensors").is_file()  # plain tensors, no pickle
    back, tok = load_quantized(folder)
    assert isinstance(tok, TinyTokenizer) and back.pruning_plan.heads == {1: [0, 1, 4, 5]}
    assert back.int8_mode == mode and back.int8_embedding
    assert [s.n_heads for s in layer_shapes(back)] == [8, 4, 8]
    assert torch.equal(_logits(back, tokens), logits)
    assert size_mb(folder) < size_mb(fp32_dir) / 2.5  # int8 data + per-row scales, embedding table included


def test_weight_only_int8_is_close_to_fp32_and_stores_the_tied_table_once(tmp_path, tokens):
    model = tiny_model("llama", tie_word_embeddings=True)
    q = quantize_int8(model)  # the default mode
    assert q.int8_mode == "weight_only" and q.get_input_embeddings().weight is q.lm_head.weight  # still tied
    ref = _logits(model, tokens)
    err = (_logits(q, tokens) - ref).abs().max() / ref.abs().max()
    assert err < 0.02  # per-row weight rounding: about 1% of the largest logit
    assert model_bytes(q) < model_bytes(model) / 2.5  # projections 1 byte per weight in memory too
    table, scales = q.lm_head.weight, linears.int8_tables(q)[id(q.lm_head.weight)]
    step = (table - model.lm_head.weight).abs() / scales[:, None]
    # the fp32 table in memory holds its INT8 values: half a rounding step from the source at most
    assert float(step.detach().max()) <= 0.5 + 1e-4
    folder = save_pruned(q, None, tmp_path / "q")
    names = linears.int8_state_dict(q)
    assert "lm_head.weight:qdata" not in names and names["model.embed_tokens.weight:qdata"].dtype == torch.int8
    plain = quantize_int8(model, embedding=False)
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight) and not linears.int8_tables(plain)
    assert size_mb(folder) < size_mb(save_pruned(plain, None, tmp_path / "plain"))


def test_int8_names_what_cannot_run(monkeypatch):
    with pytest.raises(NotApplicableError, match="CPU and CUDA.*not applicable"):
        check_int8_device("mps")
    check_int8_device("cuda")  # torchao runs on CUDA too: nothing to refuse
    model = tiny_model("qwen2")
    monkeypatch.setattr(model, "parameters", lambda: iter([SimpleNamespace(device=torch.device("meta"))]))
    with pytest.raises(NotApplicableError, match="meta"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="unknown INT8 mode 'int4'; known: weight_only, dynamic"):
        quantize_int8(tiny_model("qwen2"), mode="int4")
    with pytest.raises(ValueError, match="quantize it first"):
        save_quantized(tiny_model("qwen2"), None, "unused")
    monkeypatch.setattr(linears, "_torchao_missing", lambda: True)
    with pytest.raises(NotApplicableError, match="pip install"):
        check_int8_device("cpu")


def test_no_torch_ao_quantization_left_in_the_package():
    package = Path(linears.__file__).parents[1]
    used = re.compile(r"^\s*(from|import) torch\.ao\b|torch\.ao\.quantization\.\w+\(", re.M)
    users = [str(p.relative_to(package)) for p in package.rglob("*.py") if used.search(p.read_text())]
    assert not users, f"the deprecated torch.ao quantization path is still used in {users}; use torchao"


# ------------------------------------------------------------------------------------------ low rank


@pytest.mark.parametrize("method", ["plain", "asvd", "whiten"])
def test_full_rank_svd_is_the_layer(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 32)
    x = torch.randn(200, 48)
    low = factorize(lin, 32, method, _gram(x))
    assert isinstance(low, LowRankLinear) and (low.in_features, low.out_features, low.rank) == (48, 32, 32)
    with torch.no_grad():
        assert (low(x) - lin(x)).abs().max() <= TOL


def test_full_rank_model_factorisation_keeps_logits(family, tokens, windows):
    model = tiny_model(family)
    ref = _logits(model, tokens)
    ranks = lowrank_model(model, ["k_proj", "v_proj"], rank=32, method="whiten", windows=windows)  # 64 -> 32: full
    assert set(ranks.values()) == {32}
    assert (ref - _logits(model, tokens)).abs().max() <= 1e-4
    other = tiny_model(family)
    before = count_params(other)["non_embedding"]
    lowrank_model(other, param_ratio=0.5)
    assert count_params(other)["non_embedding"] < before and torch.isfinite(_logits(other, tokens)).all()
    assert [s.intermediate for s in layer_shapes(other)] == [96] * 3  # shape readers still work


def test_rmt_rank_grows_with_signal_strength():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(80, 120, generator=g)
    u, v = torch.linalg.qr(torch.randn(80, 6, generator=g))[0], torch.linalg.qr(torch.randn(120, 6, generator=g))[0]
    ranks = []
    for strength in (0.0, 5.0, 15.0, 30.0, 60.0):
        # six directions of strengths 1..6 x `strength`: stronger signals lift more of them out of the bulk
        signal = strength * (u * torch.arange(1, 7.0)) @ v.T
        ranks.append(rmt_rank(noise + signal))
    assert all(1 <= r <= 80 for r in ranks)
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0]
    assert ranks[0] <= 2 and ranks[-1] == 6
    lin = torch.nn.Linear(120, 80)
    with torch.no_grad():
        lin.weight.copy_(noise + signal)
    assert factorize(lin, "rmt").rank == 6  # the same rule read off the factorising SVD


def test_activation_aware_svd_beats_plain_on_uneven_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 2, 64, dtype=torch.float64)[torch.randperm(64, generator=g)]
    x = torch.randn(2000, 64, generator=g, dtype=torch.float64) * scales
    gram = _gram(x)

    def err(method):
        a, b = svd_factors(w, 8, method, gram)
        return float(((w - b @ a) @ x.T).norm())

    plain, asvd, whiten = err("plain"), err("asvd"), err("whiten")
    assert asvd < plain and whiten < plain
    assert whiten <= asvd * (1 + 1e-9)  # whitening is the optimum of the output error


def test_rank_errors():
    lin = torch.nn.Linear(48, 32)
    for bad in (0, -1, 33, 2.5, "full"):
        with pytest.raises(ValueError, match=r"rank .* is invalid for a 32x48 matrix: choose an integer in \[1, 32\]"):
            factorize(lin, bad)
    for bad in (-1, 33):  # rank 0 is valid there: no correction
        with pytest.raises(ValueError, match=r"\[1, 32\]"):
            sparse_lowrank(lin, torch.ones(32, 48, dtype=torch.bool), bad)
    with pytest.raises(ValueError, match="unknown low-rank method 'svdd'; known: plain, asvd, whiten"):
        factorize(lin, 4, "svdd")
    with pytest.raises(ValueError, match="activation-aware"):
        factorize(lin, 4, "asvd")
    with pytest.raises(ValueError, match="exactly one"):
        lowrank_model(tiny_model("llama"))


# ------------------------------------------------------------------------------------- sparse + low rank


def test_no_sparsity_and_full_rank_is_the_identity():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(48, 32), torch.randn(50, 48)
    norms = x.norm(dim=0)
    for sparsity in (0.0, 0.5):
        mod = sparse_lowrank(lin, wanda_mask(lin.weight, norms, sparsity), rank=32)
        assert isinstance(mod, SparseLowRankLinear) and mod.rank == 32
        with torch.no_grad():
            assert (mod(x) - lin(x)).abs().max() <= TOL, sparsity
    ident = sparse_lowrank(lin, wanda_mask(lin.weight, norms, 0.0), rank=0)
    with torch.no_grad():
        assert torch.equal(ident(x), lin(x))


def test_masks_follow_wanda_and_two_four():
    w = torch.randn(8, 16)
    norms = torch.rand(16) + 0.1
    keep = wanda_mask(w, norms, 0.25)
    assert (keep.sum(1) == 12).all()
    score = w.abs() * norms
    assert ((score * ~keep).max(1).values <= (score.masked_fill(~keep, float("inf"))).min(1).values).all()
    nm = nm_mask(w, norms)
    assert (nm.view(8, 4, 4).sum(2) == 2).all()
    with pytest.raises(ValueError, match="sparsity=1.0 must be in"):
        wanda_mask(w, norms, 1.0)


def test_hybrid_model_corrects_the_sparsity_residual(family, tokens, windows):
    full = _logits(tiny_model(family), windows)
    errs = {}
    for rank in (0, 16):
        model = tiny_model(family)
        achieved = hybrid_model(model, windows, sparsity=0.5, rank=rank, method="whiten")
        assert all(abs(s - 0.5) < 1e-6 for s in achieved.values())
        errs[rank] = float((_logits(model, windows) - full).pow(2).mean())
    assert errs[16] < errs[0]
    model = tiny_model(family)
    hybrid_model(model, windows, sparsity="2:4", rank=0)
    assert torch.isfinite(_logits(model, tokens)).all()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_copy_built_layer_by_layer_equals_the_whole_copy_and_leaves_the_model(tokens, tied, dtype):
    from pruning_utils.compress.quantize import quantize_int8_by_layer

    model = tiny_model("qwen2", tie_word_embeddings=tied).to(dtype)
    if tied:
        model.tie_weights()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = quantize_int8(model, embedding=False, keep_fp32=("down_proj",))  # a deep copy, up-cast, then quantized
    whole.set_input_embeddings(model.get_input_embeddings())  # the lookup table in the model's dtype, as shared
    by_layer = quantize_int8_by_layer(model, keep_fp32=("down_proj",))
    assert torch.equal(_logits(by_layer, tokens), _logits(whole, tokens))
    assert by_layer.get_input_embeddings() is model.get_input_embeddings()  # shared, not copied
    assert all(p.dtype == dtype and torch.equal(p, before[n]) for n, p in model.named_parameters())
    layer = decoder_layers(by_layer)[0]
    assert linears.is_int8_tensor(proj(layer, "q_proj").weight) and not linears.is_int8_tensor(
        proj(layer, "down_proj").weight)
    assert by_layer.get_output_embeddings().weight.dtype == torch.float32  # CPU kernels take fp32 activations
    # an fp32 model's LM head and final norm are shared, not copied; a bf16 model's are fp32 copies
    shared = {p.data_ptr() for p in model.parameters()}
    outside = [p for n, p in by_layer.named_parameters() if ".layers." not in n]
    assert all((p.data_ptr() in shared) == (dtype == torch.float32) for p in outside if p.dtype == torch.float32
               and p is not model.get_input_embeddings().weight)
    assert by_layer.int8 and by_layer.int8_keep_fp32 == ("down_proj",) and not by_layer.int8_embedding
