"""Memory plan of a pipeline stage, computed from a model config before anything is loaded: will it fit?

`plan_stage(config, "03", device="cuda", dtype="float16")` returns a `MemoryPlan` (weights, statistics,
activations, gradients/optimizer states, on the device and on the host); `check_plan` raises `MemoryPlanError`
naming what dominates and what to change; `choose(MODEL, "03", globals())` is the notebooks' first cell (the
settings the stage runs with, `RUN`; `RUN.describe()` the printed plan).
Sizes are GiB (2**30 bytes, the unit of `torch.cuda.mem_get_info` and nvidia-smi).

How the figures are made (b = bytes per element of the model dtype; B x S = batch x sequence of the operation):
- A stage holds its model copies for its whole run and peaks in one operation (`OPERATIONS`): the plan is held
  parts + the largest operation's working parts. Model weights are counted exactly from the config (the same
  rules the families' modules follow: biases, QK-norm, tied embeddings), so the figure is the real parameter bytes.
- Inference is one layer at a time: the working set is the residual stream plus one layer's projections and
  attention scores, or, at the LM head, the logits perplexity scores: the model's [B, S, vocab] logits in the model
  dtype (and, for the KL, the unpruned model's, its LM head applied to the cached head input), which
  `metrics.token_scores` log-softmaxes `SCORE_ROWS` rows at a time in fp32 (no full fp32 copy). With vocabularies
  of 150k the logits, not the layers, are what grows with B x S: `logits_rows` (chosen by `choose` from
  `LARGE_VOCAB` tokens on a GPU) runs the decoder body and applies the LM heads that many rows at a time
  (`metrics.perplexity(logits_rows=)`), so no [B, S, vocab] tensor exists. Generation keeps the last position's
  logits only.
- Stage 06 reuses each variant's perplexity and KL from the row its stage recorded on the same chunks
  (`final_eval.rows_reusable`, which `choose` reads from the checkpoints: `rows_known`); its perplexity pass then
  scores only the `SIDE_SEQ_LEN` fidelity / held-out windows, without the reference's logits. A profile's plan before
  any run (`profile_plan_table`) keeps the full pass.
- Backward keeps every layer's saved activations until the gradient reaches it, so it grows with depth x B x S;
  Taylor also keeps a gradient (model dtype) for every parameter a head or neuron owns (`arch.owned_parameters`),
  accumulated over batches: from the second batch on they sit next to the saved activations, while in a single
  batch backward frees each layer's activations as it writes that layer's gradients (too much for a 3B model on a
  T4: the kaggle-qwen2.5-3b profile drops taylor and mix from its CRITERIA). LoRA trains on the frozen base in the
  model dtype and keeps fp32 adapters +
  their gradient + two AdamW moments (16 bytes each; peft keeps adapters in fp32) and the dropout copy (and mask)
  of each wrapped module's input.
- Loading holds, next to the weights made so far, the tensor being initialised or read (the embedding counts).
- Gram statistics are fp64 [in, in] per refit module and do not grow with calibration tokens. Collected layer by
  layer (`calibration.layerwise_grams`), the device holds one layer's worth at a time; the Grams of every layer
  are needed to refit many plans from one pass (`reconstruction.collect_grams(..., stats=)`), and where they are
  kept is the `grams` parameter: "all" (storage=None: every layer's on the device), "layerwise" (storage="cpu":
  on the host, counted in `host_gb`; the refit then runs there too), "streamed" (none held: each refit collects
  its layer's Grams, uses and drops them, one calibration pass per refit variant) or "sequential"
  (RECON_SEQUENTIAL: one layer's Grams alive, none held). At 11008 MLP channels a layer's down_proj Gram is
  ~0.9 GiB, so holding every layer's is the one figure that grows with depth x width² rather than params.
- Offload mode (`offload=True`): the weights stay on the host; the device holds one decoder layer's weights, the
  calibration windows' hidden states and one layer's working set (`calibration.on_device`); perplexity walks
  the layers the same way over `calibration.OFFLOAD_WINDOWS` windows at a time. Latency and generation run on the
  host; the gradient passes (taylor, semantic) and LoRA need every layer at once and are refused
  (`MemoryPlan.blocked`).
- Stages 04 / 05 / 06 hold a pruned checkpoint, not the unpruned model: the student of RECOVERY_MODELS, the full
  level ADAPTIVE_MODEL, each variant. `held_bytes` is the largest one's bytes, read from the saved safetensors
  headers (`checkpoint_bytes`) or, before a run, estimated from HEAD_RATE / MLP_RATE (`held_model_bytes`).
- 04 and 06 also hold the unpruned model (the KL's reference, the reference answers, 06's baseline). Where it does not
  fit beside the checkpoint (`reference_host`, OFFLOAD 'auto' or 'on' on a GPU) it stays on the host: its LM-head
  inputs are walked layer by layer on the device before the checkpoint is loaded (`reference.prepare`, the
  `reference_walk` operation, counted alone on the device), the variants' own LM head scores its rows (the same
  weights), its answers are generated on the host and 06 takes the baseline's cost from baseline.csv. Distillation,
  which needs the teacher's logits at every step, is refused then.
- `choose` turns a notebook's parameters into `StageSettings`: it tries the configured settings, then (where the
  parameters say 'auto') Grams on the host, streamed Grams, variants built in place from a reloaded checkpoint,
  offload mode and the unpruned reference on the host, in that order, and keeps the first plan that fits, saying
  what it switched and why.
- A `reserve` fraction is added for allocator fragmentation and kernel workspaces the formulas do not see.
What is not modelled: the CUDA context (outside `mem_get_info`'s free figure already), the sentence-embedding judge
(on the CPU), lm-evaluation-harness internals. `benchmarks/memory_scale.py` measures these formulas against
peak RSS on CPU.
"""
from __future__ import annotations

import difflib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from pruning_utils.pipeline import stage_memory

GB = 2 ** 30
STAGES = ("00", "02", "03", "04", "05", "06")
OPERATIONS = ("load", "perplexity", "prefill", "generate", "importance_forward", "taylor", "semantic", "grams",
              "prune_refit", "lora_step", "reference_walk")
GRAM_MODES = ("all", "layerwise", "streamed", "sequential")
OFFLOAD_MODES = ("auto", "off", "on")  # profiles.PARAMS["OFFLOAD"]
GRAMS_CHOICES = {"auto": None, "device": "all", "host": "layerwise", "streamed": "streamed"}  # ... ["GRAMS"]
BUILD_CHOICES = ("auto", "copy", "reload")  # ... ["VARIANT_BUILD"]; see variants.Unpruned
KINDS = ("weights", "statistics", "activations", "optimizer")

