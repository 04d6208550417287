"""Importance criteria: shapes, determinism, streaming, hook hygiene, and semantic scores equal to
brute-force ablation."""
import pytest
import torch

from pruning_utils.model.arch import decoder_layers, layer_shapes
from pruning_utils.model.hooks import hooks, masked
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.importance import CRITERIA, compute_importance, semantic
from pruning_utils.prune.scores import Scores, load_scores, save_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["random", "magnitude", "activation", "fluctuation", "tfidf", "tfidf_topic", "taylor", "mix"]



@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # biases on q/o/gate/up/down: the ownership sums see them


@pytest.fixture(scope="module")
def all_scores(model, windows):
    return compute_importance(model, windows, list(CRITERIA), progress=False, n_topics=3, semantic_max_windows=4)


def _no_hooks_left(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _assert_shapes(model, s: Scores) -> None:
    shapes = layer_shapes(model)
    assert [tuple(t.shape) for t in s.heads] == [(x.n_heads,) for x in shapes]
    assert [tuple(t.shape) for t in s.neurons] == [(x.intermediate,) for x in shapes]
    for t in s.heads + s.neurons:
        assert t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all()


def test_every_criterion_has_per_layer_shapes(model, all_scores):
    assert set(all_scores) == set(CRITERIA)
    for name, s in all_scores.items():
        _assert_shapes(model, s)
        assert s.criterion == name


def test_shapes_follow_pruned_layers(windows):
    from pruning_utils.model import surgery

    model = tiny_model("qwen2")
    surgery.prune_heads(model, {1: [0, 1, 4, 5]})
    surgery.prune_neurons(model, {2: list(range(40))})
    scores = compute_importance(model, windows, FAST + ["semantic"], progress=False, semantic_max_windows=2)
    for s in scores.values():
        _assert_shapes(model, s)
    assert scores["taylor"].heads[1].shape == (4,) and scores["activation"].neurons[2].shape == (40,)


def test_deterministic_with_seed(model, windows, all_scores):
    again = compute_importance(model, windows, ["random", "activation", "taylor", "tfidf_topic"], progress=False,
                               n_topics=3)
    for name, s in again.items():
        for a, b in zip(s.heads + s.neurons, all_scores[name].heads + all_scores[name].neurons):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    other = compute_importance(model, windows, ["random"], seed=1)["random"]
    assert not torch.equal(other.heads[0], again["random"].heads[0])


def test_random_differs_from_magnitude(all_scores):
    r, m = all_scores["random"], all_scores["magnitude"]
    assert not torch.equal(r.heads[0].argsort(), m.heads[0].argsort())
    assert not torch.equal(r.neurons[0].argsort(), m.neurons[0].argsort())


def test_magnitude_is_l1_of_owned_weights(model, all_scores):
    attn, mlp = decoder_layers(model)[1].self_attn, decoder_layers(model)[1].mlp
    h, hd = 3, 16
    rows = slice(h * hd, (h + 1) * hd)
    want = (attn.q_proj.weight[rows].abs().sum() + attn.q_proj.bias[rows].abs().sum()
            + attn.o_proj.weight[:, rows].abs().sum())
    assert torch.isclose(all_scores["magnitude"].heads[1][h], want.detach())
    j = 7
    want = (mlp.gate_proj.weight[j].abs().sum() + mlp.up_proj.weight[j].abs().sum()
            + mlp.down_proj.weight[:, j].abs().sum() + mlp.gate_proj.bias[j].abs() + mlp.up_proj.bias[j].abs())
    assert torch.isclose(all_scores["magnitude"].neurons[1][j], want.detach())


def test_hooks_and_grad_state_restored(model, all_scores):
    assert _no_hooks_left(model)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not model.training


def test_hooks_removed_after_error(windows):
    model = tiny_model("mistral")
    model.train()
    for name in ("activation", "taylor", "semantic"):
        with pytest.raises(RuntimeError, match="boom"):
            # the error is raised inside the calibration pass, while the criterion's hooks are registered
            def boom(mod, args):
                raise RuntimeError("boom")
            with hooks((decoder_layers(model)[2].mlp.up_proj, "pre", boom)):
                compute_importance(model, windows, [name], progress=False, semantic_max_windows=2)
        assert _no_hooks_left(model), name
        assert all(p.requires_grad and p.grad is None for p in model.parameters()), name
        assert model.training, name


def test_semantic_heads_equal_brute_force_ablation(model, windows):
    w = windows[:4]
    scores = semantic(model, windows, batch_size=2, semantic_max_windows=4, progress=False).heads

    def logprobs():
        with torch.no_grad():
            return torch.log_softmax(model(w).logits[:, :-1], -1)

    clean = logprobs()
    nll = lambda lp: -lp.gather(-1, w[:, 1:, None]).mean()  # noqa: E731
    for layer, got in enumerate(scores):
        want = []
        for h in range(8):
            with masked(model, heads={layer: [h]}):
                lp = logprobs()
            kl = (clean.exp() * (clean - lp)).sum(-1).mean()
            want.append(float(kl + (nll(lp) - nll(clean)).clamp(min=0)))
        want = torch.tensor(want)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), (layer, got, want)
        assert torch.equal(got.argsort(), want.argsort())


