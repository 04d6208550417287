"""LoRA recovery of a saved pruned model by what it trains on and how (issue 11): which recovery keeps answers.

Configurations (loss on data), each the recipe of notebook 04 (peft LoRA r 8, the default steps and learning
rate, at most one epoch, merged) on a fresh copy of `models/<name>/`:
- lm on text: next-token loss on calibration windows (the text source, another seed);
- distill on text: KL to the unpruned model on the same windows;
- distill on selfdistill: KL to the unpruned model on its own greedy answers to training prompts (never the
  judge's prompts) - self-data distillation;
- distill on selfdistill+text: half of each.
Each merged model is measured like every variant: in-domain perplexity, fidelity perplexity (held-out samples of
the unpruned model), KL to the unpruned model on the evaluation windows, and semantic retention of its greedy
answers to the judge's held-out prompts (all-MiniLM-L6-v2 cosine to the unpruned model's answers, 95% bootstrap
interval; ROUGE-L F1 and BERTScore F1 on the same MiniLM, `evaluation.answer_overlap`). The row `none` is the model
before recovery.

Writes results/ablation_studies/recovery_sources.csv. Usage:
    python3 -m benchmarks.recovery_sources --names mix_pruned,head_pruned [--configs lm:text,distill:selfdistill]
"""
from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch

from pruning_utils import paths
from pruning_utils.data import sources
from pruning_utils.data.heldout import heldout_chunks
from pruning_utils.measure import evaluation
from pruning_utils.measure.variants import measure_variant
from pruning_utils.model.checkpoint import load_pruned, read_checkpoint_meta
from pruning_utils.model.loading import load_model
from pruning_utils.pipeline import profiles, results
from pruning_utils.recovery import lora, training_data

CONFIGS = "lm:text,distill:text,distill:selfdistill,distill:selfdistill+text"
D = profiles.DEFAULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", default="mix_pruned", help="pruned checkpoints under models/, comma-separated")
    ap.add_argument("--configs", default=CONFIGS, help="loss:data pairs, comma-separated")
    ap.add_argument("--model", default=D["MODEL"])
    ap.add_argument("--text-source", default=D["TEXT_SOURCE"])
    ap.add_argument("--steps", type=int, default=D["RECOVERY_STEPS"])
    ap.add_argument("--lr", type=float, default=D["LORA_LR"])
    ap.add_argument("--n-prompts", type=int, default=D["N_PROMPTS"])
    ap.add_argument("--seed", type=int, default=D["SEED"])
    ap.add_argument("--out", default=str(paths.ablation_dir() / "recovery_sources.csv"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    selfgen_kw = dict(temperature=D["SELFGEN_TEMPERATURE"], top_p=D["SELFGEN_TOP_P"])
    base, tok = load_model(args.model, device="cpu", dtype="float32")
    seq_len, batch = D["RECOVERY_SEQ_LEN"], D["RECOVERY_BATCH"]
    chunks = sources.eval_chunks(tok, args.text_source, seq_len=D["EVAL_SEQ_LEN"], max_tokens=D["EVAL_MAX_TOKENS"])
    fidelity = sources.fidelity_chunks(base, tok, n_tokens=D["FIDELITY_TOKENS"], seed=args.seed, selfgen_kw=selfgen_kw)
    prose = heldout_chunks(tok, n_tokens=D["HELDOUT_TOKENS"])  # general English, never trained on
    text_windows = lambda n: sources.calibration_windows(  # noqa: E731  the windows of notebook 04
        tok, args.text_source, n_samples=n, seq_len=seq_len, seed=args.seed + 1, model=base, selfgen_kw=selfgen_kw,
        selfgen_seed=args.seed)
    heldout = sources.calibration_windows(tok, sources.text_parts(args.text_source), n_samples=8, seq_len=seq_len,
                                       seed=args.seed + 2)
    prompts = evaluation.load_instructions()[:args.n_prompts]
    judge = evaluation.SemanticJudge()
    reference = evaluation.generate_answers(base, tok, prompts, max_new_tokens=D["MAX_NEW_TOKENS"], cache=True)
    baseline = pd.read_csv(paths.ablation_dir() / "baseline.csv").iloc[0].to_dict()
    rows = []

    def measure(model, name: str, loss: str, source: str, stats: dict | None, known: dict | None = None) -> None:
        row = measure_variant(model, chunks, variant=name, source_model=args.model, reference=baseline,
                              fidelity_chunks=fidelity, heldout_chunks=prose, reference_model=base, known=known)
        answers = evaluation.generate_answers(model, tok, prompts, max_new_tokens=D["MAX_NEW_TOKENS"], cache=True)
        kept = evaluation.semantic_retention(reference, answers, judge)
        overlap = evaluation.answer_overlap(reference, answers)
        rows.append(dict(model=name, loss=loss, data=source, ppl=row["ppl"], fidelity_ppl=row["fidelity_ppl"],
                         heldout_ppl=row["heldout_ppl"],
                         kl_to_baseline=row["kl_to_baseline"], semantic_cosine=kept["cosine_mean"],
                         semantic_ci_low=kept["cosine_ci_low"], semantic_ci_high=kept["cosine_ci_high"],
                         first_sentence_match=kept["first_sentence_match"],
                         **{c: overlap[c] for c in evaluation.OVERLAP_COLUMNS}, n_prompts=len(prompts),
                         steps=stats["steps"] if stats else 0, tokens_seen=stats["tokens_seen"] if stats else 0,
                         heldout_loss_before=stats["heldout_loss_before"] if stats else float("nan"),
                         heldout_loss_after=stats["heldout_loss_after"] if stats else float("nan"),
                         train_minutes=stats["minutes"] if stats else 0.0, load_avg=row["load_avg"],
                         device=row["device"], commit=row["commit"]))
        print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
        results.write_csv(pd.DataFrame(rows), args.out)  # after every row: a stopped sweep keeps what it measured

    for name in args.names.split(","):
        pruned, _ = load_pruned(name, device="cpu", dtype="float32")
        measure(pruned, name, "none", "none", None, known=read_checkpoint_meta(name)["extra"])
        for pair in args.configs.split(","):
            loss, source = pair.split(":")
            cfg = lora.RecoveryConfig(r=D["LORA_R"], alpha=D["LORA_ALPHA"], lr=args.lr, max_steps=args.steps,
                                          batch_size=batch, seq_len=seq_len, loss=loss, seed=args.seed)
            train = training_data.recovery_windows(source, tok, args.steps * batch, seq_len, base, text_windows,
                                              seed=args.seed)
            merged, stats = lora.recover(copy.deepcopy(pruned), tok, train, cfg,
                                             teacher=None if loss == "lm" else base, heldout_windows=heldout)
            measure(merged, name, loss, source, stats)
            del merged
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
