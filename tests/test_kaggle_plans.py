"""The kaggle-* profiles on Kaggle's T4 machine (15 GiB GPU, 29 GiB host), planned from the committed shape configs:
every stage fits as configured, the old 3B settings are refused with advice naming the new ones, and perplexity / KL
with the LM heads applied a few rows at a time equal those of whole batches."""
import copy

import pytest
import torch

from pruning_utils.model.shapes import shape_config
from pruning_utils.pipeline import memory_plan
from pruning_utils.pipeline.memory_plan import KAGGLE_T4, MemoryPlanError, check_plan, choose
from pruning_utils.pipeline.profiles import PROFILES

QWEN_PROFILES = ("kaggle-qwen2.5-0.5b", "kaggle-qwen2.5-3b")
# kaggle-qwen2.5-3b before it was fitted to a T4 (taylor and mix in CRITERIA, LoRA without gradient checkpointing)
OLD_3B = dict(PROFILES["kaggle-qwen2.5-3b"], CRITERIA="random,magnitude,activation,fluctuation,taylor,semantic,mix",
              GRAMS="auto", GRAD_CHECKPOINTING=False, RECOVERY_BATCH=4, GRAD_ACCUM=1)


def _run(profile: str, stage: str, params: dict | None = None):
    config = shape_config(memory_plan.profile_shape(profile))
    # the plan before any run (what the README's table shows): no checkpoint row to reuse in stage 06
    return choose(config, stage, dict(params or PROFILES[profile], _plan=dict(KAGGLE_T4, rows_known=False)))


@pytest.mark.parametrize("profile", QWEN_PROFILES)
@pytest.mark.parametrize("stage", memory_plan.STAGES)
def test_qwen_profiles_fit_a_t4_within_14_gib(profile, stage):
    run = _run(profile, stage)
    check_plan(run.plan)
    assert run.plan.total_gb <= 14.0 and run.plan.host_gb <= KAGGLE_T4["host_available_gb"]
    assert not run.offload  # the whole model on the T4
    # a 152k vocabulary: the LM heads run a few rows at a time where the notebook passes RUN.logits_rows
    assert bool(run.logits_rows) == (stage != "05")


@pytest.mark.parametrize("stage", ("00", "02", "03"))
def test_llama_8b_runs_00_to_03_offloaded_within_a_t4_and_its_host(stage):
    run = _run("kaggle-llama-3.1-8b", stage)
    check_plan(run.plan)
    assert run.offload and run.plan.host_gb <= KAGGLE_T4["host_available_gb"]


@pytest.mark.parametrize("stage", ("04", "05", "06"))
def test_llama_8b_later_stages_fit_a_t4_and_its_host(stage):
    """The unpruned 8B (15 GiB in fp16) never sits on the T4 after stage 03: 04 / 06 keep it on the host and walk its
    outputs layer by layer, 05 nests its levels in mix_pruned; each holds the pruned checkpoint (~11.8 GiB)."""
    run = _run("kaggle-llama-3.1-8b", stage)
    check_plan(run.plan)
    assert run.plan.total_gb <= KAGGLE_T4["available_gb"] and run.plan.host_gb <= KAGGLE_T4["host_available_gb"]
    assert run.reference_host == (stage != "05") and run.reference_device == ("cpu" if stage != "05" else "cuda")
    assert run.reference_compute == ("cuda" if stage != "05" else None)
    whole = memory_plan.n_params(shape_config("llama-3.1-8b")) * 2
    held = run.plan.settings["held_bytes"]
    assert 0.7 * whole < held < 0.85 * whole  # mix_pruned (06: mlp_pruned, the largest variant), estimated
    parts = {p["name"]: p for p in run.plan.parts}
    if stage != "05":
        assert parts["the unpruned model (" + ("the baseline)" if stage == "06" else
                                               "teacher, reference for the KL and the answers)")]["on"] == "host"


def test_llama_8b_profile_measured_on_the_unpruned_size_would_not_fit():
    """What the 8B profile's choices buy: the same stages holding the unpruned size do not fit a T4."""
    for stage in ("04", "05", "06"):
        run = choose(shape_config("llama-3.1-8b"), stage, dict(
            PROFILES["kaggle-llama-3.1-8b"], _plan=dict(KAGGLE_T4, rows_known=False, held_bytes=None),
            OFFLOAD="off", ADAPTIVE_MODEL=""))
        assert not run.plan.fits and not run.reference_host


def test_distillation_with_the_teacher_on_the_host_is_refused():
    run = _run("kaggle-llama-3.1-8b", "04", dict(PROFILES["kaggle-llama-3.1-8b"], RECOVERY_LOSS="distill"))
    with pytest.raises(MemoryPlanError, match="RECOVERY_LOSS='lm'"):
        check_plan(run.plan)