# what every operation reads (the names plan_stage / plan_operation accept); defaults follow profiles.DEFAULTS
PARAMS: dict[str, object] = {
    "device": "auto", "dtype": "auto",
    "n_calib": 64, "calib_batch": 4, "calib_seq_len": 256,  # calibration (importance, Grams)
    "eval_batch": 4, "eval_seq_len": 512,  # perplexity (metrics.perplexity's batch)
    "latency_batch": 1, "latency_seq_len": 512, "decode_tokens": 32,  # latency / memory measures
    "gen_batch": 8, "gen_prompt_len": 256, "new_tokens": 48,  # evaluation.generate_answers
    "criteria": None,  # stage 00: comma-separated criteria (None: profiles.DEFAULTS["CRITERIA"])
    "semantic_seq_len": 128,
    "grams": "all",  # see GRAM_MODES
    "lora_r": 8, "lora_batch": 4, "lora_seq_len": 256, "grad_checkpointing": False,
    "teacher": True,  # stage 04: the unpruned model is loaded next to the student (notebook 04 always loads it)
    "distill": False,  # stage 04: the loss needs the teacher's logits (RECOVERY_LOSS distill | mix)
    "kl": True,  # perplexity also scores the KL to the unpruned model (its logits beside the variant's; not stage 00)
    "logits_rows": None,  # LM head applied this many token rows at a time (None: whole batches; see LARGE_VOCAB)
    "copies": None,  # model copies held at once (None: the stage's own count, see _COPIES)
    "int8_level": False,  # stage 05: ADAPTIVE_LEVELS has the INT8 level (its copy is held next to the model)
    "rows_known": False,  # stage 06: every variant's perplexity and KL are reused from the row its stage recorded
    # (`final_eval.rows_reusable`, what `choose` reads from the checkpoints): only the side texts' windows are scored
    "offload": False,  # the model on the host, one decoder layer at a time on the device
    # 04 / 05 / 06: bytes of the model the stage holds (the largest student of RECOVERY_MODELS, ADAPTIVE_MODEL, the
    # largest variant: `held_model_bytes`, what `choose` reads from the checkpoints); None: the whole model's
    "held_bytes": None,
    # 04 / 06: the unpruned model (reference for the KL and the answers, 06's baseline) stays on the host; its LM-head
    # inputs come from a layer walk on the device (`reference.ReferenceOutputs(compute_device=)`)
    "reference_host": False,
    "eval_tokens": 32768,  # tokens of the evaluation chunks (EVAL_MAX_TOKENS): the host-held reference's cache
    "sweep_tokens": 2048,  # tokens of the sweeps' chunks (SWEEP_EVAL_MAX_TOKENS): all that stage 05 evaluates
    "available_gb": None, "host_available_gb": None,  # None: measured on this machine
    "reserve": 0.1,
}
SIDE_SEQ_LEN = 256  # the fidelity and held-out windows (sources.fidelity_chunks, heldout.heldout_chunks), no KL
LARGE_VOCAB = 100_000  # from this vocabulary size on a GPU, `choose` applies the LM heads in row blocks
_ROWS_STAGES = ("00", "02", "03", "04", "06")  # the notebooks that pass RUN.logits_rows to measure_variant
# model copies a stage holds at once: 02/03 keep the model while a (deep-copied, then sliced) variant is made and
# measured; 04 and 06 hold the unpruned model next to the student / each variant (`_REFERENCE_STAGES`)
_COPIES = {"00": 1, "02": 2, "03": 2, "04": 1, "05": 1, "06": 1, "prune_refit": 2}
_STAGE_OPS = {"00": ("perplexity", "prefill", "importance_forward"),
              "02": ("perplexity", "prefill", "grams", "prune_refit"),
              "03": ("perplexity", "prefill", "grams", "prune_refit"), "04": ("lora_step", "perplexity", "prefill"),
              "05": ("perplexity", "prefill", "generate"), "06": ("perplexity", "prefill", "generate")}
_STAGE_TARGETS = {"02": ("o_proj",), "03": ("o_proj", "down_proj")}
_REFERENCE_STAGES = ("04", "06")  # the unpruned model next to what the stage measures (its KL, answers, baseline)
_HELD_STAGES = ("04", "05", "06")  # stages whose model may be a pruned checkpoint (`held_bytes`)
# notebooks 04-06 score answers with `evaluation.SemanticJudge` (all-MiniLM-L6-v2, always on the host): what
# loading it adds to a process's resident memory, its 23M fp32 weights and sentence-transformers' imports together
# (0.20-0.25 GiB measured on CPU; tests/test_memory.py measures it again in a fresh process)
JUDGE_STAGES = ("04", "05", "06")
JUDGE_BYTES = 0.25 * 2 ** 30
# notebook parameter (profiles.PARAMS) -> plan parameter; choose / describe_stage read only these
_NOTEBOOK_NAMES = {"DEVICE": "device", "DTYPE": "dtype", "N_CALIB": "n_calib", "CALIB_SEQ_LEN": "calib_seq_len",
                   "EVAL_SEQ_LEN": "eval_seq_len", "LATENCY_BATCH": "latency_batch",
                   "LATENCY_SEQ_LEN": "latency_seq_len", "DECODE_TOKENS": "decode_tokens", "CRITERIA": "criteria",
                   "SEMANTIC_SEQ_LEN": "semantic_seq_len", "RECOVERY_BATCH": "lora_batch",
                   "RECOVERY_SEQ_LEN": "lora_seq_len", "LORA_R": "lora_r", "GRAD_CHECKPOINTING": "grad_checkpointing",
                   "MAX_NEW_TOKENS": "new_tokens", "EVAL_MAX_TOKENS": "eval_tokens",
                   "SWEEP_EVAL_MAX_TOKENS": "sweep_tokens"}


class MemoryPlanError(RuntimeError):
    """Raised by `check_plan` when a stage's plan exceeds the memory available; the message says what to change."""


@dataclass
class Part:
    """One line of a plan: what it is, its kind (`KINDS`), its bytes and where it lives (device or host)."""

    name: str
    kind: str
    bytes: float
    on: str = "device"


@dataclass
class MemoryPlan:
    """Estimated peak memory of one stage (or operation) in GiB, with its parts; `fits` = device and host both fit."""

    stage: str
    device: str
    dtype: str
    weights_gb: float
    statistics_gb: float
    activations_gb: float
    optimizer_gb: float  # gradients and optimizer states
    reserve_gb: float
    total_gb: float  # on the device (on CPU: everything, the host is the device)
    available_gb: float
    fits: bool
    host_gb: float = 0.0  # on the host besides the device (CUDA plans only)
    host_available_gb: float = math.nan
    statistics_on: str = ""  # where the Gram statistics live, in words
    peak_operation: str = ""
    parts: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    blocked: str = ""  # an operation the settings cannot run at all (offload mode and a backward pass)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """Return the plan as a markdown table: one row per part, then the totals against what is available."""
        rows = ["| part | kind | where | GiB |", "|---|---|---|---:|"]
        rows += [f"| {p['name']} | {p['kind']} | {p['on']} | {p['bytes'] / GB:.2f} |" for p in self.parts]
        rows.append(f"| reserve ({self.settings.get('reserve', 0):.0%}) | | device | {self.reserve_gb:.2f} |")
        rows.append(f"| **total on {self.device}** | | | **{self.total_gb:.2f}** of {self.available_gb:.2f} "
                    "available |")
        if self.device != "cpu":
            rows.append(f"| **total on the host** | | | **{self.host_gb:.2f}** of {self.host_available_gb:.2f} "
                        "available |")
        mode = (", offload mode: the model on the host, one layer at a time on the device"
                if self.settings.get("offload") else "")
        head = (f"Memory plan of stage {self.stage} ({self.dtype} on {self.device}{mode}, peak in "
                f"`{self.peak_operation}`): {'fits' if self.fits else 'DOES NOT FIT'}. "
                f"Statistics: {self.statistics_on}.")
        return head + "\n\n" + "\n".join(rows)


# ------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Shape:
    model_type: str
    hidden: int
    vocab: int
    tied: bool
    head_dim: int
    layers: tuple[tuple[int, int, int], ...]  # per layer: (query heads, KV heads, MLP width)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def _config_dict(model_or_config) -> dict:
    config = getattr(model_or_config, "config", model_or_config)
    return dict(config) if isinstance(config, dict) else config.to_dict()


def _shape(model_or_config) -> _Shape:
    """Return the shapes the memory formulas need; a model's per-layer shapes are read from its weights."""
    from pruning_utils.model.arch import arch_of, head_dim, layer_shapes

    cfg = _config_dict(model_or_config)
    mt = arch_of(cfg).model_type
    h, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if hasattr(model_or_config, "parameters"):
        hd = head_dim(model_or_config)
        layers = tuple((s.n_heads, s.n_kv_heads, s.intermediate) for s in layer_shapes(model_or_config))
    else:
        hd = int(cfg.get("head_dim") or h // n_heads)
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        per = cfg.get("per_layer_config") or {}
        layers = tuple((int(per.get(str(i), {}).get("num_attention_heads", n_heads)), n_kv,
                        int(per.get(str(i), {}).get("intermediate_size", cfg["intermediate_size"])))
                       for i in range(int(cfg["num_hidden_layers"])))
    attn_bias = bool(cfg.get("attention_bias"))
    # Qwen2 has q/k/v biases built in; Llama's attention_bias and Qwen3's cover q/k/v/o; mlp_bias gate/up/down
    return _Shape(mt, h, int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)), hd, layers,
                  qkv_bias=mt == "qwen2" or attn_bias, o_bias=attn_bias and mt != "qwen2",
                  mlp_bias=bool(cfg.get("mlp_bias")) and mt == "llama", qk_norm=mt == "qwen3")


