# %%
import pandas as pd

from pruning_utils import paths
from pruning_utils.data import heldout, sources
from pruning_utils.measure.variants import Unpruned, first_windows
from pruning_utils.pipeline.stages import as_list
from pruning_utils.prune.scores import load_scores

# the unpruned model: variants are deep copies beside it, or (RUN.build == "reload") it is pruned in place and
# reloaded for the next variant; always reach it as source.model
source = Unpruned(MODEL, device=RUN.load_device, dtype=RUN.dtype, build=RUN.build)
tok = source.tokenizer
scores = load_scores(paths.results_dir() / "importance")
baseline = pd.read_csv(OUT / "baseline.csv").iloc[0].to_dict()
# the refits' windows (REFIT_CALIB); their self-generated part is cached on disk
windows = sources.calibration_windows(tok, TEXT_SOURCE, n_samples=REFIT_CALIB, seq_len=CALIB_SEQ_LEN, seed=SEED,
                                      model=source.model, selfgen_kw=SELFGEN)
chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_MAX_TOKENS)
sweep_chunks = sources.eval_chunks(tok, TEXT_SOURCE, seq_len=EVAL_SEQ_LEN, max_tokens=SWEEP_EVAL_MAX_TOKENS)
fidelity = sources.fidelity_chunks(source.model, tok, n_tokens=FIDELITY_TOKENS, seed=SEED, selfgen_kw=SELFGEN)
prose = heldout.heldout_chunks(tok, n_tokens=HELDOUT_TOKENS)  # general English, never calibrated or selected on
# the screens (short text, short fidelity set) of notebooks 02 and 03: `variants.screens`
SCREEN = dict(source_model=MODEL, allocation=ALLOCATION, compute_device=RUN.compute_device,
              fidelity_chunks=first_windows(fidelity, SWEEP_EVAL_MAX_TOKENS),
              heldout_chunks=first_windows(prose, SWEEP_EVAL_MAX_TOKENS), sequential=RECON_SEQUENTIAL,
              ridge_ratio=RIDGE_RATIO, logits_rows=RUN.logits_rows)
# saved variants: the full fidelity set, and KL to the baseline while the unpruned model stays in memory beside them
SAVED = dict(fidelity_chunks=fidelity, heldout_chunks=prose, logits_rows=RUN.logits_rows,
             reference_model=None if RUN.build == "reload" else source.model)
# the main plans: ALLOCATION='search' searches per-layer counts by KL on held-out windows of every TEXT_SOURCE part
PLAN = dict(allocation_name=ALLOCATION, tokenizer=tok, text_source=TEXT_SOURCE, seed=SEED, seq_len=CALIB_SEQ_LEN,
            windows=SEARCH_WINDOWS, iterations=SEARCH_ITERATIONS, group=SEARCH_GROUP, ridge_ratio=RIDGE_RATIO,
            selfgen_kw=SELFGEN)
missing = [c for c in as_list(CRITERIA) if c not in scores]
assert not missing, f"criteria {missing} were not computed in notebook 00; add them to its CRITERIA and re-run it"