def test_held_bytes_come_from_saved_checkpoints_and_uniform_estimates(models_dir):
    """A saved checkpoint's bytes in a dtype are read from its safetensors headers (equal to the loaded model's);
    before it exists, the rates that make it give the same figure for a uniform cut."""
    from pruning_utils.measure.variants import pruned_copy
    from pruning_utils.model.checkpoint import save_pruned
    from pruning_utils.model.tiny import TinyTokenizer, tiny_model
    from pruning_utils.prune import allocation
    from pruning_utils.prune.scores import Scores

    model = tiny_model("llama")
    config = model.config.to_dict()
    rates = dict(HEAD_RATE=0.5, MLP_RATE=0.25)
    estimate = memory_plan.held_model_bytes(["mix_pruned"], rates, config, 2)
    layers = len(model.model.layers)
    scores = Scores([torch.arange(model.config.num_attention_heads, dtype=torch.float)] * layers,
                    [torch.arange(model.config.intermediate_size, dtype=torch.float)] * layers)
    plan = allocation.plan_both(model, scores, head_rate=0.5, mlp_rate=0.25)
    pruned = pruned_copy(model, plan)
    assert estimate == sum(p.numel() for p in pruned.parameters()) * 2 < sum(p.numel() for p in model.parameters()) * 2
    folder = save_pruned(pruned, TinyTokenizer(), "mix_pruned")
    assert memory_plan.checkpoint_bytes(folder, 2) == sum(p.numel() for p in pruned.parameters()) * 2
    # a saved checkpoint wins over the estimate; an unknown name without one plans the whole model
    saved = memory_plan.held_model_bytes(["mix_pruned_lora", "mix_pruned"], dict(HEAD_RATE=0.0, MLP_RATE=0.0),
                                         config, 4)
    assert saved == sum(p.numel() for p in model.parameters()) * 4  # mix_pruned_lora: rates 0 -> the whole model
    assert memory_plan.held_model_bytes(["mix_pruned"], {}, config, 4) == memory_plan.checkpoint_bytes(folder, 4)
    assert memory_plan.held_model_bytes(["depth_pruned"], {}, config, 2) is None
    # the saved checkpoint is of another model than the planned one (a wider hidden size): the rates' estimate
    other = dict(config, hidden_size=2 * config["hidden_size"])
    assert memory_plan.held_model_bytes(["mix_pruned"], rates, other, 2) != memory_plan.checkpoint_bytes(folder, 2)
    assert memory_plan.held_model_bytes(["mix_pruned"], rates, other, 2) > estimate


def test_profile_plan_table_has_a_row_per_stage():
    table = memory_plan.profile_plan_table("kaggle-qwen2.5-3b")
    assert list(table["stage"]) == list(memory_plan.STAGES) and table["fits"].all()
    assert {"device_gb", "host_gb", "peak", "logits_rows"} <= set(table.columns)
    assert memory_plan.profile_shape("kaggle-llama-3.1-8b") == "llama-3.1-8b"


def test_the_3b_profile_drops_taylor_and_says_so():
    crit = PROFILES["kaggle-qwen2.5-3b"]["CRITERIA"].split(",")
    assert "taylor" not in crit and "mix" not in crit
    assert {"taylor", "mix"} <= set(OLD_3B["CRITERIA"].split(","))


@pytest.mark.parametrize("stage, names", [
    ("00", ["drop taylor and mix from CRITERIA", PROFILES["kaggle-qwen2.5-3b"]["CRITERIA"]]),
    ("04", ["GRAD_CHECKPOINTING=True", "RECOVERY_BATCH=1", "GRAD_ACCUM=4", "RECOVERY_LOSS='lm'"])])
def test_old_3b_settings_are_refused_naming_the_new_ones(stage, names):
    with pytest.raises(MemoryPlanError) as err:
        check_plan(_run("kaggle-qwen2.5-3b", stage, OLD_3B).plan)
    for name in names:
        assert name in str(err.value)


def test_whole_batch_logits_are_refused_naming_logits_rows():
    plan = memory_plan.plan_stage(shape_config("qwen2.5-3b"), "06", eval_seq_len=1024, **KAGGLE_T4)
    with pytest.raises(MemoryPlanError, match="logits_rows"):
        check_plan(plan)
    rows = memory_plan.plan_stage(shape_config("qwen2.5-3b"), "06", eval_seq_len=1024, logits_rows=512, **KAGGLE_T4)
    assert rows.total_gb < plan.total_gb - 1.5  # two [4, 1024, 152k] fp16 logits less


def test_logits_rows_is_chosen_for_large_vocabularies_only():
    small = dict(shape_config("qwen2.5-0.5b").to_dict(), vocab_size=49152)
    assert choose(small, "06", dict(PROFILES["kaggle-qwen2.5-0.5b"],
                                    _plan=dict(KAGGLE_T4, rows_known=False))).logits_rows is None
    assert _run("kaggle-qwen2.5-0.5b", "06").logits_rows == 512


