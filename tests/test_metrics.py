"""Tests of size, cost, quality, speed and memory measures on tiny random models."""
import copy
import math
from pathlib import Path

import pytest
import torch

from pruning_utils.measure import metrics
from pruning_utils.model.tiny import tiny_model

H, V, M, L, QW, KW = 64, 128, 96, 3, 8 * 16, 2 * 16  # tiny_model: hidden, vocab, MLP, layers, q and kv widths


def _llama_layer_params(inter=M):
    attn = (H * QW + QW) + 2 * (H * KW + KW) + (QW * H + H)  # llama tiny model has attention biases
    mlp = 2 * (H * inter + inter) + (inter * H + H)  # and MLP biases
    return attn + mlp + 2 * H  # two RMSNorms


def test_count_params_untied_matches_hand_count():
    counts = metrics.count_params(tiny_model("llama"))
    assert counts["non_embedding"] == L * _llama_layer_params() + H
    assert counts["total"] == counts["non_embedding"] + 2 * V * H


def test_count_params_tied_embedding_counted_once():
    model = tiny_model("mistral", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    layer = H * QW + 2 * H * KW + QW * H + 3 * H * M + 2 * H  # mistral: no biases
    counts = metrics.count_params(model)
    assert counts == {"total": L * layer + H + V * H, "non_embedding": L * layer + H}


def test_flops_hand_count_and_narrower_layers_cost_less():
    model = tiny_model("mistral")
    ctx = (512 + 1) / 2
    per_layer = H * (QW + 2 * KW) + QW * H + 2 * QW * ctx + 3 * H * M
    assert metrics.flops_per_token(model, 512) == pytest.approx(2 * (L * per_layer + V * H))
    narrow = tiny_model("mistral", intermediate_size=48)
    fewer_heads = tiny_model("mistral", num_attention_heads=4)
    assert metrics.flops_per_token(narrow) < metrics.flops_per_token(model)
    assert metrics.flops_per_token(fewer_heads) < metrics.flops_per_token(model)
    assert metrics.flops_per_token(model, 1024) > metrics.flops_per_token(model, 128)  # attention grows with context


def test_flops_read_per_layer_shapes_from_weights():
    model = tiny_model("mistral")
    before = metrics.flops_per_token(model)
    mlp = model.model.layers[1].mlp
    keep = torch.arange(48)  # narrow one layer's MLP by hand; the config still says 96
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = torch.nn.Linear(H, 48, bias=False)
        new.weight.data = old.weight.data[keep]
        setattr(mlp, name, new)
    down = torch.nn.Linear(48, H, bias=False)
    down.weight.data = mlp.down_proj.weight.data[:, keep]
    mlp.down_proj = down
    assert before - metrics.flops_per_token(model) == pytest.approx(2 * 3 * H * 48)


def test_checkpoint_size_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 3 * 2 ** 20)
    (tmp_path / "adapter.bin").write_bytes(b"\0" * 2 ** 19)
    (tmp_path / "config.json").write_text("{}" * 1000)
    assert metrics.checkpoint_size_mb(tmp_path) == pytest.approx(3.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.checkpoint_size_mb(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        metrics.checkpoint_size_mb(empty)


def test_perplexity_matches_the_model_loss():
    model = tiny_model("qwen2")
    chunks = torch.randint(3, V, (5, 12), generator=torch.Generator().manual_seed(0))
    out = metrics.perplexity(model, chunks, batch_size=2, progress=False)
    assert out["tokens"] == 5 * 11
    assert math.isfinite(out["nll"]) and out["ppl"] == pytest.approx(math.exp(out["nll"]))
    with torch.no_grad():
        ref = model(input_ids=chunks, labels=chunks).loss.item()
    assert out["nll"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        metrics.perplexity(model, chunks[:, :1])


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_token_scores_equal_the_whole_batch_cross_entropy_and_kl(monkeypatch, rows):
    """The row-stepped sums are the whole-batch F.cross_entropy / F.kl_div of before, to float rounding."""
    import torch.nn.functional as F

    monkeypatch.setattr(metrics, "SCORE_ROWS", rows)
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 7, 50, generator=g) * 4, torch.randn(3, 7, 50, generator=g) * 4
    targets = torch.randint(0, 50, (3, 7), generator=g)
    nll, kl = metrics.token_scores(logits, targets, ref)
    assert nll == pytest.approx(F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="sum").item(),
                                rel=1e-6)
    assert kl == pytest.approx(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                                        reduction="sum").item(), rel=1e-6)
    assert metrics.token_scores(logits, targets)[1] == 0.0
    assert metrics.token_scores(logits, targets, logits)[1] == pytest.approx(0.0, abs=1e-9)


