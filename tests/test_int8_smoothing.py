"""SmoothQuant-style smoothing before dynamic INT8, and projections kept in fp32: exact in fp32, better in INT8."""
import pytest
import torch

from pruning_utils.compress.quantize import quantize_int8, smooth_for_int8
from pruning_utils.model.arch import decoder_layers, proj
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta, save_pruned
from pruning_utils.model.linears import is_int8_tensor
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _with_outliers(model, factor: float = 300.0):
    """Give channel 5 of every norm-fed input and of every down_proj input a huge range, leaving the function equal."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.input_layernorm.weight[5] *= factor
            for name in ("q_proj", "k_proj", "v_proj"):
                proj(layer, name).weight[:, 5] /= factor
            up, down = proj(layer, "up_proj"), proj(layer, "down_proj")
            up.weight[7] *= factor
            if up.bias is not None:
                up.bias[7] *= factor
            down.weight[:, 7] /= factor
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_smoothing_leaves_the_fp32_function_unchanged(family, windows):
    model = tiny_model(family)
    before = _logits(model, windows)
    scales = smooth_for_int8(model, windows, alpha=0.5, progress=False)
    assert len(scales) == len(decoder_layers(model))
    assert any(not torch.allclose(s, torch.ones_like(s)) for d in scales for s in d.values())  # it did rescale
    torch.testing.assert_close(_logits(model, windows), before, atol=1e-4, rtol=1e-4)


def test_smoothing_cuts_the_int8_error_of_outlier_channels(windows):
    model = _with_outliers(tiny_model("llama"))
    ref = _logits(model, windows)
    plain = (_logits(quantize_int8(model, mode="dynamic"), windows) - ref).pow(2).mean()
    smooth = quantize_int8(model, mode="dynamic", smooth_windows=windows, smooth_alpha=0.5, progress=False)
    smoothed = (_logits(smooth, windows) - ref).pow(2).mean()
    assert smoothed < 0.5 * plain
    torch.testing.assert_close(_logits(model, windows), ref)  # the source model is not touched (a copy is smoothed)


def test_keep_fp32_leaves_named_projections_unquantized_and_round_trips(tmp_path, windows):
    model = tiny_model("llama")
    q = quantize_int8(model, mode="dynamic", smooth_windows=windows, keep_fp32=["down_proj"], progress=False)
    for layer in decoder_layers(q):
        assert not is_int8_tensor(proj(layer, "down_proj").weight)
        assert is_int8_tensor(proj(layer, "up_proj").weight)
    folder = save_pruned(q, TinyTokenizer(), tmp_path / "int8")
    meta = read_checkpoint_meta(folder)
    assert meta["weights"] == "int8"
    back, _ = load_pruned(folder)
    assert back.int8_keep_fp32 == ("down_proj",) and back.int8_smoothing == pytest.approx(0.65)
    assert back.int8_mode == "dynamic" and not is_int8_tensor(proj(decoder_layers(back)[0], "down_proj").weight)
    assert torch.equal(_logits(back, windows), _logits(q, windows))


def test_bad_int8_options_are_refused(windows):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown projection"):
        quantize_int8(model, keep_fp32=["down"])
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        quantize_int8(model, smooth_windows=windows, smooth_alpha=1.5)