def _layer_params(s: _Shape, nh: int, nkv: int, inter: int) -> int:
    h, q, kv = s.hidden, nh * s.head_dim, nkv * s.head_dim
    n = 2 * h * q + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two norms
    n += (q + 2 * kv) * s.qkv_bias + h * s.o_bias + (2 * inter + h) * s.mlp_bias + 2 * s.head_dim * s.qk_norm
    return n


def n_params(model_or_config) -> int:
    """Return the parameter count the config describes (tied embeddings counted once), as `model.parameters()` has."""
    return _n_params(_shape(model_or_config))


def _n_params(s: _Shape) -> int:
    return sum(_layer_params(s, *layer) for layer in s.layers) + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def _owned_params(s: _Shape) -> int:
    """Parameters some head or neuron owns (what Taylor needs gradients for): q rows, o columns, gate/up rows,
    down columns."""
    h, hd = s.hidden, s.head_dim
    return sum(2 * h * nh * hd + nh * hd * s.qkv_bias + 3 * h * i + 2 * i * s.mlp_bias for nh, _, i in s.layers)


# ------------------------------------------------------------------------------------------------- formulas


def _widest(s: _Shape) -> tuple[int, int, int]:
    return max(s.layers, key=lambda t: (t[0], t[2]))


def _layer_transient(s: _Shape, B: int, S: int, b: int) -> float:
    """One layer's inference working set: residual, norm, attention in/out, q/k/v, MLP gate/up/product, scores."""
    nh, nkv, i = _widest(s)
    q, kv = nh * s.head_dim, nkv * s.head_dim
    return B * S * b * (4 * s.hidden + q + 2 * kv + 3 * i) + B * nh * S * S * b


def _layer_saved(s: _Shape, layer: tuple[int, int, int], B: int, S: int, b: int, lora: bool, cuda: bool) -> float:
    """What autograd keeps of one layer for backward: norms' in/out, q/k/v before and after rotary, MLP products."""
    nh, nkv, i = layer
    h, q, kv = s.hidden, nh * s.head_dim, nkv * s.head_dim
    saved = B * S * b * (6 * h + 3 * q + 4 * kv + 4 * i)
    if lora:  # peft's dropout copies each wrapped module's input and keeps its mask: one byte on CUDA (the fused
        # kernel), a tensor of the input's dtype on CPU (input * noise)
        saved += B * S * (b + (1 if cuda else b)) * (5 * h + q + i)
    return saved


def _logits_eval(s: _Shape, B: int, S: int, b: int, p: dict) -> float:
    """Perplexity's logits: the model's [B, S, vocab] in its dtype (and the reference's for the KL), or `logits_rows`
    rows of each with `logits_rows`; plus `token_scores`' fp32 steps of `SCORE_ROWS` rows (up-cast and log-softmax,
    and for the KL the reference's, its exp and the difference)."""
    from pruning_utils.measure.metrics import SCORE_ROWS

    models = 1 + bool(p["kl"])
    rows = min(p["logits_rows"] or B * S, B * S)
    return rows * s.vocab * b * models + min(SCORE_ROWS, S) * s.vocab * 4 * (2 + 3 * (models - 1))


def _logits_train(s: _Shape, B: int, S: int, b: int) -> float:
    """A training loss's logits: logits, fp32 up-cast, saved log-softmax, and their gradients in backward."""
    return B * S * s.vocab * (2 * b + 8 + 4 * (b < 4))


def _kv_cache(s: _Shape, B: int, S: int, b: int) -> float:
    return sum(2 * B * S * nkv * s.head_dim * b for _, nkv, _ in s.layers)


def _gram_bytes(s: _Shape, targets: tuple[str, ...], layer: tuple[int, int, int]) -> float:
    """fp64 Σxxᵀ + Σx of each refit module's input: o_proj's is heads x head_dim wide, down_proj's the MLP width."""
    nh, _, i = layer
    widths = {"o_proj": nh * s.head_dim, "down_proj": i}
    return sum(8 * (widths[t] ** 2 + widths[t]) for t in targets)


def _refit_workspace(s: _Shape, targets: tuple[str, ...]) -> float:
    """`reconstruct_linear` of the widest target: G[k] rows, G[k,k], its Cholesky, the fp64 weight and its update."""
    nh, _, i = _widest(s)
    widths = {"o_proj": nh * s.head_dim, "down_proj": i}
    return max(8 * (3 * widths[t] ** 2 + 3 * widths[t] * s.hidden) for t in targets)


def _criteria(p: dict) -> set[str]:
    from pruning_utils.pipeline.profiles import DEFAULTS

    names = set(_names(p["criteria"] if p["criteria"] is not None else DEFAULTS["CRITERIA"]))
    return names | ({"activation", "taylor"} if "mix" in names else set())


