"""The unpruned model's cached outputs give the same KL as its full forwards, bit for bit, and never go stale."""
import copy

import pytest
import torch

from pruning_utils.measure import metrics, reference
from pruning_utils.measure.reference import ReferenceOutputs, reference_outputs
from pruning_utils.model.tiny import tiny_model


def _kl_by_full_forwards(model, ref_model, chunks, batch_size):
    """The KL as measured before the cache: a full forward of both models per batch."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start:start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            ref = ref_model(input_ids=ids, use_cache=False).logits[:, :-1]
            total += metrics.token_scores(logits, ids[:, 1:], ref)[1]
            tokens += ids[:, 1:].numel()
    return total / tokens


@pytest.fixture
def pair(family):
    base = tiny_model(family, seed=0)
    variant = copy.deepcopy(base)
    with torch.no_grad():
        for p in variant.parameters():
            p.mul_(0.97)
    chunks = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    return base, variant, chunks


def test_cached_reference_gives_the_full_forward_kl_exactly(pair, tmp_path):
    base, variant, chunks = pair
    expected = _kl_by_full_forwards(variant, base, chunks, batch_size=2)
    outputs = ReferenceOutputs(base, chunks, 2, cache_dir=tmp_path)
    first = metrics.perplexity(variant, chunks, batch_size=2, reference=outputs, progress=False)  # fills the cache
    assert outputs.exact and len(outputs.hidden) == 3
    assert list(tmp_path.glob("*.pt")), "the cache is written once every batch is known"
    again = metrics.perplexity(variant, chunks, batch_size=2, reference=outputs, progress=False)
    from_disk = ReferenceOutputs(base, chunks, 2, cache_dir=tmp_path)
    assert len(from_disk.hidden) == 3
    later = metrics.perplexity(variant, chunks, batch_size=2, reference=from_disk, progress=False)
    assert first["kl"] == again["kl"] == later["kl"] == expected
    assert first["ppl"] == again["ppl"] == later["ppl"]


def test_a_model_passed_as_reference_is_cached_per_weights(pair, models_dir):
    base, variant, chunks = pair
    a = reference_outputs(base, chunks, 2)
    assert reference_outputs(base, chunks, 2) is a
    assert reference_outputs(base, chunks[:4], 2) is not a  # other chunks, other outputs
    with torch.no_grad():
        next(base.parameters()).add_(1.0)  # pruned or refit in place: new weights, new outputs
    assert reference_outputs(base, chunks, 2).digest != a.digest
    kl = metrics.perplexity(variant, chunks, batch_size=2, reference=base, progress=False)["kl"]
    assert kl == _kl_by_full_forwards(variant, base, chunks, batch_size=2)


def test_logits_changed_after_the_head_fall_back_to_full_forwards(pair, tmp_path):
    base, variant, chunks = pair
    original = base.forward

    def capped(*args, **kw):  # a family that post-processes the head's output (soft-capping)
        out = original(*args, **kw)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out

    base.forward = capped
    outputs = ReferenceOutputs(base, chunks, 2, cache_dir=tmp_path)
    kl = metrics.perplexity(variant, chunks, batch_size=2, reference=outputs, progress=False)["kl"]
    assert outputs.exact is False and not outputs.hidden and not list(tmp_path.glob("*.pt"))
    assert kl == _kl_by_full_forwards(variant, base, chunks, batch_size=2)


def test_module_keeps_one_open_reference(pair, models_dir):
    base, _, chunks = pair
    reference_outputs(base, chunks, 2)
    reference_outputs(base, chunks[:3], 2)
    assert len(reference._OPEN) == 1


def test_measuring_the_unpruned_model_keeps_its_outputs_for_the_variants(pair, tmp_path):
    base, variant, chunks = pair
    plain = metrics.perplexity(base, chunks, batch_size=2, progress=False)
    outputs = ReferenceOutputs(base, chunks, 2, cache_dir=tmp_path)
    itself = metrics.perplexity(base, chunks, batch_size=2, reference=outputs, progress=False)
    assert itself["ppl"] == plain["ppl"] and itself["kl"] == 0.0
    assert len(outputs.hidden) == 3, "the baseline's own pass fills the cache"
    calls = []
    base.register_forward_pre_hook(lambda *_: calls.append(1))
    kl = metrics.perplexity(variant, chunks, batch_size=2, reference=outputs, progress=False)["kl"]
    assert not calls, "a variant's KL then needs no forward of the unpruned model"
    assert kl == _kl_by_full_forwards(variant, copy.deepcopy(base), chunks, batch_size=2)


def test_the_unpruned_model_measured_as_its_own_reference_holds_one_logits_tensor(models_dir):
    if metrics.rss_bytes() is None:
        pytest.skip("needs Linux /proc to read resident memory")
    model = tiny_model("llama", vocab_size=32000)  # a batch's logits: 4 x 128 x 32000 fp32 = 62.5 MiB
    chunks = torch.randint(3, 32000, (4, 128), generator=torch.Generator().manual_seed(2))
    with metrics.track_peak_memory("cpu") as plain:
        metrics.perplexity(model, chunks, batch_size=4, progress=False)
    with metrics.track_peak_memory("cpu") as itself:  # its outputs kept for the variants' KL
        metrics.perplexity(model, chunks, batch_size=4, reference=model, progress=False)
    assert reference_outputs(model, chunks, 4).exact
    assert itself["delta_mb"] < plain["delta_mb"] + 30  # a second logits tensor: + 62.5 MiB