@pytest.fixture(scope="module")
def tiny_pair():
    from pruning_utils.model.tiny import tiny_model

    torch.manual_seed(0)
    base = tiny_model("qwen2").eval()
    variant = copy.deepcopy(base)
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.02 * torch.randn_like(p))
    chunks = torch.randint(0, base.config.vocab_size, (5, 33), generator=torch.Generator().manual_seed(1))
    return base, variant, chunks


@pytest.mark.parametrize("rows", [1, 7, 512])
def test_row_stepped_lm_head_gives_the_same_perplexity_and_kl(tiny_pair, rows, models_dir):
    from pruning_utils.measure import reference
    from pruning_utils.measure.metrics import perplexity

    base, variant, chunks = tiny_pair
    kw = dict(batch_size=2, progress=False)
    reference._OPEN.clear()
    whole_base = perplexity(base, chunks, reference=base, **kw)
    whole = perplexity(variant, chunks, reference=base, **kw)
    reference._OPEN.clear()
    for path in models_dir.rglob("*.pt"):  # the row-stepped pass fills its own reference cache
        path.unlink()
    stepped_base = perplexity(base, chunks, reference=base, logits_rows=rows, **kw)
    stepped = perplexity(variant, chunks, reference=base, logits_rows=rows, **kw)
    assert stepped["tokens"] == whole["tokens"] == 5 * 32 and stepped_base["kl"] == 0.0
    assert whole["kl"] > 0
    for a, b in ((stepped_base, whole_base), (stepped, whole)):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-6, abs=1e-12)
    plain = perplexity(variant, chunks, logits_rows=rows, **kw)  # no reference
    assert plain["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    reference._OPEN.clear()


@pytest.mark.parametrize("rows", [None, 7])
def test_a_reference_walked_layer_by_layer_gives_the_same_kl(tiny_pair, rows, models_dir, monkeypatch):
    """The unpruned model kept on the host (an 8B beside its student on a T4): its outputs from a layer walk on the
    compute device, in walks that span several batches, give the KL of full forwards."""
    from pruning_utils.measure import metrics, reference
    from pruning_utils.model import calibration

    base, variant, chunks = tiny_pair
    kw = dict(batch_size=2, progress=False, logits_rows=rows)
    reference._OPEN.clear()
    whole = metrics.perplexity(variant, chunks, reference=base, **kw)
    reference._OPEN.clear()
    for path in models_dir.rglob("*.pt"):
        path.unlink()
    walks = []
    real = calibration.last_hidden
    monkeypatch.setattr(calibration, "last_hidden", lambda *a, **k: walks.append(len(a[1])) or real(*a, **k))
    monkeypatch.setattr(calibration, "OFFLOAD_WINDOWS", 4)  # 5 windows: a walk of 4 (two batches), then one of 1
    walked = metrics.perplexity(variant, chunks, reference=base, reference_device="cpu", **kw)
    assert walks == [4, 1]
    assert walked["kl"] > 0 and walked["kl"] == pytest.approx(whole["kl"], rel=1e-5)
    assert walked["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    # prepared before the variant is measured (notebooks 04 / 06): every walk then, none during the measure
    reference._OPEN.clear()
    for path in models_dir.rglob("*.pt"):
        path.unlink()
    reference.prepare(base, chunks, 2, compute_device="cpu", progress=False)
    assert walks == [4, 1, 4, 1]
    again = metrics.perplexity(variant, chunks, reference=base, reference_device="cpu", **kw)
    assert walks == [4, 1, 4, 1] and again["kl"] == walked["kl"]
    reference._OPEN.clear()


def test_a_soft_capped_reference_cannot_be_walked(tiny_pair):
    from pruning_utils.measure.reference import ReferenceOutputs

    base, _, chunks = tiny_pair
    capped = copy.deepcopy(base)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps its logits.*OFFLOAD='off'"):
        ReferenceOutputs(capped, chunks, 2, compute_device="cpu")


def test_a_host_held_reference_scores_with_the_variants_equal_lm_head(tiny_pair):
    """The 1 GiB LM head of an 8B reference does not visit the T4 when the variant holds the same weights (every saved
    variant keeps the unpruned head); a different head is used as the reference's own."""
    from pruning_utils.measure.reference import ReferenceOutputs
    from pruning_utils.model.arch import lm_head

    base, variant, chunks = tiny_pair
    same = copy.deepcopy(variant)
    with torch.no_grad():
        lm_head(same).weight.copy_(lm_head(base).weight)
    outputs = ReferenceOutputs(base, chunks, 2, compute_device="cpu", cache_dir="/nonexistent")
    with outputs.scoring(same):
        assert outputs.head is lm_head(same)
    with outputs.scoring(variant):
        assert outputs.head is lm_head(base)
    assert outputs.head is lm_head(base)