def _names(value) -> list[str]:
    """Return a notebook list parameter ('a,b' or a list; None or '' for none) as stripped names."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(v).strip() for v in items if str(v).strip()]


def _op_parts(s: _Shape, op: str, p: dict, b: int, targets: tuple[str, ...], cuda: bool) -> list[Part]:
    """Working memory of one operation, beyond the weights and the held Grams (see `_held`)."""
    L, h = len(s.layers), s.hidden
    if op == "load":  # a tensor is initialised (or read) next to its final copy: the largest, the embedding, counts
        nh, _, i = _widest(s)
        return [Part("the largest tensor in flight", "activations", max(s.vocab * h, h * i, h * nh * s.head_dim) * b)]
    if op == "perplexity":
        B, S = p["eval_batch"], p["eval_seq_len"]
        if p["offload"]:  # metrics.perplexity(device=): a layer walk over OFFLOAD_WINDOWS windows, then the LM head
            from pruning_utils.model.calibration import OFFLOAD_WINDOWS

            return [Part(f"hidden states of {OFFLOAD_WINDOWS} windows (in + out)", "activations",
                         2 * OFFLOAD_WINDOWS * S * h * b),
                    Part("final norm + LM head weights (offload mode)", "weights", (s.vocab + 1) * h * b),
                    Part("logits, row-stepped scores (or one layer, if larger)", "activations",
                         max(_logits_eval(s, B, S, b, dict(p, kl=False, logits_rows=None)),
                             _layer_transient(s, B, S, b)))]
        what = (f"LM heads on {p['logits_rows']} rows at a time" if p["logits_rows"] else "logits") + \
            (" (model + reference for the KL)" if p["kl"] else "")
        parts = [Part("hidden states" + (" (model + reference)" if p["kl"] and p["logits_rows"] else ""),
                      "activations", B * S * h * b * (1 + bool(p["kl"] and p["logits_rows"]))),
                 Part(f"{what}, row-stepped scores (or one layer, if larger)", "activations",
                      max(_logits_eval(s, B, S, b, p), _layer_transient(s, B, S, b)))]
        # a host-held reference scores with the variant's own LM head (`ReferenceOutputs.scoring`: every saved variant
        # keeps the unpruned one); a variant with another head would bring the reference's (vocab x hidden) over
        return parts
    if op == "prefill":
        B, S = p["latency_batch"], p["latency_seq_len"]
        return [Part("KV cache", "activations", _kv_cache(s, B, S + p["decode_tokens"], b)),
                Part("one layer", "activations", _layer_transient(s, B, S, b))]
    if op == "generate":
        B, S = p["gen_batch"], p["gen_prompt_len"]
        parts = [Part("KV cache", "activations", _kv_cache(s, B, S + p["new_tokens"], b)),
                 Part("one layer", "activations", _layer_transient(s, B, S, b)),
                 Part("last position's logits (fp32)", "activations", B * s.vocab * 4)]
        if p["reference_host"]:  # the reference answers (cached for later stages) are generated where it lives
            parts += [Part(f"{x.name} (the unpruned model's answers, on the host)", x.kind, x.bytes, "host")
                      for x in parts]
        return parts
    if op == "reference_walk":  # ReferenceOutputs(compute_device=): the host-held unpruned model's LM-head inputs
        from pruning_utils.model.calibration import OFFLOAD_WINDOWS

        B, S = p["eval_batch"], p["eval_seq_len"]
        return [Part("one decoder layer of the unpruned model", "weights",
                     max(_layer_params(s, *layer) for layer in s.layers) * b),
                Part(f"hidden states of {OFFLOAD_WINDOWS} windows (in + out)", "activations",
                     2 * OFFLOAD_WINDOWS * S * h * b),
                Part("one layer", "activations", _layer_transient(s, B, S, b)),
                Part("the unpruned model's LM-head inputs (kept for every variant's KL)", "activations",
                     (p["eval_tokens"] or 2 ** 20) * h * b, "host")]
    B, S = p["calib_batch"], p["calib_seq_len"]
    if op == "importance_forward":
        docs = 2 * p["n_calib"] if {"tfidf", "tfidf_topic"} & _criteria(p) else 0
        moments = sum(4 * (2 + docs) * (nh * s.head_dim + i) for nh, _, i in s.layers)
        return [Part("channel moments", "statistics", moments),
                Part("hidden states + one layer", "activations", B * S * h * b + _layer_transient(s, B, S, b))]
    if op == "taylor":
        saved = sum(_layer_saved(s, layer, B, S, b, False, cuda) for layer in s.layers)
        logits, grads = _logits_train(s, B, S, b), _owned_params(s) * b
        if p["n_calib"] > B:  # the second batch's forward saves its activations next to the accumulated gradients
            grad_part = Part("gradients of owned parameters", "optimizer", grads)
        else:  # one batch: backward frees each layer's activations as it writes that layer's gradients
            grad_part = Part("gradients of owned parameters, beyond the activations backward frees (one batch)",
                             "optimizer", max(0.0, grads - saved - logits))
        return [grad_part, Part(f"saved activations ({L} layers)", "activations", saved),
                Part("logits and loss", "activations", logits)]
    if op == "semantic":
        S = p["semantic_seq_len"] or S
        return [Part(f"layer inputs ({L} layers) + clean and ablated log-probs", "activations",
                     L * B * S * h * b + 3 * B * S * s.vocab * 4)]
    if op == "grams":
        per_layer = max(_gram_bytes(s, targets, layer) for layer in s.layers)
        nh, _, i = _widest(s)
        width = max({"o_proj": nh * s.head_dim, "down_proj": i}[t] for t in targets)
        parts = [Part("hidden states of every calibration window (in + out)", "activations",
                      2 * p["n_calib"] * S * h * b),
                 Part("one layer + Gram update (fp32 product, fp64 sum)", "activations",
                      _layer_transient(s, B, S, b) + 12 * width ** 2)]
        if p["grams"] != "all" or p["offload"]:  # else the layer's Grams are already among the held ones
            parts.insert(0, Part("Grams of the layer being collected", "statistics", per_layer))
        return parts
    if op == "prune_refit":
        where = "host" if p["grams"] == "layerwise" else "device"
        parts = [Part("refit workspace (fp64)", "statistics", _refit_workspace(s, targets), where)]
        if p["grams"] in ("sequential", "streamed"):  # walk_layers: the windows' hidden states, one layer's Grams
            parts += _op_parts(s, "grams", p, b, targets, cuda)
        return parts
    if op == "lora_step":
        B, S = p["lora_batch"], p["lora_seq_len"]
        r = p["lora_r"]
        lora = sum(r * (2 * (h + nh * s.head_dim) + 2 * (h + nkv * s.head_dim) + 3 * (h + i))
                   for nh, nkv, i in s.layers)
        if p["grad_checkpointing"]:  # only layer inputs kept; one layer's activations recomputed at a time
            saved = L * B * S * h * b + max(_layer_saved(s, layer, B, S, b, True, cuda) for layer in s.layers)
        else:
            saved = sum(_layer_saved(s, layer, B, S, b, True, cuda) for layer in s.layers)
        parts = [Part("LoRA adapters fp32 + gradients + AdamW moments", "optimizer", 16 * lora),
                 Part(f"saved activations ({L} layers{', checkpointed' if p['grad_checkpointing'] else ''})",
                      "activations", saved),
                 Part("logits and loss", "activations", _logits_train(s, B, S, b))]
        if p["distill"]:
            parts.append(Part("teacher logits + both log-softmaxes (fp32)", "activations", B * S * s.vocab * (b + 8)))
        return parts
    raise ValueError(f"unknown operation '{op}'; known: {', '.join(OPERATIONS)}")


def _int8_copy(s: _Shape, cpu: bool, b: int) -> float:
    """Bytes of the adaptive runtime's INT8 level (`quantize.quantize_int8_by_layer`): int8 projections with an fp32
    scale per output row; on CPU fp32 copies of the norms and the LM head of a half-precision model (its kernels take
    fp32 activations), on CUDA or in fp32 those are shared with the model; the input embedding is always shared."""
    total = 0.0
    for nh, nkv, i in s.layers:
        q, kv = nh * s.head_dim, nkv * s.head_dim
        rows = q + 2 * kv + s.hidden + 2 * i + s.hidden  # output rows of q, k, v, o, gate, up, down
        total += _layer_params(s, nh, nkv, i) + 4 * rows
    if cpu and b != 4:
        total += 4 * (s.vocab * s.hidden + (2 * len(s.layers) + 1) * s.hidden)
    return total


def _held(s: _Shape, p: dict, b: int, targets: tuple[str, ...], copies: int, reference: str, cpu: bool = False,
          judge: bool = False) -> list[Part]:
    weights = _n_params(s) * b
    held = weights if p["held_bytes"] is None else float(p["held_bytes"])
    home = "host" if p["offload"] else "device"
    name = "weights" if p["held_bytes"] is None else "weights of the checkpoint held (the largest the stage loads)"
    parts = [Part(f"{name} x {copies}" if copies > 1 else name, "weights", copies * held, home)]
    if p["offload"]:
        parts.append(Part("one decoder layer's weights (offload mode)", "weights",
                          max(_layer_params(s, *layer) for layer in s.layers) * b))
    if reference:
        where = "host" if p["offload"] or p["reference_host"] else "device"
        parts.append(Part(f"the unpruned model ({reference})", "weights", weights, where))
    if judge:
        parts.append(Part("the semantic judge (all-MiniLM-L6-v2 and its libraries)", "weights", JUDGE_BYTES, "host"))
    if p["int8_level"]:  # its projections follow the held model's: scaled by its size when that is a checkpoint
        parts.append(Part("INT8 level's copy (built one layer at a time)", "weights",
                          _int8_copy(s, cpu, b) * held / weights, home))
    if targets and p["grams"] in ("all", "layerwise"):
        total = sum(_gram_bytes(s, targets, layer) for layer in s.layers)
        where = "device" if p["grams"] == "all" and not p["offload"] else "host"
        parts.append(Part(f"Grams of {len(s.layers)} layers ({', '.join(targets)}, fp64)", "statistics", total, where))
    return parts


# ------------------------------------------------------------------------------------------------- plans


def _dtype(dtype, device: torch.device) -> torch.dtype:
    from pruning_utils.model.devices import resolve_dtype

    if device.type == "cuda" and dtype in (None, "", "auto") and not torch.cuda.is_available():
        return torch.float16  # planning for a GPU from a machine without one: the T4 / P100 case
    return resolve_dtype(dtype, device)


def _host_available() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / GB
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 / GB
        except (OSError, ValueError):
            pass
    return math.nan


def available_gb(device: torch.device | str) -> float:
    """Return the free memory in GiB: `torch.cuda.mem_get_info` on CUDA, the host's available memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / GB if torch.cuda.is_available() else math.nan
    return _host_available()


