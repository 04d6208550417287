"""Recover a pruned model with LoRA: attach adapters (peft), train them (accelerate), merge them back.

One training loop serves a notebook on CPU, a single T4/P100/A100 and `accelerate launch` data
parallelism: `train_lora` always runs through an `Accelerator` (made from the config when none is
given), which places the model, applies mixed precision (fp16 autocast + GradScaler where the GPU
lacks bf16, bf16 autocast where it has it, none on CPU) and accumulates gradients.

Divergence policy: when a loss (or, after a step, an adapter weight) is not finite, training stops,
the adapter weights of the last good step are restored and `RecoveryDivergedError` is raised; the
error carries the statistics so far (`err.stats`), so a caller that wants to go on catches it and
uses the model, which then holds the last finite adapter weights. A merge (`merge_lora`) that gives a
non-finite weight raises the same error, naming the weight.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pruning_utils.atomic import atomic_file
from pruning_utils.model.checkpoint import nonfinite_weights
from pruning_utils.serialization import JsonMixin

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSSES = ("lm", "distill", "mix")
PRECISIONS = ("auto", "fp16", "bf16", "no")
SCHEDULES = ("cosine", "linear", "constant")


class RecoveryDivergedError(RuntimeError):
    """Raised when training produced a non-finite loss or weight; the model holds the last good adapter weights."""

    def __init__(self, message: str, stats: dict[str, Any]):
        super().__init__(message)
        self.stats = stats


@dataclass
class RecoveryConfig(JsonMixin):
    """LoRA recovery settings; round-trips through JSON."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10  # capped at a quarter of the steps actually run
    schedule: str = "cosine"  # decay after warm-up: cosine | linear | constant
    max_steps: int = 100  # optimizer steps
    max_epochs: float = 1.0  # in (0, 1]: windows are never repeated, so steps <= windows / (batch * accum * processes)
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seq_len: int = 256
    loss: str = "lm"  # lm: next-token loss | distill: KL to a teacher | mix: both
    temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the KL term in `mix` (the LM term gets 1 - alpha)
    grad_checkpointing: bool = False
    seed: int = 0
    fp16: str = "auto"  # auto: fp16 on CUDA without bf16, bf16 where supported, none on CPU | fp16 | bf16 | no

    def __post_init__(self):
        self.target_modules = list(self.target_modules)
        for name, value, known in (("loss", self.loss, LOSSES), ("fp16", self.fp16, PRECISIONS),
                                   ("schedule", self.schedule, SCHEDULES)):
            if value not in known:
                raise ValueError(f"unknown {name} '{value}'; known: {', '.join(known)}")
        if not 0 < self.max_epochs <= 1:
            raise ValueError(f"max_epochs must be in (0, 1] (got {self.max_epochs}): recovery never repeats a window; "
                             "give more windows to train longer")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1] (got {self.distill_alpha})")
        if min(self.r, self.batch_size, self.grad_accum, self.max_steps, self.seq_len) < 1:
            raise ValueError("r, batch_size, grad_accum, max_steps and seq_len must all be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoveryConfig":
        """Return the config stored in a dict, refusing unknown keys (a typo would otherwise be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RecoveryConfig field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)


# ------------------------------------------------------------------------------------------ adapters


def attach_lora(model, cfg: RecoveryConfig):
    """Return a `PeftModel` with LoRA adapters on `cfg.target_modules`
    (base weights frozen; works on per-layer shapes)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(f"target modules {missing} are not in the model; its Linear names include "
                         f"{sorted(n for n in names if n.endswith('_proj'))}")
    torch.manual_seed(cfg.seed)  # LoRA A is drawn at random: the seed makes a run (and every rank) reproducible
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    # peft reads in/out features from each Linear it wraps, so pruned layers of different widths need nothing special.
    with warnings.catch_warnings():
        # peft 0.21 probes transformers' deprecated `is_gradient_checkpointing`; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def merge_lora(peft_model, stats: dict[str, Any] | None = None):
    """Return the base model with the adapters folded into its weights (peft's `merge_and_unload`), in eval mode.

    Finite adapters can still give a non-finite merged weight (a base already holding one, or a sum that overflows a
    half-precision dtype): that raises RecoveryDivergedError naming the weight, carrying `stats` (the divergence
    policy of the module docstring; the model is merged all the same).
    """
    merged = peft_model.merge_and_unload().eval()
    bad = nonfinite_weights(merged)
    if bad:
        dtype = next(merged.parameters()).dtype
        raise RecoveryDivergedError(
            f"merging the LoRA adapters gave NaN or inf in {bad[0]}" + (f" and {len(bad) - 1} more" if bad[1:] else "")
            + f" ({dtype}); the merged model is unusable: recover in float32, or with a lower lr", stats or {})
    return merged


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """Return KL(teacher || student) of the temperature-softened distributions, times T^2, averaged over tokens."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must share the student's tokenizer")
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al.)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


# ------------------------------------------------------------------------------------------ training


def mixed_precision(cfg: RecoveryConfig) -> str:
    """Return accelerate's mixed-precision name for a config: 'fp16', 'bf16' or 'no'."""
    if cfg.fp16 != "auto":
        return cfg.fp16
    if not torch.cuda.is_available():
        return "no"
    # T4 (sm75) and P100 (sm60) lack bf16: fp16 autocast with a GradScaler is their mixed precision.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def make_accelerator(cfg: RecoveryConfig):
    """Return an `Accelerator` with the config's mixed precision and gradient accumulation (CPU when no GPU)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = mixed_precision(cfg)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # accelerate keeps one precision per process: a second recovery with another precision in the same kernel
        # (a notebook re-run with other settings) would be refused; the process group (PartialState) is kept
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       gradient_accumulation_steps=cfg.grad_accum)


def _lr_factor(cfg: RecoveryConfig, total: int):
    warmup = min(cfg.warmup_steps, total // 4)  # a 10-step warm-up must not eat a 12-step run

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never 0: a step at lr 0 would be wasted
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress if cfg.schedule == "linear" else 1.0

    return factor


def _adapter_snapshot(model) -> dict[str, torch.Tensor] | None:
    """Return a CPU copy of the adapter weights, or None when one of them is not finite."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    if not torch.stack([v.isfinite().all() for v in state.values()]).all():
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _loss(model, teacher, ids: torch.Tensor, cfg: RecoveryConfig) -> torch.Tensor:
    out = model(input_ids=ids, labels=ids if cfg.loss != "distill" else None, use_cache=False)
    if cfg.loss == "lm":
        return out.loss
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    kl = distillation_loss(out.logits, teacher_logits, cfg.temperature)
    return kl if cfg.loss == "distill" else cfg.distill_alpha * kl + (1 - cfg.distill_alpha) * out.loss


def heldout_loss(model, windows: torch.Tensor, cfg: RecoveryConfig, teacher=None,
                 batch_size: int | None = None) -> float:
    """Return the mean training loss (`cfg.loss`: lm, distill or mix) over fixed windows [n, seq_len], in eval mode.

    Every window weighs the same, batches are formed in order and nothing is sampled, so the same windows give
    the same number before and after training: the honest "did recovery help" figure, unlike one minibatch.
    """
    if windows.dim() != 2 or windows.dtype != torch.long or len(windows) == 0:
        raise ValueError(f"held-out windows must be a non-empty LongTensor [n, seq_len], got {windows.dtype} "
                         f"{tuple(windows.shape)}")
    if cfg.loss != "lm" and teacher is None:
        raise ValueError(f"loss '{cfg.loss}' needs a teacher model for the held-out loss too; pass teacher=")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: LoRA dropout would otherwise make the figure random
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size or cfg.batch_size):
                ids = windows[start:start + (batch_size or cfg.batch_size)].to(device)
                total += _loss(model, teacher, ids, cfg).float().item() * len(ids)
    finally:
        model.train(was_training)
    return total / len(windows)


