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


@pytest.mark.xfail(strict=True, reason="not done: 16 GiB of fp16 weights do not fit a 15 GiB T4, and stages 04-06 "
                                       "hold the whole model (and 04 / 06 the unpruned one beside it) on the device")
@pytest.mark.parametrize("stage", ("04", "05", "06"))
def test_llama_8b_later_stages_fit(stage):
    check_plan(_run("kaggle-llama-3.1-8b", stage).plan)


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