def test_token_scores_kl_of_a_model_that_cannot_emit_some_tokens(monkeypatch):
    """-inf logits (a pruned LM head): infinite KL where the reference puts mass on a removed token, none where it
    puts none there either; the NLL of emittable targets is untouched. Found whichever row step the -inf sit in."""
    monkeypatch.setattr(metrics, "SCORE_ROWS", 2)
    g = torch.Generator().manual_seed(3)
    logits, ref = torch.randn(2, 5, 20, generator=g), torch.randn(2, 5, 20, generator=g)
    targets = torch.randint(0, 10, (2, 5), generator=g)
    pruned = logits.clone()
    pruned[..., 15:] = float("-inf")  # tokens 15.. removed; the targets are all below 10
    nll, kl = metrics.token_scores(pruned, targets, ref)
    assert math.isfinite(nll) and kl == math.inf
    blind = ref.clone()
    blind[..., 15:] = float("-inf")  # the reference cannot emit them either: p log(p / 0) with p = 0 counts 0
    kl_blind = metrics.token_scores(pruned, targets, blind)[1]
    expect = metrics.token_scores(pruned[..., :15], targets, blind[..., :15])[1]
    assert math.isfinite(kl_blind) and kl_blind == pytest.approx(expect, rel=1e-6)


def test_token_scores_never_holds_a_whole_batch_mask():
    """The check for tokens a model cannot emit runs step by step: a [batch, seq, vocab] bool mask of the whole
    batch (what the check once built) is 62.5 MiB here, the row steps' working set ~20 MiB."""
    if metrics.rss_bytes() is None:
        pytest.skip("needs Linux /proc to read resident memory")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 512, 32000, generator=g).to(torch.bfloat16)
    ref = torch.randn(4, 512, 32000, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (4, 512), generator=g)
    metrics.token_scores(logits[:, :64], targets[:, :64], ref[:, :64])  # warm the allocator's small blocks
    with metrics.track_peak_memory("cpu") as stats:
        metrics.token_scores(logits, targets, ref)
    assert stats["delta_mb"] < 45


def test_latency_on_tiny_model_gives_positive_medians():
    out = metrics.latency(tiny_model("llama"), seq_len=16, new_tokens=3, warmup=1, repeats=3)
    assert out["prefill_ms_median"] > 0 and out["decode_tok_s_median"] > 0
    assert out["prefill_ms_min"] <= out["prefill_ms_median"] <= out["prefill_ms_max"]
    assert out["device"] == "cpu" and out["dtype"] == "float32" and out["threads"] >= 1 and out["device_name"]


def test_latency_syncs_before_every_timer_read(monkeypatch):
    events = []
    clock = iter(range(1000))

    def timer():
        events.append("time")
        return float(next(clock))

    monkeypatch.setattr(metrics, "synchronize", lambda device: events.append(("sync", device.type)))
    out = metrics.latency(tiny_model("llama"), batch_size=2, seq_len=8, new_tokens=4, warmup=1, repeats=2, timer=timer)
    reads = [i for i, e in enumerate(events) if e == "time"]
    assert len(reads) == 3 * (1 + 2)  # start, after prefill, after decode, per run
    assert all(events[i - 1] == ("sync", "cpu") for i in reads)
    assert out["prefill_ms_median"] == pytest.approx(1000.0)  # each timer read advances one second
    assert out["decode_tok_s_median"] == pytest.approx(2 * 4 / 1.0)
    assert out["prefill_ms_iqr"] == 0


def _timer_from(prefill_s: list[float]):
    """Return a fake timer whose runs take the given prefill seconds (and 1 s of decode each)."""
    reads, now = [], [0.0]
    steps = iter([d for p in prefill_s for d in (0.0, p, 1.0)])

    def timer():
        now[0] += next(steps)
        reads.append(now[0])
        return now[0]

    return timer, reads