def test_semantic_neurons_predict_ablation_loss_change(model, windows):
    """|sum a * dL/da| is the first-order loss change: check it against real ablations of the strongest neurons."""
    s = compute_importance(model, windows, ["semantic"], progress=False, semantic_max_windows=1)["semantic"].neurons[0]

    def loss():
        with torch.no_grad():
            lp = torch.log_softmax(model(windows).logits[:, :-1], -1)
            return float(-lp.gather(-1, windows[:, 1:, None]).mean())

    base = loss()
    top, bottom = s.argsort(descending=True)[:3], s.argsort()[:3]
    deltas = {}
    for name, idx in (("top", top), ("bottom", bottom)):
        with masked(model, neurons={0: idx.tolist()}):
            deltas[name] = abs(loss() - base)
    assert deltas["top"] > deltas["bottom"]


def test_streaming_matches_one_batch(model, windows):
    two = compute_importance(model, windows, ["activation", "fluctuation", "tfidf"], batch_size=4, progress=False)
    one = compute_importance(model, windows, ["activation", "fluctuation", "tfidf"], batch_size=8, progress=False)
    for name in one:
        for a, b in zip(one[name].heads + one[name].neurons, two[name].heads + two[name].neurons):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-8), name


def test_mix_is_weighted_rank_combination(model, windows, all_scores):
    m = compute_importance(model, windows, ["mix"], mix_weights={"magnitude": 1.0}, progress=False)["mix"]
    assert torch.equal(m.heads[2].argsort(), all_scores["magnitude"].heads[2].argsort())
    assert m.heads[2].min() == 0 and m.heads[2].max() == 1


def test_unknown_criterion_and_option(model, windows):
    with pytest.raises(ValueError, match=r"unknown criterion 'tfidff'; known: random, magnitude, activation"):
        compute_importance(model, windows, ["tfidff"])
    with pytest.raises(ValueError, match="unknown importance option"):
        compute_importance(model, windows, ["activation"], n_topic=3)
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        compute_importance(model, windows, ["mix"], mix_weights={"nope": 1.0})


def test_save_load_round_trip(tmp_path, all_scores):
    import pandas as pd

    folder = save_scores(all_scores, tmp_path / "scores")
    back = load_scores(folder)
    assert set(back) == set(all_scores)
    for name, s in back.items():
        assert s.criterion == name
        for a, b in zip(s.heads + s.neurons, all_scores[name].heads + all_scores[name].neurons):
            assert torch.equal(a, b)
    table = pd.read_csv(folder / "importance_summary.csv")
    assert {"criterion", "kind", "layer", "mean", "std", "min", "max"} <= set(table.columns)
    assert len(table) == len(all_scores) * 2 * 3


@pytest.mark.slow
class TestEmbedded:
    def test_forward_and_taylor_on_smollm2(self, embedded):
        model, _ = embedded
        w = torch.randint(3, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
        scores = compute_importance(model, w, ["activation", "fluctuation", "tfidf", "taylor"], batch_size=2,
                                    progress=False)
        for s in scores.values():
            assert len(s.heads) == 30 and s.heads[0].shape == (9,) and s.neurons[0].shape == (1536,)
            assert all(torch.isfinite(t).all() for t in s.heads + s.neurons)
        assert _no_hooks_left(model)
