# %% [markdown]
# # 04 · Recovery: light LoRA (peft), at most one epoch, merged into the weights
# Each pruned model gets LoRA adapters on its attention and MLP projections, trains on the calibration split (never the
# evaluation split), optionally distilling from the unpruned model, and the adapters are merged: the saved
# `models/<name>_lora/` is an ordinary pruned checkpoint with no inference overhead. With more than one GPU visible the
# same entry point runs data parallel under `accelerate launch`.

# %%
import pandas as pd

from pruning_utils.data import heldout, sources
from pruning_utils.measure import evaluation, variants
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta, save_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import plots, results
from pruning_utils.pipeline.stages import as_list
from pruning_utils.recovery import launch, lora, report, training_data

baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
# the unpruned model: on the host where it does not fit beside a student (RUN.reference_host, an 8B on a T4); its
# outputs for the KL are then walked layer by layer on the device now, before any student is there
base_model, tok = load_model(MODEL, device=RUN.reference_device, dtype=RUN.dtype)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
RUN.prepare_reference(base_model, chunks)
cfg = lora.RecoveryConfig(r=LORA_R, alpha=LORA_ALPHA, lr=LORA_LR, max_steps=RECOVERY_STEPS, batch_size=RECOVERY_BATCH,
                          grad_accum=GRAD_ACCUM, seq_len=RECOVERY_SEQ_LEN, loss=RECOVERY_LOSS,
                          temperature=RECOVERY_TEMPERATURE, grad_checkpointing=GRAD_CHECKPOINTING, seed=SEED)
n_windows = RECOVERY_STEPS * RECOVERY_BATCH * GRAD_ACCUM
# other windows of the calibration split (seed + 1); self-generated parts reuse notebook 00's cached samples
train = training_data.training_windows(RECOVERY_DATA, tok, TEXT_SOURCE, n_windows, RECOVERY_SEQ_LEN, base_model,
                                       seed=SEED, instruction_jsonl=INSTRUCTION_JSONL, selfgen_kw=SELFGEN)
# held out: text windows no training batch holds (seed + 2), never the model's samples
held_windows = sources.calibration_windows(tok, sources.text_parts(TEXT_SOURCE), n_samples=8,
                                           seq_len=RECOVERY_SEQ_LEN, seed=SEED + 2)
fidelity = sources.fidelity_chunks(base_model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
prose = heldout.heldout_chunks(tok, n_tokens=HELDOUT_TOKENS)  # general English: measured, never trained on
teacher = base_model if RECOVERY_LOSS != "lm" else None
n_gpus = torch.cuda.device_count()
prompts = evaluation.load_instructions()[:N_PROMPTS]
judge = evaluation.SemanticJudge()
reference_answers = evaluation.generate_answers(base_model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, cache=True)
RETENTION = dict(reference_answers=reference_answers, judge=judge, max_new_tokens=MAX_NEW_TOKENS)  # cached for 06
print(f"{len(train)} training windows x {RECOVERY_SEQ_LEN} tokens ({RECOVERY_DATA}); loss={RECOVERY_LOSS}; "
      f"GPUs visible: {n_gpus}")

# %%
rows, curves = [], {}
for name in as_list(RECOVERY_MODELS):
    model, _ = load_pruned(name, device=DEVICE, dtype=DTYPE)
    before = read_checkpoint_meta(name)["extra"]  # measured by the stage that wrote it, on the same chunks
    kept_before = evaluation.answer_retention(model, tok, prompts, **RETENTION)
    if n_gpus > 1:  # data parallel: the same training entry point under accelerate, one process per GPU
        merged, stats = launch.recover_data_parallel(
            name, f"{name}_lora", cfg, text_source=TEXT_SOURCE, seed=SEED + 1, n_windows=n_windows,
            teacher_dir=MODEL if teacher is not None else None, n_gpus=n_gpus,
            instruction_jsonl=INSTRUCTION_JSONL or None, config_path=OUT / f"recovery_{name}_config.json",
            n_heldout=len(held_windows), heldout_seed=SEED + 2, device=DEVICE, dtype=DTYPE,
            windows=None if INSTRUCTION_JSONL else train, heldout_windows=held_windows)
    else:
        merged, stats = lora.recover(model, tok, train, cfg, teacher=teacher, log_csv=OUT / f"recovery_{name}_loss.csv",
                                     heldout_windows=held_windows)
    after = variants.measure_variant(merged, chunks, variant=f"{name}_lora", source_model=MODEL, reference=baseline,
                                     fidelity_chunks=fidelity, heldout_chunks=prose, reference_model=base_model,
                                     **RUN.measure_kw, **variants.provenance(before))
    kept_after = evaluation.answer_retention(merged, tok, prompts, **RETENTION)
    report.warn_if_retention_fell(name, kept_before, kept_after, RECOVERY_DATA, RECOVERY_LOSS)
    save_pruned(merged, tok, f"{name}_lora", extra=after)
    rows.append(report.recovery_row(name, stats, before, after, baseline, kept_before, kept_after, RECOVERY_LOSS,
                                    RECOVERY_DATA))
    curves[name] = pd.DataFrame(stats["history"], columns=["step", "loss", "lr"])
    del model, merged
table = pd.DataFrame(rows)
results.write_csv(table, OUT / "recovery.csv")
table.round(3)

# %%
for name, curve in curves.items():
    results.save_plot(plots.loss_curve(curve, title=f"LoRA recovery of {name}"), OUT / f"recovery_{name}_loss.png")