def test_latency_repeats_until_the_spread_is_acceptable_or_flags_it(monkeypatch):
    monkeypatch.setattr(metrics, "load_avg", lambda: 0.0)
    model = tiny_model("llama")
    kw = dict(seq_len=4, new_tokens=1, warmup=1, repeats=4)
    # steady timings: no extra repeat, not noisy
    timer, reads = _timer_from([9.0] + [1.0] * 20)
    out = metrics.latency(model, timer=timer, **kw)
    assert out["repeats"] == 4 and out["latency_noisy"] is False and len(reads) == 3 * 5
    # a disturbed start: extra repeats settle the IQR below 15% of the median, so the row is trusted
    timer, _ = _timer_from([9.0, 1.0, 3.0, 1.0, 3.0] + [1.0] * 20)
    out = metrics.latency(model, timer=timer, **kw)
    assert 4 < out["repeats"] <= 12 and out["latency_noisy"] is False
    assert out["prefill_ms_iqr"] <= 0.15 * out["prefill_ms_median"]
    # timings that never agree: stops at max_repeats and flags the row
    timer, _ = _timer_from([1.0, 3.0] * 20)
    out = metrics.latency(model, timer=timer, max_repeats=6, **kw)
    assert out["repeats"] == 6 and out["latency_noisy"] is True


def test_high_load_flags_latency_as_noisy(monkeypatch):
    monkeypatch.setattr(metrics, "load_avg", lambda: 64.0)
    monkeypatch.setattr(metrics, "usable_cores", lambda: 2)
    timer, _ = _timer_from([1.0] * 10)
    out = metrics.latency(tiny_model("llama"), seq_len=4, new_tokens=1, warmup=1, repeats=3, timer=timer)
    assert out["load_avg"] == 64.0 and out["latency_noisy"] is True and out["prefill_ms_iqr"] == 0
    assert metrics.is_noisy([1.0, 1.0, 1.0], load_avg=1.5, cores=2) is False
    assert metrics.is_noisy([1.0, 1.0, 1.0], load_avg=float("nan"), cores=2) is False  # no load figure: spread only
    assert metrics.is_noisy([1.0, 1.5, 2.0], load_avg=0.0, cores=2) is True


def test_sync_calls_cuda_synchronize_only_for_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    metrics.synchronize(torch.device("cpu"))
    assert calls == []
    metrics.synchronize(torch.device("cuda"))
    assert calls == [torch.device("cuda")]


