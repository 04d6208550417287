"""Offload mode on CPU: the model stays home, one decoder layer at a time goes to the compute device and back;
the offloaded walks give the same statistics as the normal ones. A CUDA test does the real move when a GPU is there."""
from contextlib import contextmanager

import pytest
import torch

from pruning_utils.model import calibration
from pruning_utils.model.arch import decoder_layers
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune import importance
from pruning_utils.prune.reconstruction import collect_grams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def moves(monkeypatch):
    """Record every `on_device` entry and exit of a decoder layer; fail when two layers are away at once."""
    real = calibration.on_device
    log: list[tuple[str, int]] = []
    away: set[int] = set()

    @contextmanager
    def spy(module, device):
        if device is None or not hasattr(module, "self_attn"):  # no offload, or the final norm
            with real(module, device) as m:
                yield m
            return
        assert not away, f"layer {id(module)} moved while {away} is still away"
        away.add(id(module))
        log.append(("in", id(module)))
        try:
            with real(module, device) as m:
                yield m
        finally:
            away.discard(id(module))
            log.append(("out", id(module)))

    monkeypatch.setattr(calibration, "on_device", spy)
    return log


def _one_at_a_time(model, log) -> None:
    ids = [id(layer) for layer in decoder_layers(model)]
    assert log == [(kind, i) for i in ids for kind in ("in", "out")], "each layer goes out and back once, in order"


def test_to_device_moves_nested_tensors():
    t = torch.ones(2)
    moved = calibration.to_device(((t, None), {"mask": t, "n": 3}), "cpu")
    assert isinstance(moved, tuple) and moved[0][1] is None and moved[1]["n"] == 3 and torch.equal(moved[1]["mask"], t)
    assert calibration.to_device(t, None) is t


def test_offloaded_walk_reproduces_the_hidden_states(family, moves):
    model, w = tiny_model(family), _windows()
    normal = [(li, [h.clone() for h in hidden]) for li, _, hidden, _ in calibration.walk_layers(model, w, 4)]
    assert not moves
    offloaded = [(li, [h.clone() for h in hidden])
                 for li, _, hidden, _ in calibration.walk_layers(model, w, 4, device="cpu")]
    _one_at_a_time(model, moves)
    for (li, a), (lj, b) in zip(normal, offloaded):
        assert li == lj and all(torch.equal(x, y) for x, y in zip(a, b))


def test_offloaded_grams_equal_the_normal_ones(moves):
    model, w = tiny_model("qwen2"), _windows()
    normal = collect_grams(model, w, batch_size=4)
    offloaded = collect_grams(model, w, batch_size=4, device="cpu")
    _one_at_a_time(model, moves)
    assert set(normal) == set(offloaded)
    for key in normal:
        assert torch.equal(normal[key].gram, offloaded[key].gram) and normal[key].count == offloaded[key].count


def test_offloaded_forward_statistics_equal_the_one_pass_forward(moves):
    model, w = tiny_model("llama"), _windows()
    crit = ["activation", "fluctuation", "tfidf", "tfidf_topic"]
    normal = importance.compute_importance(model, w, crit, progress=False, n_topics=2)
    offloaded = importance.compute_importance(model, w, crit, progress=False, n_topics=2, compute_device="cpu")
    _one_at_a_time(model, moves)
    for name in crit:
        for a, b in zip(normal[name].heads + normal[name].neurons, offloaded[name].heads + offloaded[name].neurons):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert normal[name].provenance == offloaded[name].provenance  # the compute device is not a recipe change


def test_offload_refuses_the_passes_that_need_the_whole_model():
    model, w = tiny_model("llama"), _windows(2)
    for crit in ("taylor", "semantic"):
        with pytest.raises(RuntimeError, match="offload mode.*drop .*CRITERIA.*OFFLOAD='off'"):
            importance.compute_importance(model, w, [crit], progress=False, compute_device="cpu")


def test_layers_return_home_after_an_error_inside_the_walk():
    model, w = tiny_model("llama"), _windows(2)
    homes = [p.device for p in model.parameters()]
    with pytest.raises(KeyError):
        for li, layer, hidden, calls in calibration.walk_layers(model, w, 2, device="cpu"):
            raise KeyError("boom")
    assert [p.device for p in model.parameters()] == homes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real host <-> device move")
