"""Self-generated calibration text and mixtures of text sources (tiny models, temporary cache)."""
import pytest
import torch

from pruning_utils.data import selfgen, sources
from pruning_utils.data.sources import DataSourceError
from pruning_utils.model.tiny import TinyTokenizer, tiny_model


@pytest.fixture
def tiny():
    return tiny_model("llama", seed=0), TinyTokenizer()


def test_selfgen_is_deterministic_for_a_seed_and_cached(tiny, models_dir):
    model, tok = tiny
    a = selfgen.sample_windows(model, tok, 5, 24, seed=3, batch_size=2)
    files = sorted((models_dir / "_cache" / "selfgen").glob("calibration-*.safetensors"))
    assert a.shape == (5, 24) and a.dtype == torch.long and len(files) == 3  # one file per batch of 2
    assert (a[:, 0] == tok.bos_token_id).all()  # every window starts from BOS
    for f in files:
        f.unlink()
    b = selfgen.sample_windows(model, tok, 5, 24, seed=3, batch_size=2)  # generated again, not read
    assert torch.equal(a, b)
    c = selfgen.sample_windows(model, tok, 5, 24, seed=4, batch_size=2)
    assert not torch.equal(a, c)
    # a cache hit returns the stored windows: overwrite the cache and it is what comes back
    from safetensors.torch import save_file
    settings = selfgen.sample_settings(model, 24, 3, 1.0, 0.95, selfgen.NEUTRAL_PROMPTS, "calibration", 2)
    path = selfgen.cache_path(settings, 0)
    assert path.exists()
    save_file({"ids": torch.zeros(2, 24, dtype=torch.long)}, str(path))
    assert int(selfgen.sample_windows(model, tok, 2, 24, seed=3, batch_size=2).sum()) == 0
    # fewer samples are a prefix of more: batches do not depend on how many were asked for
    assert torch.equal(selfgen.sample_windows(model, tok, 3, 24, seed=4, batch_size=2), c[:3])


def test_cache_key_follows_the_model_and_purpose(tiny, models_dir):
    model, tok = tiny
    base = selfgen.sample_settings(model, 16, 0, 1.0, 0.95, selfgen.NEUTRAL_PROMPTS, "calibration", 16)
    other = selfgen.sample_settings(tiny_model("llama", seed=1), 16, 0, 1.0, 0.95, selfgen.NEUTRAL_PROMPTS,
                                    "calibration", 16)
    fid = dict(base, purpose="fidelity")
    paths = {selfgen.cache_path(s, 0) for s in (base, other, fid)}
    assert len(paths) == 3
    cal = selfgen.sample_windows(model, tok, 4, 16, seed=0)
    held = sources.fidelity_chunks(model, tok, n_tokens=64, seq_len=16, seed=0)
    assert held.shape == (4, 16) and not torch.equal(cal, held)  # same seed, distinct streams