def test_cpu_peak_memory_sees_a_large_allocation():
    # in a fresh process: pages that earlier tests freed lazily can be reclaimed during the block and lower RSS
    import json
    import subprocess
    import sys

    code = """
import json, torch
from pruning_utils.measure import metrics
with metrics.track_peak_memory("cpu") as stats:
    big = torch.ones(16 * 2 ** 20)  # 64 MiB
    big += 1
work = lambda: torch.ones(16 * 2 ** 20).sum()
print(json.dumps({**stats, "fn_peak": metrics.peak_memory(work, "cpu")["peak_mb"]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["kind"] in ("cpu_vmhwm", "cpu_rss_sampled", "cpu_ru_maxrss")
    assert stats["peak_mb"] >= stats["start_mb"] and stats["delta_mb"] > 40
    assert stats["fn_peak"] > 0


def test_cuda_peak_memory_path_with_fake_cuda(monkeypatch):
    state = {"reset": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(reset=1))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 250 * 2 ** 20)
    with metrics.track_peak_memory("cuda") as stats:
        pass
    assert state["reset"] == 1
    assert stats == {"kind": "cuda_max_allocated", "start_mb": 100, "peak_mb": 250, "delta_mb": 150}


def _wide_mlp_pair():
    """A tiny Llama whose MLP weights dominate its memory, and a copy with half the MLP channels."""
    from pruning_utils.model.surgery import prune_neurons

    model = tiny_model("llama", hidden_size=128, intermediate_size=4096, num_attention_heads=4, head_dim=32)
    pruned = prune_neurons(copy.deepcopy(model), {i: list(range(2048)) for i in range(3)})
    return model, pruned


def test_variant_memory_counts_only_the_model_in_process():
    model, pruned = _wide_mlp_pair()
    base = metrics.variant_peak_memory_mb(model, seq_len=16, fresh_process=False)
    small = metrics.variant_peak_memory_mb(pruned, seq_len=16, fresh_process=False)
    assert base["weights_mb"] == pytest.approx(metrics.model_bytes(model) / 2 ** 20)
    assert base["peak_memory_mb"] == pytest.approx(base["weights_mb"] + base["workspace_mb"])
    assert base["workspace_mb"] >= 0 and base["memory_kind"].startswith("in_process_cpu")
    # the baseline is still alive while the pruned copy is measured, and does not count against it
    assert small["peak_memory_mb"] < base["peak_memory_mb"]
    assert base["weights_mb"] - small["weights_mb"] == pytest.approx(3 * 3 * 128 * 2048 * 4 / 2 ** 20, rel=0.01)


def test_variant_memory_in_a_fresh_process_loads_the_checkpoint(tmp_path):
    model, _ = _wide_mlp_pair()
    out = metrics.variant_peak_memory_mb(model, seq_len=16)  # saved to a temporary checkpoint, loaded by the child
    assert out["memory_kind"].startswith("fresh_process_cpu")
    assert out["weights_mb"] == pytest.approx(metrics.model_bytes(model) / 2 ** 20, rel=1e-3)
    assert 0 <= out["workspace_mb"] < out["weights_mb"]


def test_variant_memory_on_cuda_subtracts_what_was_allocated_before(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(metrics, "_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(metrics, "_prefill", lambda m, b, s: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 900 * 2 ** 20)  # other models too
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 912 * 2 ** 20)
    out = metrics.variant_peak_memory_mb(model)
    assert out["memory_kind"] == "cuda_max_allocated" and out["workspace_mb"] == 12
    assert out["peak_memory_mb"] == pytest.approx(metrics.model_bytes(model) / 2 ** 20 + 12)


def test_environment_info_names_versions_and_commit():
    info = metrics.environment_info(tiny_model("llama"))
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["device_name"]
    assert info["torch"] == torch.__version__ and info["python"].count(".") == 2
    assert info["git_commit"] and info["transformers"] != "not installed"
    assert metrics.git_commit("/nonexistent-folder") == "unknown"


@pytest.mark.slow
class TestEmbeddedModel:
    def test_smollm_counts_flops_and_perplexity(self, embedded):
        from pruning_utils.data import sources

        model, tok = embedded
        counts = metrics.count_params(model)
        assert counts["total"] - counts["non_embedding"] == 49152 * 576  # tied: the embedding once
        assert 130e6 < counts["total"] < 140e6
        assert 2 * counts["non_embedding"] < metrics.flops_per_token(model, 512) < 2 * counts["total"] * 1.2
        chunks = sources.eval_chunks(tok, seq_len=48, max_tokens=48)  # one chunk: a 135M forward is slow on shared CPUs
        out = metrics.perplexity(model, chunks, progress=False)
        assert out["tokens"] == 47 and 1 < out["ppl"] < 200

    def test_pruned_variant_needs_less_memory_than_the_baseline(self, embedded, models_dir):
        from pruning_utils.measure.variants import pruned_copy
        from pruning_utils.model.checkpoint import save_pruned
        from pruning_utils.prune import allocation, importance

        model, tok = embedded
        windows = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(0))
        scores = importance.compute_importance(model, windows, ["magnitude"], progress=False)["magnitude"]
        pruned = pruned_copy(model, allocation.plan_both(model, scores, head_rate=0.2, mlp_rate=0.25))
        save_pruned(pruned, tok, "s3")
        base = metrics.variant_peak_memory_mb(model, spec="smollm2-135m", seq_len=128)
        small = metrics.variant_peak_memory_mb(pruned, spec="s3", seq_len=128)  # the baseline stays loaded here
        assert small["weights_mb"] < base["weights_mb"] - 50  # -25% non-embedding of ~106M fp32 parameters
        assert small["peak_memory_mb"] < base["peak_memory_mb"]
        assert base["memory_kind"] == small["memory_kind"] == "fresh_process_cpu_vmhwm"