def test_offload_moves_each_layer_to_the_gpu_and_back():
    model, w = tiny_model("llama"), _windows()
    normal = collect_grams(model, w, batch_size=4)
    seen = []
    for li, layer, hidden, calls in calibration.walk_layers(model, w, 4, device="cuda"):
        seen.append({p.device.type for p in layer.parameters()} | {h.device.type for h in hidden})
        assert all(p.device.type == "cpu" for j, other in enumerate(decoder_layers(model)) if j != li
                   for p in other.parameters())
    assert seen == [{"cuda"}] * len(decoder_layers(model))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    offloaded = collect_grams(model, w, batch_size=4, device="cuda")
    for key in normal:
        assert offloaded[key].gram.device.type == "cpu"
        torch.testing.assert_close(normal[key].gram, offloaded[key].gram, rtol=1e-5, atol=1e-6)


def _plan(model):
    from pruning_utils.prune import allocation

    scores = importance.compute_importance(model, _windows(2), ["magnitude"], progress=False)["magnitude"]
    return allocation.plan_both(model, scores, head_rate=0.5, mlp_rate=0.5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_streamed_one_shot_refit_equals_the_refit_from_every_layers_grams(family):
    """Notebooks 02/03 without held Grams: one layer's Grams at a time, the same weights to 1e-6 relative."""
    import copy

    from pruning_utils.prune.reconstruction import reconstruct_in_place

    model, w = tiny_model(family), _windows()
    plan = _plan(model)
    held = reconstruct_in_place(copy.deepcopy(model), plan, w, sequential=False, stats=collect_grams(model, w))
    streamed = reconstruct_in_place(copy.deepcopy(model), plan, w, sequential=False)
    offloaded = reconstruct_in_place(copy.deepcopy(model), plan, w, sequential=False, device="cpu")
    for a, b, c in zip(held.parameters(), streamed.parameters(), offloaded.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert torch.equal(b, c)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), streamed.parameters()))


def test_offloaded_sequential_refit_equals_the_normal_one(moves):
    import copy

    from pruning_utils.prune.reconstruction import prune_and_reconstruct

    model, w = tiny_model("mistral"), _windows()
    plan = _plan(model)
    normal = prune_and_reconstruct(copy.deepcopy(model), plan, w, sequential=True)
    offloaded_model = copy.deepcopy(model)
    offloaded = prune_and_reconstruct(offloaded_model, plan, w, sequential=True, device="cpu")
    assert len(moves) == 2 * len(decoder_layers(model))
    for a, b in zip(normal.parameters(), offloaded.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
class TestEmbedded:
    """On SmolLM2-135M: the memory-short paths of notebooks 02/03 give the same quality figures."""

    def test_streamed_grams_and_reload_give_the_same_perplexity(self, embedded):
        import copy

        from pruning_utils.measure.metrics import perplexity
        from pruning_utils.measure.variants import Unpruned
        from pruning_utils.prune import allocation

        model, _ = embedded
        w = torch.randint(3, 40000, (4, 64), generator=torch.Generator().manual_seed(0))
        chunks = torch.randint(3, 40000, (2, 64), generator=torch.Generator().manual_seed(1))
        scores = importance.compute_importance(model, w, ["magnitude"], progress=False)["magnitude"]
        plan = allocation.plan_both(model, scores, head_rate=0.2, mlp_rate=0.25)
        held = Unpruned(model=model).variant(plan, w, "lstsq", sequential=False, stats=collect_grams(model, w))
        streamed = Unpruned(model=copy.deepcopy(model), build="reload", spec="smollm2-135m", device="cpu",
                            dtype="float32").variant(plan, w, "lstsq", sequential=False)
        a, b = perplexity(held, chunks, progress=False)["ppl"], perplexity(streamed, chunks, progress=False)["ppl"]
        assert b == pytest.approx(a, rel=1e-6)


def test_offloaded_perplexity_equals_the_plain_forward(monkeypatch, moves):
    from pruning_utils.measure import metrics

    monkeypatch.setattr(calibration, "OFFLOAD_WINDOWS", 4)  # two layer walks over 5 chunks (4 + 1)
    model = tiny_model("qwen2", tie_word_embeddings=True)
    chunks = _windows(5, 12)
    plain = metrics.perplexity(model, chunks, batch_size=2, progress=False)
    offloaded = metrics.perplexity(model, chunks, batch_size=2, progress=False, device="cpu")
    assert offloaded["tokens"] == plain["tokens"] and offloaded["nll"] == pytest.approx(plain["nll"], rel=1e-6)
    assert len(moves) == 2 * 2 * len(decoder_layers(model))
