"""What the recovery benchmarks share: notebook 04's recipe on a fresh copy of a pruned model, and one row of
measurements per recovered model (in-domain, fidelity and held-out perplexity, KL to the unpruned model, semantic
retention and answer overlap against the unpruned model's answers).

`RecoveryBench` holds the inputs every row is measured on (built once: evaluation windows, fidelity samples,
held-out prose, the judge and the unpruned answers); `benchmarks/recovery_sources.py` varies what recovery trains
on, `benchmarks/recovery_budget.py` how long it trains (`budget_curve`).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.data.heldout import heldout_chunks
from pruning_utils.measure import evaluation
from pruning_utils.measure.variants import measure_variant
from pruning_utils.recovery import lora, training_data


def recovery_config(params: Mapping[str, Any], steps: int, lr: float, loss: str, seed: int) -> lora.RecoveryConfig:
    """Return notebook 04's LoRA settings under a profile's `params` for `steps` optimizer steps at rate `lr`."""
    return lora.RecoveryConfig(r=params["LORA_R"], alpha=params["LORA_ALPHA"], lr=lr, max_steps=steps,
                               batch_size=params["RECOVERY_BATCH"], seq_len=params["RECOVERY_SEQ_LEN"], loss=loss,
                               temperature=params["RECOVERY_TEMPERATURE"], seed=seed)


def budget_curve(pruned, teacher, windows: Callable[[int], torch.Tensor], steps: list[int],
                 config: Callable[[int], lora.RecoveryConfig], measure: Callable[[Any, dict | None], dict],
                 heldout_windows: torch.Tensor | None = None, progress: bool = True) -> list[dict]:
    """Return one row per budget of `steps`: `measure(model, stats)` of `pruned` recovered for that many steps
    (a fresh copy each time, `config(n)`'s settings, `windows(k)` for its k = steps x batch x accumulation training
    windows), after a row for `pruned` itself (`stats` None, 0 steps). Each budget is its own run with its own
    schedule, as a user choosing that budget would train; `pruned` is left unchanged."""
    rows = [measure(pruned, None)]
    for n in steps:
        cfg = config(n)
        train = windows(n * cfg.batch_size * cfg.grad_accum)
        merged, stats = lora.recover(copy.deepcopy(pruned), None, train, cfg,
                                     teacher=None if cfg.loss == "lm" else teacher, heldout_windows=heldout_windows,
                                     progress=progress)
        rows.append(measure(merged, stats))
        del merged
    return rows


class RecoveryBench:
    """The unpruned model and everything a recovered model is measured against, built once under a profile's
    `params` (`pipeline.profiles.DEFAULTS` for the default one)."""

    def __init__(self, params: Mapping[str, Any], model: str, text_source: str, n_prompts: int, seed: int):
        from pruning_utils.model.loading import load_model

        self.params = D = params  # the profile's names, as the notebooks spell them
        self.seed, self.text_source = seed, text_source
        self.selfgen_kw = dict(temperature=D["SELFGEN_TEMPERATURE"], top_p=D["SELFGEN_TOP_P"])
        self.base, self.tok = load_model(model, device="cpu", dtype="float32")
        self.model_name = model
        self.seq_len = D["RECOVERY_SEQ_LEN"]
        self.chunks = sources.eval_chunks(self.tok, text_source, seq_len=D["EVAL_SEQ_LEN"],
                                          max_tokens=D["EVAL_MAX_TOKENS"])
        self.fidelity = sources.fidelity_chunks(self.base, self.tok, n_tokens=D["FIDELITY_TOKENS"], seed=seed,
                                                selfgen_kw=self.selfgen_kw)
        self.prose = heldout_chunks(self.tok, n_tokens=D["HELDOUT_TOKENS"])  # general English, never trained on
        self.heldout = sources.calibration_windows(self.tok, sources.text_parts(text_source), n_samples=8,
                                                   seq_len=self.seq_len, seed=seed + 2)
        self.prompts = evaluation.load_instructions()[:n_prompts]
        self.judge = evaluation.SemanticJudge()
        self.reference = evaluation.generate_answers(self.base, self.tok, self.prompts,
                                                     max_new_tokens=D["MAX_NEW_TOKENS"], cache=True)
        self.baseline = pd.read_csv(paths.ablation_dir() / "baseline.csv").iloc[0].to_dict()

    def windows(self, data: str) -> Callable[[int], torch.Tensor]:
        """Return `n -> n` training windows of recovery `data` (text | selfdistill | selfdistill+text), drawn as
        notebook 04 draws them (`training_data.training_windows`)."""
        return lambda n: training_data.training_windows(data, self.tok, self.text_source, n, self.seq_len, self.base,
                                                        seed=self.seed, selfgen_kw=self.selfgen_kw)

    def measure(self, model, name: str, stats: dict | None, known: dict | None = None) -> dict:
        """Return the measurements of `model` (recovered with `stats`, or not recovered when None)."""
        row = measure_variant(model, self.chunks, variant=name, source_model=self.model_name, reference=self.baseline,
                              fidelity_chunks=self.fidelity, heldout_chunks=self.prose, reference_model=self.base,
                              known=known)
        answers = evaluation.generate_answers(model, self.tok, self.prompts,
                                              max_new_tokens=self.params["MAX_NEW_TOKENS"], cache=True)
        kept = evaluation.semantic_retention(self.reference, answers, self.judge)
        overlap = evaluation.answer_overlap(self.reference, answers)
        return dict(ppl=row["ppl"], fidelity_ppl=row["fidelity_ppl"], heldout_ppl=row["heldout_ppl"],
                    kl_to_baseline=row["kl_to_baseline"], semantic_cosine=kept["cosine_mean"],
                    semantic_ci_low=kept["cosine_ci_low"], semantic_ci_high=kept["cosine_ci_high"],
                    first_sentence_match=kept["first_sentence_match"],
                    **{c: overlap[c] for c in evaluation.OVERLAP_COLUMNS}, n_prompts=len(self.prompts),
                    steps=stats["steps"] if stats else 0, tokens_seen=stats["tokens_seen"] if stats else 0,
                    heldout_loss_before=stats["heldout_loss_before"] if stats else float("nan"),
                    heldout_loss_after=stats["heldout_loss_after"] if stats else float("nan"),
                    train_minutes=stats["minutes"] if stats else 0.0, load_avg=row["load_avg"],
                    device=row["device"], commit=row["commit"])