def test_mixture_parsing_honours_and_checks_weights():
    assert sources.parse_mixture("embedded") == [("embedded", 1.0)]
    assert sources.parse_mixture("embedded+selfgen") == [("embedded", 0.5), ("selfgen", 0.5)]
    assert sources.parse_mixture("embedded:0.75+selfgen:0.25") == [("embedded", 0.75), ("selfgen", 0.25)]
    assert sources.mixture_counts([("a", 0.75), ("b", 0.25)], 10) == [8, 2]
    assert sum(sources.mixture_counts([("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)], 64)) == 64
    for bad in ("embedded:0.5+selfgen:0.6", "embedded:0.5+selfgen", "embedded:-0.5+selfgen:1.5",
                "embeded+selfgen", "embedded+", "embedded:0.5+embedded:0.5"):
        with pytest.raises(DataSourceError):
            sources.parse_mixture(bad)
    with pytest.raises(DataSourceError, match="unknown text source 'embeded'"):
        sources.calibration_windows(TinyTokenizer(), "embeded:0.5+selfgen:0.5", n_samples=2, seq_len=8)


def test_mixed_calibration_windows_take_each_share(tiny, models_dir):
    model, tok = tiny
    with pytest.raises(DataSourceError, match="pass model="):
        sources.calibration_windows(tok, "embedded:0.5+selfgen:0.5", n_samples=4, seq_len=16)
    mixed = sources.calibration_windows(tok, "embedded:0.75+selfgen:0.25", n_samples=8, seq_len=16, seed=0, model=model)
    gen = selfgen.sample_windows(model, tok, 2, 16, seed=0)
    text = sources.calibration_windows(tok, "embedded", n_samples=6, seq_len=16, seed=0)
    rows = {tuple(r.tolist()) for r in mixed}
    assert mixed.shape == (8, 16)
    assert {tuple(r.tolist()) for r in gen} <= rows and {tuple(r.tolist()) for r in text} <= rows
    again = sources.calibration_windows(tok, "embedded:0.75+selfgen:0.25", n_samples=8, seq_len=16, seed=0, model=model)
    assert torch.equal(mixed, again)


def test_eval_chunks_of_a_mixture_use_its_text_parts():
    tok = TinyTokenizer()
    plain = sources.eval_chunks(tok, "embedded", seq_len=32, max_tokens=256)
    assert torch.equal(sources.eval_chunks(tok, "embedded:0.5+selfgen:0.5", seq_len=32, max_tokens=256), plain)
    with pytest.raises(DataSourceError, match="fidelity"):
        sources.eval_chunks(tok, "selfgen", seq_len=32, max_tokens=256)


def test_fidelity_and_kl_separate_the_model_from_a_damaged_copy(models_dir):
    import copy

    from pruning_utils.measure.variants import measure_variant

    torch.manual_seed(0)
    model, tok = tiny_model("llama", seed=0), TinyTokenizer()
    with torch.no_grad():  # give the random model a distribution of its own worth sampling: a peaked head
        model.lm_head.weight.mul_(8)
    held = sources.fidelity_chunks(model, tok, n_tokens=8 * 32, seq_len=32, seed=0)
    chunks = sources.eval_chunks(tok, "embedded", seq_len=32, max_tokens=256)
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for layer in damaged.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight))
    base = measure_variant(model, chunks, variant="baseline", fidelity_chunks=held, reference_model=model)
    hurt = measure_variant(damaged, chunks, variant="damaged", fidelity_chunks=held, reference_model=model,
                           reference=base)
    assert base["kl_to_baseline"] == 0.0 and hurt["kl_to_baseline"] > 0.01
    assert 1 < base["fidelity_ppl"] < hurt["fidelity_ppl"] < float("inf")
    assert hurt["fidelity_change_pct"] > 0 and base["fidelity_tokens"] == 8 * 31
    # a known row with the same token counts is reused, not measured again
    again = measure_variant(damaged, chunks, variant="damaged", fidelity_chunks=held, reference_model=model, known=hurt)
    assert again["fidelity_ppl"] == hurt["fidelity_ppl"] and again["kl_to_baseline"] == hurt["kl_to_baseline"]


def test_fingerprint_checksums_are_exact_and_never_up_cast_a_whole_tensor():
    from pruning_utils.measure import metrics

    g = torch.Generator().manual_seed(0)
    small = torch.randn(1000, 37, generator=g).to(torch.bfloat16)
    total, magnitude = selfgen._checksums(small)
    assert total == pytest.approx(small.double().sum().item(), rel=1e-12, abs=1e-9)
    assert magnitude == pytest.approx(small.double().abs().sum().item(), rel=1e-12)
    if metrics.rss_bytes() is None:
        return
    big = torch.ones(96 * 2 ** 20, dtype=torch.float32)  # 384 MiB: a whole fp64 copy would add 768 MiB
    with metrics.track_peak_memory("cpu") as stats:
        total, magnitude = selfgen._checksums(big)
    assert total == magnitude == big.numel()
    assert stats["delta_mb"] < 200  # blocks of FINGERPRINT_BLOCK elements (32 MiB of fp64) at a time
