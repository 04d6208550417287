"""Layer-wise calibration: walking the layers reproduces the model, layer-wise Grams equal a full-model pass."""
import pytest
import torch

from pruning_utils.model import calibration
from pruning_utils.model.arch import decoder_layers, proj
from pruning_utils.model.stats import GramStats
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.reconstruction import collect_grams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def test_walk_layers_reproduces_hidden_states(family):
    model, w = tiny_model(family), _windows()
    with torch.no_grad():
        ref = model(input_ids=w[:4], output_hidden_states=True, use_cache=False).hidden_states
    seen = {li: hidden[0] for li, _, hidden, _ in calibration.walk_layers(model, w, batch_size=4)}
    for li, h in seen.items():
        torch.testing.assert_close(h, ref[li], rtol=0, atol=1e-6)


def test_replay_equals_full_logits():
    model, w = tiny_model("qwen3"), _windows(2)
    with torch.no_grad():
        logits, inputs = calibration.capture_batch(model, w)
        for start in (0, 2):
            torch.testing.assert_close(calibration.replay(model, inputs, start), logits, rtol=0, atol=1e-5)


def test_layerwise_grams_equal_a_full_pass(family):
    model, w = tiny_model(family), _windows()
    layerwise = collect_grams(model, w, batch_size=4)
    full: dict = {}
    modules = {(li, n): proj(layer, n) for li, layer in enumerate(decoder_layers(model))
               for n in ("o_proj", "down_proj")}
    for key, m in modules.items():
        full[key] = GramStats.empty(m.in_features)
    calibration.stream_inputs(model, w, modules, lambda key, x: full[key].add(x), batch_size=4)
    assert set(layerwise) == set(full)
    for key in full:
        assert layerwise[key].count == full[key].count
        torch.testing.assert_close(layerwise[key].gram, full[key].gram, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(layerwise[key].sum, full[key].sum, rtol=1e-6, atol=1e-9)


def test_grams_of_some_layers_and_storage():
    model, w = tiny_model("llama"), _windows()
    stats = collect_grams(model, w, layers=[1], which=["down_proj"], storage="cpu")
    assert list(stats) == [(1, "down_proj")] and stats[(1, "down_proj")].gram.device.type == "cpu"


def test_forward_until_stops_early():
    model, w = tiny_model("mistral"), _windows(2)
    calls = []
    last = decoder_layers(model)[0]
    hook = decoder_layers(model)[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        assert calibration.forward_until(model, w, last) is None and not calls
    finally:
        hook.remove()


def _peak_live_grams(n_layers: int, storage) -> int:
    """Return the most GramStats accumulators alive at once on the model's device while collecting every layer's."""
    import gc
    import weakref

    model, w = tiny_model("llama", num_hidden_layers=n_layers), _windows()
    live: list = []
    peak = 0
    original = GramStats.empty.__func__

    def tracked(cls, dim, device="cpu"):
        nonlocal peak
        stats = original(cls, dim, device)
        live.append(weakref.ref(stats.gram))
        gc.collect()
        peak = max(peak, sum(r() is not None and r().device.type == "cpu" for r in live))
        return stats

    GramStats.empty = classmethod(tracked)
    try:
        collect_grams(model, w, batch_size=3, storage=storage)
    finally:
        GramStats.empty = classmethod(original)
    return peak


def test_statistics_memory_is_one_layer_whatever_the_depth():
    # storage elsewhere than the model's device (meta stands in for the host of a GPU run): the device holds one
    # layer's accumulators (o_proj + down_proj) at a time, for 2 layers as for 8
    assert _peak_live_grams(2, "meta") == _peak_live_grams(8, "meta") == 2
    # kept where the model is (the default), they add up with depth
    assert _peak_live_grams(8, None) > _peak_live_grams(2, None)
