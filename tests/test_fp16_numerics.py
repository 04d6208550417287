"""fp16 numerics on the CPU: the paths a T4 runs in fp16 (calibration statistics from fp16 activations, the refit,
perplexity, LoRA recovery on fp16 base weights) agree with fp32 within stated tolerances, and the accumulators cannot
overflow: Grams and moments are summed in fp32 / fp64 whatever the activations' dtype (issue 32)."""
import copy

import pytest
import torch

from pruning_utils.measure.metrics import perplexity
from pruning_utils.model.arch import decoder_layers, layer_shapes, proj
from pruning_utils.model.calibration import layerwise_grams
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.stats import GramStats, Moments
from pruning_utils.model.surgery import prune_neurons
from pruning_utils.model.tiny import tiny_model
from pruning_utils.prune.reconstruction import prune_and_reconstruct
from pruning_utils.recovery.lora import RecoveryConfig, recover

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def windows(n: int = 16, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def near_fp16_max(rows: int = 4096, width: int = 16) -> torch.Tensor:
    """fp16 activations of magnitude 0.5..1 x the fp16 maximum, both signs."""
    g = torch.Generator().manual_seed(0)
    magnitude = (0.5 + 0.5 * torch.rand(rows, width, generator=g)) * FP16_MAX
    sign = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(torch.float16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_gram_of_activations_near_the_fp16_maximum_is_finite_and_exact():
    x = near_fp16_max()
    assert torch.isinf(x[:, :2].T @ x[:, :2]).any()  # what an fp16 accumulator would hold: the test can fail
    stats = GramStats.empty(x.shape[1])
    for part in x.split(1000):  # streamed in batches, as calibration does
        stats.add(part.reshape(-1, 10, x.shape[1]) if len(part) % 10 == 0 else part)
    exact = x.double().T @ x.double()
    assert torch.isfinite(stats.gram).all() and rel(stats.gram, exact) < 1e-6
    assert rel(stats.sum, x.double().sum(0)) < 1e-9 and stats.count == x.shape[0]


def test_moments_of_activations_near_the_fp16_maximum_are_finite_and_exact():
    x = near_fp16_max().reshape(64, 64, 16)
    moments = Moments(16, torch.device("cpu"))
    for part in x.split(16):
        moments.add(part)
    exact = x.double().reshape(-1, 16)
    assert torch.isfinite(moments.m2).all()
    assert rel(moments.variance(), exact.var(0)) < 1e-5
    assert rel(moments.sq_norm(), (exact ** 2).sum(0)) < 1e-5


def _wanted(model) -> dict:
    return {li: {"o": proj(layer, "o_proj"), "down": proj(layer, "down_proj")}
            for li, layer in enumerate(decoder_layers(model))}


def test_calibration_grams_from_an_fp16_model_agree_with_fp32():
    fp32 = tiny_model("llama")
    fp16 = copy.deepcopy(fp32).half()
    ids = windows()
    a, b = layerwise_grams(fp32, ids, _wanted(fp32)), layerwise_grams(fp16, ids, _wanted(fp16))
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].gram.dtype == torch.float64 and torch.isfinite(b[key].gram).all()
        assert rel(b[key].gram, a[key].gram) < 1e-2, key  # fp16 activations: ~3 significant digits each


def test_refit_of_fp16_weights_agrees_with_fp32_and_stays_fp16():
    fp32 = tiny_model("llama")
    fp16 = copy.deepcopy(fp32).half()
    plan = PruningPlan.identity(layer_shapes(fp32), "tiny")
    plan.neurons = {li: list(range(0, 96, 3)) for li in range(3)}  # a third of every layer's MLP channels
    ids = windows()
    prune_and_reconstruct(fp32, plan, ids, mode="lstsq")
    prune_and_reconstruct(fp16, plan, ids, mode="lstsq")
    for l32, l16 in zip(decoder_layers(fp32), decoder_layers(fp16)):
        w32, w16 = proj(l32, "down_proj").weight, proj(l16, "down_proj").weight
        assert w16.dtype == torch.float16 and torch.isfinite(w16).all()
        assert rel(w16, w32) < 2e-2  # solved in fp64 from fp16 Grams, stored in fp16
    with torch.no_grad():
        assert rel(fp16(ids[:4]).logits, fp32(ids[:4]).logits) < 2e-2


def test_perplexity_in_fp16_agrees_with_fp32():
    fp32 = tiny_model("llama")
    fp16 = copy.deepcopy(fp32).half()
    chunks = windows(8, 64, seed=3)
    a = perplexity(fp32, chunks, progress=False, reference=fp32)
    b = perplexity(fp16, chunks, progress=False, reference=fp32)
    assert a["tokens"] == b["tokens"]
    assert abs(b["ppl"] / a["ppl"] - 1) < 1e-3  # log-probabilities are taken in fp32 from fp16 logits
    # fp16 rounding is all that separates the two; a KL this close to 0 is summed in fp32 rounding, which may leave it
    # a hair below 0 (-7e-10 on some CPUs' kernels)
    assert -1e-8 < b["kl"] < 1e-4


def test_lora_on_fp16_base_weights_trains_like_fp32_and_a_second_precision_runs_in_the_same_process():
    starts = torch.randint(0, 50, (32, 1), generator=torch.Generator().manual_seed(0))
    ids = 3 + (starts + torch.arange(32)) % 50  # counting: a pattern a few steps learn
    base = tiny_model("llama")
    prune_neurons(base, {li: list(range(48)) for li in range(3)})

    def run(precision: str, dtype: torch.dtype):
        cfg = RecoveryConfig(seq_len=32, batch_size=4, dropout=0.0, warmup_steps=0, lr=1e-2, max_steps=8,
                             fp16=precision)
        return recover(copy.deepcopy(base).to(dtype), None, ids, cfg, progress=False)

    merged16, s16 = run("fp16", torch.float16)
    merged32, s32 = run("no", torch.float32)  # accelerate holds one precision per process: this used to be refused
    assert next(merged16.parameters()).dtype == torch.float16
    assert all(torch.isfinite(p).all() for p in merged16.parameters())
    assert s16["loss_last"] < s16["loss_first"] - 0.05 and s32["loss_last"] < s32["loss_first"] - 0.05
    assert abs(s16["loss_last"] - s32["loss_last"]) < 0.02 * s32["loss_last"]
    with torch.no_grad():
        assert rel(merged16(ids[:4]).logits.float(), merged32(ids[:4]).logits) < 2e-2
