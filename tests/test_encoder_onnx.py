"""Encoder rows of notebook 07 on tiny random BERTs: ONNX export and ONNX Runtime INT8 against PyTorch, the low-rank
rank rules / scope / layers, heads-only and MLP-only rows, the timing protocol, the CPU / GPU row pair."""
import sys

import pandas as pd
import pytest
import torch

from pruning_utils.encoder import onnx_export as ox
from pruning_utils.encoder import surgery
from pruning_utils.encoder import tasks as et
from pruning_utils.encoder import variants as ev
from pruning_utils.encoder.arch import encoder_layer_shapes, encoder_layers, encoder_proj
from pruning_utils.model.linears import LowRankLinear
from pruning_utils.model.tiny import tiny_encoder

pytest.importorskip("onnxruntime")

INT8_ATOL = 0.05  # ONNX Runtime dynamic INT8 (per-tensor weights, per-batch activations) on a tiny random BERT
TEXTS = ["good movie", "bad film", "i loved it", "terrible plot", "what a joy", "boring and slow", "great cast",
         "awful acting"] * 2


def _batch(seed=1, shape=(5, 13), vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[-1, shape[1] // 2:] = 0  # padding must be handled the same way by both runtimes
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def _torch_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pruning_utils.measure.evaluation import judge_model_path
    return AutoTokenizer.from_pretrained(judge_model_path())


@pytest.fixture
def task():
    df = pd.DataFrame({"text": TEXTS, "label": [1, 0] * 8})
    return et.Task("toy", df, df, 2)


def test_onnx_fp32_equals_pytorch_and_int8_is_close_and_smaller(tmp_path):
    model = tiny_encoder(hidden_size=128, intermediate_size=256)
    surgery.prune_heads(model, {0: [0, 2, 3], 2: [1]})  # a pruned encoder: uneven heads and widths per layer
    surgery.prune_neurons(model, {1: list(range(0, 256, 2))})
    fp32 = ox.export_onnx(model, tmp_path / "m.onnx")
    int8 = ox.quantize_onnx(fp32, tmp_path / "m8.onnx")
    for shape in ((5, 13), (1, 3), (7, 30)):  # other batch and sequence sizes than the export's example
        batch = _batch(shape=shape)
        ref = _torch_logits(model, batch)
        assert (ox.OnnxClassifier(fp32)(**batch).logits - ref).abs().max() < 1e-4
        assert (ox.OnnxClassifier(int8)(**batch).logits - ref).abs().max() < INT8_ATOL
    assert ox.file_mb(int8) < ox.file_mb(fp32) / 2


def test_missing_onnxruntime_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnx onnxruntime"):
        ox.export_onnx(tiny_encoder(), tmp_path / "m.onnx")


def test_onnx_rows_are_measured_as_the_pytorch_rows(tokenizer, task, tmp_path):
    base = tiny_encoder(vocab_size=tokenizer.vocab_size)
    timing = dict(batch_size=8, max_length=16, warmup=1, iters=3)
    ref = ev.measure("baseline", base, tokenizer, task, **timing)
    rows = {}
    for name in ("onnx_fp32", "onnx_int8"):
        model, recipe = ev.build(name, base, tokenizer, task, task.train, 0.25, 0.25, 1, 1e-4, 0.5, 8, 16, 0,
                                 onnx_dir=tmp_path)
        assert isinstance(model, ox.OnnxClassifier) and model.path.parent == tmp_path
        rows[name] = ev.measure(name, model, tokenizer, task, reference=ref, recipe=recipe, **timing)
        assert list(rows[name]) == list(ev.ENCODER_COLUMNS) and rows[name]["runtime"] == "onnxruntime"
    assert rows["onnx_fp32"]["accuracy"] == ref["accuracy"] and rows["onnx_fp32"]["params"] == ref["params"]
    assert rows["onnx_int8"]["int8"] and rows["onnx_int8"]["size_mb"] < rows["onnx_fp32"]["size_mb"]
    m = ox.evaluate_onnx(tmp_path / "onnx_fp32-fp32.onnx", tokenizer, task, 8, 16, warmup=1, iters=3)
    assert m["accuracy"] == ref["accuracy"] and m["ms_per_batch"] > 0


def test_heads_only_and_mlp_only_rows(tokenizer, task):
    base = tiny_encoder(vocab_size=tokenizer.vocab_size)
    shapes = {}
    for name in ("heads_only_pruned", "mlp_only_pruned", "fluctuation_lstsq"):
        model, _ = ev.build(name, base, tokenizer, task, task.train, 0.25, 0.25, 1, 1e-4, 0.5, 8, 16, 0)
        shapes[name] = [(s.n_heads, s.intermediate) for s in encoder_layer_shapes(model)]
    assert shapes == {"heads_only_pruned": [(3, 96)] * 3, "mlp_only_pruned": [(4, 72)] * 3,
                      "fluctuation_lstsq": [(3, 72)] * 3}


def _plant_rank3(model):
    """Make layer 0's intermediate dense rank 3 plus small noise (96 x 64)."""
    g = torch.Generator().manual_seed(0)
    lin = encoder_proj(encoder_layers(model)[0], "intermediate")
    a, b = torch.randn(96, 3, generator=g), torch.randn(3, 64, generator=g)
    with torch.no_grad():
        lin.weight.copy_(a @ b + 0.01 * torch.randn(96, 64, generator=g))


def test_lowrank_rules_scope_and_layers():
    batch = _batch()
    wide = tiny_encoder(hidden_size=128, intermediate_size=256)
    ranks = ev.lowrank(wide, ev.LowRankOptions(ratio=0.5))  # the default: surgery.lowrank_encoder's ranks
    assert len(ranks) == 18 and set(ranks.values()) == {32, 42}  # 128x128: 8192 // 256; 256x128: 16384 // 384
    # the output dense holds random weights: near-full energy rank (its factors would not save weights: it stays
    # dense), and pure noise to Gavish-Donoho (rank 1)
    for rule, k_min, want in (("energy", 1, {(0, "intermediate"): 3}), ("energy", 5, {(0, "intermediate"): 5}),
                              ("gavish_donoho", 1, {(0, "intermediate"): 3, (0, "output"): 1})):
        model = tiny_encoder()
        _plant_rank3(model)
        ref = _torch_logits(model, batch)
        ranks = ev.lowrank(model, ev.LowRankOptions(rule=rule, k_min=k_min, scope="ffn", layers="0"))
        assert ranks == want
        assert isinstance(encoder_proj(encoder_layers(model)[0], "intermediate"), LowRankLinear)
        if rule == "energy":
            assert (_torch_logits(model, batch) - ref).abs().max() < 0.05
    model = tiny_encoder()
    ranks = ev.lowrank(model, ev.LowRankOptions(ratio=0.25, scope="attention", layers="1,2"))
    assert set(ranks) == {(li, p) for li in (1, 2) for p in ("query", "key", "value", "attn_out")}
    kinds = {(li, p): isinstance(encoder_proj(layer, p), LowRankLinear)
             for li, layer in enumerate(encoder_layers(model)) for p in ev.LOWRANK_SCOPES["all"]}
    assert {k for k, low in kinds.items() if low} == set(ranks)
    model, _ = ev.build("lowrank", tiny_encoder(), None, None, None, 0.25, 0.25, 1, 1e-4, 0.5, 8, 16, 0,
                        lowrank_options=ev.LowRankOptions(ratio=0.25, scope="ffn"))
    assert isinstance(encoder_proj(encoder_layers(model)[2], "output"), LowRankLinear)
    assert not isinstance(encoder_proj(encoder_layers(model)[2], "query"), LowRankLinear)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        ev.lowrank(tiny_encoder(), ev.LowRankOptions(layers="3"))
    with pytest.raises(ValueError, match=r"down to -3"):
        ev.lowrank(tiny_encoder(), ev.LowRankOptions(layers="-4"))
    assert ev.lowrank_layers("-1,-2", 3) == [1, 2] and ev.lowrank_layers("0,-3", 3) == [0]
    # the rows with their own rule: energy / Gavish-Donoho with a floor / FFN of the last layers
    for name, want in (("lowrank_energy", "energy 0.995 k_min 1, all, layers all"),
                       ("lowrank_gavish_donoho", "gavish_donoho k_min 8, all, layers all"),
                       ("lowrank_ffn_last_layers", "ratio 0.5 k_min 1, ffn, layers -3,-2,-1")):
        model, recipe = ev.build(name, tiny_encoder(), None, None, None, 0.25, 0.25, 1, 1e-4, 0.5, 8, 16, 0)
        assert recipe["lowrank_rule"] == want
    last = {li for li, layer in enumerate(encoder_layers(model))
            if isinstance(encoder_proj(layer, "output"), LowRankLinear)}
    assert last == {0, 1, 2} and not isinstance(encoder_proj(encoder_layers(model)[0], "query"), LowRankLinear)
    with pytest.raises(ValueError, match="unknown low-rank scope 'mlp'; known: all, attention, ffn"):
        ev.lowrank(tiny_encoder(), ev.LowRankOptions(scope="mlp"))


def test_timing_protocol_returns_median_and_iqr():
    calls = []
    t = et.timing(lambda: calls.append(1), warmup=3, iters=7)
    assert len(calls) == 10 and set(t) == {"median", "iqr"} and t["median"] >= 0 and t["iqr"] >= 0
    with pytest.raises(ValueError, match="iters >= 1"):
        et.timing(lambda: None, warmup=0, iters=0)


def test_gpu_row_pair_only_for_fp32_pytorch_rows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.devices("baseline") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.devices("baseline") == ev.devices("heads_only_pruned") == ["cpu", "cuda"]
    assert ev.devices("baseline_int8") == ev.devices("onnx_fp32") == ev.devices("baseline", gpu_pair=False) == ["cpu"]