def _params(given: dict) -> dict:
    unknown = [k for k in given if k not in PARAMS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], PARAMS, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(PARAMS)}"
        raise ValueError(f"unknown memory-plan parameter '{unknown[0]}'; {hint}")
    p = {**PARAMS, **given}
    if p["grams"] not in GRAM_MODES:
        raise ValueError(f"unknown grams mode '{p['grams']}'; known: {', '.join(GRAM_MODES)}")
    return p


# operations offload mode runs on the host (the model is there) and those it cannot run (every layer at once)
_OFFLOAD_STAGES = ("00", "02", "03")  # the stages whose notebooks read OFFLOAD
_HOST_OPS = ("load", "prefill", "generate")
_WHOLE_MODEL_OPS = {"taylor": "taylor (CRITERIA: taylor, mix, semantic_refit)",
                    "semantic": "semantic (CRITERIA: semantic, semantic_refit)",
                    "lora_step": "LoRA recovery (stage 04)"}


def _plan(model_or_config, name: str, ops: tuple[str, ...], targets: tuple[str, ...], copies: int, reference: str,
          p: dict) -> MemoryPlan:
    from pruning_utils.model.devices import resolve_device

    s = _shape(model_or_config)
    device = resolve_device(p["device"])
    if p["offload"] and device.type == "cpu":
        raise ValueError("offload mode keeps the model on the host and moves one layer at a time to a GPU: it needs "
                         "DEVICE=cuda (or 'auto' on a machine with a GPU); on a CPU use OFFLOAD='off'")
    dtype = _dtype(p["dtype"], device)
    b = torch.empty(0, dtype=dtype).element_size()
    held = _held(s, p, b, targets, copies, reference, device.type == "cpu", name in JUDGE_STAGES)
    options = {op: _op_parts(s, op, p, b, targets, device.type == "cuda") for op in ops}
    blocked = ""
    if p["offload"]:
        for op in _HOST_OPS:
            if op in options:
                options[op] = [Part(x.name + " (on the host: offload mode)", x.kind, x.bytes, "host")
                               for x in options[op]]
        whole = [_WHOLE_MODEL_OPS[op] for op in ops if op in _WHOLE_MODEL_OPS]
        if whole:
            blocked = (f"offload mode cannot run {' or '.join(whole)}: they need every layer on the device at once. "
                       "Drop taylor, semantic and mix from CRITERIA, or use OFFLOAD='off' on a device "
                       "that holds the model")
    if p["reference_host"] and p["distill"] and "lora_step" in ops:
        blocked = ("distillation (RECOVERY_LOSS distill / mix) needs the teacher's logits at every step, but the "
                   "unpruned model stays on the host (it does not fit beside the student): use RECOVERY_LOSS='lm', "
                   "or a device that holds both")
    on_device = lambda parts: sum(x.bytes for x in parts if x.on == "device" or device.type == "cpu")  # noqa: E731
    # a host-held reference's outputs are computed before the stage's own model is loaded (`reference.prepare`)
    alone = ("reference_walk",) if p["reference_host"] else ()
    held_for = lambda op: [x for x in held if x.on == "host"] if op in alone else held  # noqa: E731
    peak = max(ops, key=lambda op: on_device(held_for(op) + options[op]))
    working = [Part(f"{peak}: {x.name}", x.kind, x.bytes, x.on) for x in options[peak]]
    parts = held_for(peak) + working
    if device.type != "cpu":  # load_model reads the weights on the host before moving them
        moved = _n_params(s) * b if p["held_bytes"] is None else float(p["held_bytes"])
        parts.append(Part("loading: one copy of the weights passes through", "weights", moved, "host"))
    dev = [x for x in parts if x.on == "device" or device.type == "cpu"]
    sums = {k: sum(x.bytes for x in dev if x.kind == k) / GB for k in KINDS}
    reserve = p["reserve"] * sum(sums.values())
    total = sum(sums.values()) + reserve
    host_parts = [x for x in held if x.on == "host" and device.type != "cpu"]
    host = sum(x.bytes for x in host_parts)
    if device.type != "cpu":  # the operation that needs the most on the host, which need not be the device's peak
        host += max(sum(x.bytes for x in options[op] if x.on == "host") for op in ops)
    loading = [x.bytes for x in parts if x.name.startswith("loading")]
    if p["reference_host"]:  # notebooks 04 / 06 load the unpruned model on the host first, then the models they move
        host = (host + max(loading)) / GB
    else:
        host = max([host] + loading) / GB  # loading happens before the Grams
    avail = p["available_gb"] if p["available_gb"] is not None else available_gb(device)
    host_avail = (math.nan if device.type == "cpu" else
                  p["host_available_gb"] if p["host_available_gb"] is not None else _host_available())
    fits = total <= avail and (device.type == "cpu" or not host > host_avail) and not blocked
    grams = "layerwise" if p["grams"] == "all" and p["offload"] else p["grams"]
    where = {"all": f"every layer's Grams on the {device.type} (collect_grams storage=None)",
             "layerwise": "one layer's Grams on the device while collecting, every layer's on the host "
                          "(collect_grams storage='cpu'); the refit runs on the host",
             "streamed": "one layer's Grams at a time: each one-shot refit collects, uses and drops them "
                         "(one calibration pass per refit variant), none held",
             "sequential": "one layer's Grams at a time (sequential refit), none held"}[grams] if targets else \
        "streamed per-channel moments only"
    settings = {k: v for k, v in p.items() if k not in ("available_gb", "host_available_gb")}
    settings.update(copies=copies, params=_n_params(s), model_type=s.model_type)
    return MemoryPlan(name, str(device), str(dtype).replace("torch.", ""), sums["weights"], sums["statistics"],
                      sums["activations"], sums["optimizer"], reserve, total, avail, bool(fits), host, host_avail,
                      where, peak, [asdict(x) for x in parts], settings, blocked)


def plan_stage(config, stage: str, **params) -> MemoryPlan:
    """Return the memory plan of pipeline stage '00' | '02' | '03' | '04' | '05' | '06' for a model config
    (see `PARAMS`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; known: {', '.join(STAGES)}")
    p = _params(params)
    # 00 measures the unpruned model itself, 05 no KL at all; offload mode has no second model to compare with
    p["kl"] = p["kl"] and stage not in ("00", "05") and not p["offload"]
    ops, targets = _STAGE_OPS[stage], _STAGE_TARGETS.get(stage, ())
    if stage == "00":  # semantic_refit: the gradient pass (down_proj weights), the head ablations and the Grams
        crit = _criteria(p)
        refit = "semantic_refit" in crit
        ops += ("taylor",) * ("taylor" in crit or refit) + ("semantic",) * ("semantic" in crit or refit)
        if refit:  # its Grams go to the host layer by layer (`Passes.grams`)
            ops, targets, p = ops + ("grams",), ("o_proj", "down_proj"), dict(p, grams="layerwise")
    p["int8_level"] = p["int8_level"] and stage == "05"
    if stage not in _HELD_STAGES:
        p["held_bytes"] = None
    reference = {"04": "teacher, reference for the KL and the answers", "06": "the baseline"}.get(stage, "")
    if stage == "04" and not p["teacher"]:
        reference = ""
    p["reference_host"] = bool(p["reference_host"] and reference)
    if stage == "06" and p["rows_known"]:  # perplexity and KL come from the rows: the side texts' windows remain
        p = dict(p, eval_seq_len=min(p["eval_seq_len"], SIDE_SEQ_LEN), kl=False)
    elif tokens := p["sweep_tokens" if stage == "05" else "eval_tokens"]:
        # a perplexity batch holds at most the windows there are (05 scores the sweeps' chunks only)
        p["eval_batch"] = max(1, min(p["eval_batch"], math.ceil(int(tokens) / p["eval_seq_len"])))
    if p["reference_host"] and p["kl"]:
        ops += ("reference_walk",)
    copies = p["copies"] if p["copies"] is not None else _COPIES[stage]
    return _plan(config, stage, ops, targets, copies, reference, p)


def plan_operation(config, op: str, targets: tuple[str, ...] = ("o_proj", "down_proj"), **params) -> MemoryPlan:
    """Return the plan of one operation alone (`OPERATIONS`): the weights, the Grams it needs, its working memory."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation '{op}'; known: {', '.join(OPERATIONS)}")
    p = _params(params)
    copies = p["copies"] if p["copies"] is not None else _COPIES.get(op, 1)
    return _plan(config, op, (op,), targets if op in ("grams", "prune_refit") else (), copies, "", p)