def write_history_csv(history: list[tuple[int, float, float]], path: str | Path, device: str = "cpu") -> Path:
    """Write the loss curve (columns step, loss, lr, stamped with the device and commit) to a CSV file atomically
    (a full disk leaves the previous one); returns its path."""
    import pandas as pd

    from pruning_utils.measure.metrics import device_name, git_commit

    frame = pd.DataFrame(history, columns=["step", "loss", "lr"])
    frame["device"], frame["commit"] = device_name(device), git_commit()
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def train_lora(model, train_windows: torch.Tensor, cfg: RecoveryConfig, teacher=None, accelerator=None,
               log_csv: str | Path | None = None, progress: bool = True,
               heldout_windows: torch.Tensor | None = None) -> dict[str, Any]:
    """Train the LoRA adapters of a PeftModel in place; returns dict(steps, tokens_seen, loss_first, loss_last,
    heldout_loss_before, heldout_loss_after, minutes, tokens_per_s, history).

    `train_windows` is a LongTensor [n, seq_len] of packed tokens; with several processes each rank trains on
    its shard. A given `accelerator` decides device and precision; its gradient accumulation is set from `cfg`.
    `loss_first` / `loss_last` are single (accumulated) minibatches; `heldout_loss_before` / `_after` are the mean
    loss over the fixed `heldout_windows` (every rank scores all of them) before the first and after the last
    step, NaN when none are given. Raises RecoveryDivergedError (model restored to the last good step) when
    training diverges.
    """
    from accelerate.utils import set_seed
    from peft import PeftModel, set_peft_model_state_dict

    from pruning_utils.progress import progress as make_bar

    if not isinstance(model, PeftModel):
        raise TypeError("train_lora needs a PeftModel: call attach_lora(model, cfg) first, or use recover(...)")
    if cfg.loss != "lm" and teacher is None:
        raise ValueError(f"loss '{cfg.loss}' needs a teacher model (e.g. the unpruned model); "
                         "pass teacher= or use loss='lm'")
    if train_windows.dim() != 2 or train_windows.dtype != torch.long:
        raise ValueError(f"train_windows must be a LongTensor [n, seq_len], got {train_windows.dtype} "
                         f"{tuple(train_windows.shape)}")
    accelerator = accelerator or make_accelerator(cfg)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    accelerator.step = 0  # accelerate's micro-batch counter: a run cut short must not shift this run's sync points
    set_seed(cfg.seed)
    # Shuffle once here with a fixed seed (not in the DataLoader), so every rank sees the same order and
    # accelerate's sharding hands each rank disjoint windows.
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(train_windows[order], batch_size=cfg.batch_size, shuffle=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = min(cfg.max_steps, int(cfg.max_epochs * len(loader)) // cfg.grad_accum)
    if total < 1:
        raise ValueError(
            f"{len(train_windows)} windows give no optimizer step with batch_size {cfg.batch_size} x grad_accum "
            f"{cfg.grad_accum} x {accelerator.num_processes} process(es); "
            "give more windows or lower batch_size/grad_accum")
    # Not prepared by accelerate: a prepared scheduler steps once per process, which would shorten the schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, _lr_factor(cfg, total))
    if teacher is not None:
        teacher.eval().to(accelerator.device)
        if accelerator.device.type == "cuda":
            teacher.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)

    unwrapped = accelerator.unwrap_model(wrapped)
    heldout = {"before": math.nan, "after": math.nan}
    if heldout_windows is not None:
        # under the same device and autocast as the "after" figure, so the two differ by training alone
        heldout["before"] = heldout_loss(unwrapped, heldout_windows, cfg, teacher=teacher)
    good = _adapter_snapshot(unwrapped)
    history: list[tuple[int, float, float]] = []
    micro: list[float] = []
    step, tokens, running, end = 0, 0, None, None
    bar = make_bar(total=total, desc="LoRA recovery", disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()

    def stats() -> dict[str, Any]:
        seconds = (end or time.perf_counter()) - start
        return dict(steps=step, tokens_seen=tokens, loss_first=history[0][1] if history else math.nan,
                    loss_last=history[-1][1] if history else math.nan, heldout_loss_before=heldout["before"],
                    heldout_loss_after=heldout["after"], minutes=seconds / 60,
                    tokens_per_s=tokens / max(seconds, 1e-9), history=list(history))

    def diverged(what: str):
        set_peft_model_state_dict(unwrapped, good)
        raise RecoveryDivergedError(
            f"LoRA recovery diverged: {what}; the adapters hold the weights of step {step} (the last finite one). "
            f"The learning rate ({cfg.lr:g}) is probably too high: try a lower lr, or fp16='no' (fp32) "
            "if half precision overflows", stats())

    try:
        for batch in loader:
            with accelerator.accumulate(wrapped):
                loss = _loss(wrapped, teacher, batch, cfg)
                # reduced over ranks so every rank takes the same decision and none waits forever in a collective
                mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()
                if not math.isfinite(mean_loss):
                    diverged(f"the loss became {mean_loss} at step {step + 1}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro.append(mean_loss)
            tokens += batch.numel() * accelerator.num_processes
            del loss
            release_step_memory(accelerator.device)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            snap = _adapter_snapshot(unwrapped)  # LoRA weights are small: a copy per step is cheap insurance
            if snap is None:
                diverged(f"an adapter weight became non-finite in step {step + 1}")
            good, step = snap, step + 1
            history.append((step, sum(micro) / len(micro), lr))
            micro = []
            running = history[-1][1] if running is None else 0.9 * running + 0.1 * history[-1][1]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
            if step >= total:
                break
        end = time.perf_counter()  # training speed excludes the held-out evaluation
        release_step_memory(accelerator.device)
        if heldout_windows is not None:
            heldout["after"] = heldout_loss(unwrapped, heldout_windows, cfg, teacher=teacher)
    finally:
        bar.close()
        if hasattr(loader, "end"):
            loader.end()  # leaving the loop early leaves the loader registered in accelerate's gradient state
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # removes the autocast wrapper from forward
        if cfg.grad_checkpointing:
            unwrapped.gradient_checkpointing_disable()
        unwrapped.eval()
        if log_csv is not None and accelerator.is_main_process:
            write_history_csv(history, log_csv, device=next(model.parameters()).device)
    return stats()


def recover(model, tokenizer, train_windows: torch.Tensor | None, cfg: RecoveryConfig, teacher=None,
            accelerator=None, log_csv: str | Path | None = None, progress: bool = True, source: str = "embedded",
            heldout_windows: torch.Tensor | None = None):
    """Attach LoRA, train, merge; returns `(merged_model, stats)` (stats as `train_lora`'s).

    Without `train_windows`, draws max_steps x batch_size x grad_accum calibration windows of `cfg.seq_len`
    tokens from `source` (see `data.calibration_windows`). `heldout_windows` (e.g. calibration windows drawn
    with another seed) give `heldout_loss_before` / `heldout_loss_after`.
    """
    if train_windows is None:
        from pruning_utils.data.sources import calibration_windows

        n = cfg.max_steps * cfg.batch_size * cfg.grad_accum
        train_windows = calibration_windows(tokenizer, source=source, n_samples=n, seq_len=cfg.seq_len, seed=cfg.seed)
    peft_model = attach_lora(model, cfg)
    try:
        stats = train_lora(peft_model, train_windows, cfg, teacher=teacher, accelerator=accelerator,
                           log_csv=log_csv, progress=progress, heldout_windows=heldout_windows)
    except RecoveryDivergedError as err:
        merge_lora(peft_model, err.stats)  # fold in the last good adapters so the caller's model is usable; re-raise
        raise
    merged = merge_lora(peft_model, stats)
    release_training_memory(merged)
    return merged, stats


def release_step_memory(device: torch.device) -> None:
    """On CPU, hand the heap a training step freed back to the OS. glibc keeps a step's freed activations (many
    tensors of a few MiB) resident and fragmented: the next step's forward then comes on top of them (a 0.5B model's
    second step peaked 1.3 GiB above its first), and so did the held-out loss after training (5.7 GiB above its
    figure before training). CUDA's caching allocator reuses its blocks: nothing to do there."""
    if torch.device(device).type == "cpu":
        from pruning_utils.measure.metrics import trim_heap

        trim_heap()


def release_training_memory(model) -> None:
    """Give back what training freed before the caller measures: the activations, gradients and optimizer states of
    the steps stay in glibc's heap (0.5 GiB resident after a 1.5B model's steps, next to the evaluation's logits) or
    in CUDA's cache unless handed back."""
    from pruning_utils.measure.metrics import trim_heap

    trim_heap()
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()