def _advice(plan: MemoryPlan, largest: list[dict]) -> list[str]:
    kinds, stage = {p["kind"] for p in largest}, plan.stage
    out = []
    if "statistics" in kinds:
        out.append("Gram statistics do not shrink with fewer tokens: keep them on the host (GRAMS='host', "
                   "`collect_grams(..., storage='cpu')`) if the host has room, or hold one layer's at a time "
                   "(GRAMS='streamed', or the sequential refit RECON_SEQUENTIAL=True)")
    if "activations" in kinds and stage == "04":
        out.append("GRAD_CHECKPOINTING=True (each layer's input kept, its activations recomputed in backward), "
                   "RECOVERY_BATCH=1 with GRAD_ACCUM=4 (the same windows per step: the LM loss's fp32 logits grow "
                   "with the micro-batch) and RECOVERY_LOSS='lm' (distillation adds the teacher's logits), as the "
                   "kaggle-qwen2.5-3b profile does")
    if "activations" in kinds:
        out.append("use a smaller batch or sequence length (EVAL_SEQ_LEN, CALIB_SEQ_LEN, RECOVERY_BATCH, "
                   "RECOVERY_SEQ_LEN, LATENCY_SEQ_LEN; the logits grow with batch x sequence x vocabulary)")
    if any("logits" in p["name"] for p in largest) and not plan.settings.get("logits_rows"):
        out.append(f"apply the LM heads a few rows at a time (logits_rows=, `metrics.perplexity(logits_rows=)`: what "
                   f"`choose` picks for vocabularies of {LARGE_VOCAB:,} tokens and more on a GPU)")
    if "optimizer" in kinds:
        out.append("drop taylor and mix from CRITERIA (their gradients cover every head and neuron weight; the "
                   "kaggle-qwen2.5-3b profile runs CRITERIA='random,magnitude,activation,fluctuation,semantic')"
                   if stage == "00" else "use a smaller LORA_R")
    if plan.dtype == "float32":
        out.append("load in fp16/bf16 (DTYPE=float16): weights and activations halve")
    if plan.settings.get("copies", 1) > 1 or stage == "04":
        out.append("hold fewer model copies at once (delete each variant after measuring it; only RECOVERY_LOSS "
                   "distill / mix needs the teacher in stage 04)")
    out.append("run each stage in a fresh kernel: checkpoints pass between stages through PRUNING_MODELS_DIR, so a "
               "stage holds only what it needs")
    if plan.settings.get("offload"):
        out.append("or a smaller model / a larger device: this plan is already in offload mode (the model on the "
                   "host, one layer at a time on the device)")
    elif plan.device != "cpu":
        out.append("or offload mode (OFFLOAD='on', or 'auto' to switch when needed): the model stays on the host and "
                   "one decoder layer at a time goes to the device, for stages 00-03 without taylor / semantic")
    else:
        out.append("or a smaller model / a machine with more memory (offload mode needs a GPU)")
    return out


def check_plan(plan: MemoryPlan) -> MemoryPlan:
    """Return the plan when it fits; raise `MemoryPlanError` naming the dominant parts and what to change when not."""
    if plan.fits:
        return plan
    if plan.blocked:
        raise MemoryPlanError(f"stage {plan.stage}: {plan.blocked}.")
    over_device = not plan.total_gb <= plan.available_gb
    where = "device" if over_device else "host"
    parts = [p for p in plan.parts
             if (p["on"] == where or plan.device == "cpu") and not p["name"].startswith("loading")]
    parts.sort(key=lambda p: -p["bytes"])
    need, have = (plan.total_gb, plan.available_gb) if over_device else (plan.host_gb, plan.host_available_gb)
    biggest = "; ".join(f"{p['name']} {p['bytes'] / GB:.1f} GiB ({p['kind']})" for p in parts[:3])
    raise MemoryPlanError(
        f"stage {plan.stage} needs ~{need:.1f} GiB on {'the host' if where == 'host' else plan.device} but "
        f"{have:.1f} GiB are available ({plan.dtype}, peak in {plan.peak_operation}). Largest parts: {biggest}. "
        "What to do: " + "; ".join(_advice(plan, parts[:3])) + ".")


def config_of(spec) -> dict:
    """Return the config dict of a model spec (as `loading.load_model` takes), a config, or a model, without weights."""
    from pathlib import Path

    if not isinstance(spec, (str, Path)):
        return _config_dict(spec)
    from pruning_utils.model.loading import EMBEDDED_MODEL, embedded_model_dir
    from pruning_utils.model.tiny import TINY_MODELS, tiny_config
    from pruning_utils.paths import models_dir

    spec = str(spec)
    if spec in TINY_MODELS:
        return tiny_config(spec.split("-", 1)[1]).to_dict()
    if spec.startswith("shape:"):
        from pruning_utils.model.shapes import shape_config

        return shape_config(spec.split(":", 1)[1]).to_dict()
    for folder in ([embedded_model_dir()] if spec == EMBEDDED_MODEL else []) + [Path(spec), models_dir() / spec]:
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec).to_dict()  # a hub id: config.json only


_RATES = {"head_pruned": (1, 0), "mlp_pruned": (0, 1), "mix_pruned": (1, 1)}  # which of HEAD_RATE / MLP_RATE


def _held_names(stage: str, params: dict) -> list[str]:
    """Return the checkpoints stage 04 trains (RECOVERY_MODELS), 05 nests (ADAPTIVE_MODEL) or 06 measures."""
    if stage == "04":
        return _names(params.get("RECOVERY_MODELS"))
    if stage == "05":
        return _names(params.get("ADAPTIVE_MODEL"))
    names = _names(params.get("VARIANTS")) + _names(params.get("EXTRA_VARIANTS"))
    return [n for n in names if n != "baseline"]


def checkpoint_bytes(folder, dtype_bytes: int) -> float:
    """Return the bytes a saved checkpoint's weights take once loaded in a float dtype of `dtype_bytes` bytes, from
    its safetensors headers (no tensor read): float tensors at that size, int8 ones and the like at their own."""
    from pathlib import Path

    from safetensors import safe_open

    total = 0.0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                size = dtype_bytes if part.get_dtype() in ("F64", "F32", "F16", "BF16") else \
                    getattr(torch, _SAFETENSORS_DTYPES[part.get_dtype()]).itemsize
                total += math.prod(part.get_shape()) * size
    return total


_SAFETENSORS_DTYPES = {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _pruned_bytes(s: _Shape, head_rate: float, mlp_rate: float, b: int) -> float:
    """Return the bytes of a model cut uniformly at these rates: query heads per KV group, MLP channels per layer."""
    layers = []
    for nh, nkv, i in s.layers:
        group = nh // nkv
        layers.append((nkv * (group - round(group * head_rate)), nkv, i - round(i * mlp_rate)))
    return _n_params(_Shape(**{**asdict(s), "layers": tuple(layers)})) * b


def held_model_bytes(names: list[str], params: dict, config, dtype_bytes: int) -> float | None:
    """Return the bytes of the largest of checkpoints `names` loaded in a dtype of `dtype_bytes` bytes: read from
    each one's safetensors headers where it is saved under models/ from the planned model (`checkpoint_bytes`; a
    checkpoint of another model, e.g. the embedded one's while a Kaggle profile is planned, is not read), else
    estimated from the rates that make it (HEAD_RATE / MLP_RATE for head_pruned, mlp_pruned, mix_pruned and their
    `_lora`); None when no name is given or one is neither (the whole model's bytes are planned then)."""
    from pruning_utils.paths import models_dir
    from pruning_utils.pipeline.profiles import DEFAULTS

    planned = _config_dict(config)
    sizes = []
    for name in names:
        folder = models_dir() / name
        if (folder / "config.json").is_file() and _same_model(config_of(folder), planned):
            sizes.append(checkpoint_bytes(folder, dtype_bytes))
            continue
        rates = _RATES.get(name.removesuffix("_lora"))
        if rates is None:
            return None
        head, mlp = (float(params.get(k, DEFAULTS[k])) * on for k, on in zip(("HEAD_RATE", "MLP_RATE"), rates))
        sizes.append(_pruned_bytes(_shape(config), head, mlp, dtype_bytes))
    return max(sizes) if sizes else None


def _same_model(saved: dict, planned: dict) -> bool:
    """Whether a saved checkpoint's config can be a pruned copy of the planned model: pruning keeps the model type,
    the hidden size and the vocabulary (heads, neurons and layers may differ)."""
    keys = ("model_type", "hidden_size", "vocab_size")
    return all(saved.get(k) == planned.get(k) for k in keys)


@dataclass
class StageSettings:
    """How a stage runs, chosen from its memory plan (`choose`): where the model lives and computes, where the Gram
    statistics are kept, how variants are built, the plan itself and what was switched from the configured settings."""

    stage: str
    offload: bool
    load_device: str  # where load_model puts the model (the host in offload mode)
    compute_device: str | None  # offload mode: where each decoder layer runs in turn; None otherwise
    grams: str  # GRAM_MODES
    build: str  # "copy" | "reload" (variants.Unpruned)
    plan: MemoryPlan
    switched: list[str] = field(default_factory=list)
    reference_host: bool = False  # 04 / 06: the unpruned model on the host, its outputs by a layer walk

    @property
    def reference_device(self) -> str:
        """Return where notebooks 04 / 06 load the unpruned model: the host when it does not fit beside the rest."""
        return "cpu" if self.reference_host else self.load_device

    @property
    def reference_compute(self) -> str | None:
        """Return `measure_variant`'s `reference_device`: where the host-held unpruned model's layers run (None: it
        is on the device already)."""
        return self.plan.device if self.reference_host else None

    @property
    def measure_kw(self) -> dict:
        """Return what `measure_variant` / `final_row` take from these settings: the LM heads' rows at a time and where
        a host-held reference's layers run."""
        return dict(logits_rows=self.logits_rows, reference_device=self.reference_compute)

    def prepare_reference(self, model, chunks, batch_size: int = 4):
        """Walk the host-held unpruned `model`'s outputs on `chunks` now, before the stage loads anything onto the
        device (`reference.prepare`), where the stage will measure a KL; otherwise do nothing (on the device, the
        first KL computes them; stage 06 reusing every variant's row needs none). Returns the `ReferenceOutputs` or
        None."""
        from pruning_utils.measure import reference

        if not self.reference_host or self.plan.settings.get("rows_known"):
            return None
        return reference.prepare(model, chunks, batch_size, compute_device=self.reference_compute)

    @property
    def dtype(self) -> str:
        """Return the dtype to load in: the compute device's (fp16 on a T4 even while the weights sit on the host)."""
        return self.plan.dtype

    @property
    def logits_rows(self) -> int | None:
        """Return `perplexity`'s `logits_rows`: the LM heads' token rows at a time (None: whole batches)."""
        return self.plan.settings.get("logits_rows")

    @property
    def hold_grams(self) -> bool:
        """Return whether one Gram pass is kept for every one-shot refit of the stage
        (else each refit streams its own)."""
        return self.grams in ("all", "layerwise")

    @property
    def grams_storage(self) -> str | None:
        """Return `collect_grams`' storage: 'cpu' when the Grams are kept on the host, else None (where computed)."""
        return "cpu" if self.grams == "layerwise" or (self.offload and self.grams == "all") else None

    def describe(self) -> str:
        """Return the plan's markdown table, what was switched and why, and check_plan's advice when it does not fit."""
        text = self.plan.table()
        if self.switched:
            text += "\n\n**Switched to fit:** " + "; ".join(self.switched) + "."
        try:
            check_plan(self.plan)
        except MemoryPlanError as err:
            text += "\n\n**Warning:** " + str(err)
        return text


def _choice(params: dict, name: str, known) -> str:
    from pruning_utils.pipeline.profiles import DEFAULTS

    value = params.get(name, DEFAULTS.get(name, "auto"))
    if value not in known:
        raise ValueError(f"unknown {name} '{value}'; known: {', '.join(known)}")
    return value


def _notebook_plan_params(params: dict) -> dict:
    p = {plan_name: params[nb] for nb, plan_name in _NOTEBOOK_NAMES.items() if nb in params}
    if "ADAPTIVE_LEVELS" in params:
        p["int8_level"] = "int8" in [lv.strip() for lv in str(params["ADAPTIVE_LEVELS"]).split(",")]
    if "RECOVERY_LOSS" in params:
        p["distill"] = params["RECOVERY_LOSS"] != "lm"
    return p


def choose(model_or_config, stage: str, params: dict, record: bool = True, **names) -> StageSettings:
    """Return the `StageSettings` of a stage for a model (spec, config or model) and the notebook's parameters.

    `params` (`globals()` will do) and `names` are notebook parameters (`profiles.PARAMS`); `overrides` of plan
    parameters go in as `_plan=dict(...)`. OFFLOAD / GRAMS / VARIANT_BUILD fix a setting; 'auto' lets it change,
    cheapest change first (Grams on the host, streamed Grams, in-place variants, offload), until the plan fits.
    None of these changes alters a result: the same statistics, refits and weights (tested).
    `record=False`: never the stage's memory record (`stage_memory`), e.g. for the runner's check before a run.
    """
    from pruning_utils.model.devices import resolve_device

    params = {**params, **names}
    overrides = params.pop("_plan", None) or {}
    base = {**_notebook_plan_params(params), **overrides}
    config = config_of(model_or_config) if isinstance(model_or_config, str) else model_or_config
    offload = _choice(params, "OFFLOAD", OFFLOAD_MODES)
    grams_choice = GRAMS_CHOICES[_choice(params, "GRAMS", tuple(GRAMS_CHOICES))]
    build_choice = _choice(params, "VARIANT_BUILD", BUILD_CHOICES)
    device = resolve_device(base.get("device", "auto"))
    if (base.get("logits_rows") is None and device.type == "cuda" and stage in _ROWS_STAGES
            and _shape(config).vocab >= LARGE_VOCAB):
        from pruning_utils.measure.metrics import HEAD_ROWS

        base["logits_rows"] = HEAD_ROWS  # a [batch, seq, vocab] of 150k is 1.2 GiB in fp16 per model at 4 x 1024
    if stage == "06" and "rows_known" not in base and "VARIANTS" in params:  # what notebook 06 will reuse
        from pruning_utils.measure.final_eval import rows_reusable

        variants = _names(params["VARIANTS"]) + _names(params.get("EXTRA_VARIANTS"))
        base["rows_known"] = rows_reusable(variants, int(params.get("EVAL_SEQ_LEN", PARAMS["eval_seq_len"])),
                                           params.get("EVAL_MAX_TOKENS"))
    if stage in _HELD_STAGES and "held_bytes" not in base:  # the student / variants / full level, as saved
        b = torch.empty(0, dtype=_dtype(base.get("dtype", "auto"), device)).element_size()
        base["held_bytes"] = held_model_bytes(_held_names(stage, params), params, config, b)
    if offload == "on" and device.type == "cpu" and stage in _OFFLOAD_STAGES:
        raise ValueError("OFFLOAD='on' keeps the model on the host and moves one layer at a time to a GPU, but the "
                         "device is the CPU: set DEVICE=cuda on a machine with a GPU, or OFFLOAD='off'")
    offloads = {"off": [False], "on": [True], "auto": [False] + [True] * (device.type == "cuda")}[offload]
    # 04 / 06: the unpruned model on the host when it does not fit beside the student / variants ('on': always)
    references = offloads if stage in _REFERENCE_STAGES and device.type == "cuda" else [False]
    if stage not in _OFFLOAD_STAGES:
        offloads = [False]
    if stage not in _STAGE_TARGETS:
        grams_options = ["all"]
    elif params.get("RECON_SEQUENTIAL"):
        grams_options = ["sequential"]
    else:
        grams_options = [grams_choice] if grams_choice else ["all", "layerwise", "streamed"]
    builds = ([build_choice] if build_choice != "auto" else ["copy", "reload"]) if stage in ("02", "03") else [None]
    tried: list[tuple[bool, bool, str, str | None, MemoryPlan]] = []
    for off, ref, build, grams in itertools.product(offloads, references, builds, grams_options):
        if off and grams == "all" and "layerwise" in grams_options:
            continue  # offloaded Grams go to the host: 'all' is 'layerwise' there
        kw = dict(base, grams=grams, offload=off, reference_host=ref,
                  **({"copies": 1, "kl": False} if build == "reload" else {}))
        tried.append((off, ref, grams, build, plan_stage(config, stage, **kw)))
        if tried[-1][-1].fits:
            break
    if not tried[-1][-1].fits and tried[-1][-1].blocked:  # nothing fits: show the last plan that could at least run
        tried = [t for t in tried if not t[-1].blocked] or tried
    off, ref, grams, build, plan = tried[-1]
    first = tried[0][-1]
    switched = []
    if len(tried) > 1:
        need = (f"the configured settings need ~{first.total_gb:.1f} GiB on {first.device} "
                f"({first.available_gb:.1f} free)")
        if first.total_gb <= first.available_gb and first.device != "cpu":
            need = (f"the configured settings need ~{first.host_gb:.1f} GiB on the host "
                    f"({first.host_available_gb:.1f} free)")
        if grams != tried[0][2]:
            grams_where = dict(all="held on the device", layerwise="held on the host",
                               streamed="streamed one layer at a time per refit", sequential="sequential")[grams]
            switched.append(f"Grams {grams_where} (GRAMS='auto')")
        if build != tried[0][3]:
            switched.append("variants built in place from a reloaded checkpoint, one model in memory "
                            "(VARIANT_BUILD='auto')")
        if off and not tried[0][0]:
            switched.append(f"offload mode: the model on the host, one decoder layer at a time on {device.type} "
                            "(OFFLOAD='auto')")
        if ref and not tried[0][1]:
            switched.append(f"the unpruned model on the host, its outputs for the KL by a layer walk on "
                            f"{device.type} (OFFLOAD='auto')")
        switched = [f"{need}; so " + switched[0]] + switched[1:] if switched else []
    settings = StageSettings(stage, off, "cpu" if off else str(device), str(device) if off else None,
                             grams, build or "copy", plan, switched, ref)
    if record:
        stage_memory.record(settings)  # only under $PRUNING_MEMORY_LOG (benchmarks/kaggle_rehearsal.py)
    return settings


def preflight(params: dict, stages) -> list[dict]:
    """Return, per pipeline stage in `stages` (others are left out), whether it fits this machine by the plan its
    first cell will choose from the run's notebook parameters `params` (MODEL, DEVICE, ...): `fits`, `device`,
    `need_gb` / `available_gb` on the device and on the host, and `why` (check_plan's message and advice) when not.
    Stage 06 is planned with its full perplexity pass, as before any checkpoint row exists."""
    rows = []
    for stage in [s for s in stages if s in STAGES]:
        plan = choose(params["MODEL"], stage, dict(params, _plan=dict(rows_known=False)), record=False).plan
        try:
            check_plan(plan)
            why = ""
        except MemoryPlanError as err:
            why = str(err)
        rows.append(dict(stage=stage, fits=plan.fits, device=plan.device, need_gb=plan.total_gb,
                         available_gb=plan.available_gb, host_gb=plan.host_gb,
                         host_available_gb=plan.host_available_gb, why=why))
    return rows


def describe_stage(model_or_config, stage: str, params: dict, **overrides) -> str:
    """Return the markdown plan of a stage for a model, config or spec and the notebook's parameters
    (`globals()` will do).

    Only notebook parameter names (`profiles.PARAMS`) are read from `params`; `overrides` are plan parameters.
    The settings are `choose`'s; a plan that does not fit ends with `check_plan`'s advice instead of raising, so
    the notebook goes on to try.
    """
    return choose(model_or_config, stage, dict(params, _plan=overrides)).describe()


# ------------------------------------------------------------------------------------------------- profiles

KAGGLE_T4 = dict(device="cuda", dtype="float16", available_gb=15.0, host_available_gb=29.0)  # Kaggle's T4 machine


def profile_shape(profile: str) -> str:
    """Return the committed shape (`model.shapes`) of a profile's MODEL: the longest `_source` it starts with."""
    from pruning_utils.model.shapes import SHAPES, shape_json
    from pruning_utils.pipeline.profiles import PROFILES

    model = str(PROFILES[profile]["MODEL"]).lower()
    found = sorted((len(src), name) for name in SHAPES if model.startswith(src := shape_json(name)["_source"].lower()))
    if not found:
        raise ValueError(f"profile '{profile}' runs {PROFILES[profile]['MODEL']}, which has no committed shape; "
                         f"known shapes: {', '.join(SHAPES)} (pruning_utils/model/shapes/)")
    return found[-1][1]


def profile_plan_table(profile: str, machine: dict | None = None):
    """Return a pandas DataFrame, one row per stage of `profile` on `machine` (plan parameters; `KAGGLE_T4`): the
    settings `choose` runs it with (offload, the unpruned reference on the host, Grams, build, LM-head rows), the peak
    operation, GiB on the device
    and the host, and whether it fits (`blocked`: an operation those settings cannot run)."""
    import pandas as pd

    from pruning_utils.model.shapes import shape_config
    from pruning_utils.pipeline.profiles import PROFILES

    config = shape_config(profile_shape(profile))
    rows = []
    for stage in STAGES:
        # a profile's plan before any run: notebook 06 measures what no checkpoint row gives it yet
        run = choose(config, stage, dict(PROFILES[profile], _plan=dict(machine or KAGGLE_T4, rows_known=False)))
        plan = run.plan
        rows.append(dict(stage=stage, device_gb=round(plan.total_gb, 2), available_gb=plan.available_gb,
                         host_gb=round(plan.host_gb, 2), host_available_gb=plan.host_available_gb,
                         peak=plan.peak_operation, offload=run.offload, reference_host=run.reference_host,
                         grams=run.grams if stage in _STAGE_TARGETS
                         else "", build=run.build if stage in ("02", "03") else "", logits_rows=run.logits_rows,
                         fits=plan.fits, blocked=plan.blocked))
    return pd.DataFrame(rows)


if __name__ == "__main__":  # python -m pruning_utils.pipeline.memory_plan --profile kaggle-qwen2.5-3b
    import argparse

    ap = argparse.ArgumentParser(description="Print the memory plan per stage of profiles on Kaggle's T4 machine.")
    ap.add_argument("--profile", action="append", help="profile name (repeatable; default: every kaggle-* one)")
    ap.add_argument("--preflight", metavar="STAGES", help="read a run's notebook parameters (JSON) from stdin and "
                    "print `preflight`'s rows for these comma-separated stages as JSON (the runner's check, in a "
                    "process of its own so that its CUDA context is gone before the notebooks start)")
    args = ap.parse_args()
    if args.preflight is not None:
        import sys

        print(json.dumps(preflight(json.load(sys.stdin), args.preflight.split(","))))
        raise SystemExit(0)
    from pruning_utils.pipeline.profiles import PROFILES

    for name in args.profile or [n for n in PROFILES if n.startswith("kaggle-")]:
        print(f"## {name} ({profile_shape(name)}, T4 {KAGGLE_T4['available_gb']:g} GiB + host "
              f"{KAGGLE_T4['host_available_gb']:g} GiB)\n")
        print(profile_plan_table(name).to_markdown(index=False), "\n")
