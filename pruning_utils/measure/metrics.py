"""Size, cost and quality measures shared by every notebook: parameters, FLOPs, checkpoint size, perplexity,
latency, peak memory and the environment a measure was taken in.

Shapes are always read from the weights (`arch.layer_shapes`), never from the config, because pruned
layers may differ from one another.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from pruning_utils.model.arch import PROJECTIONS, decoder_layers, head_dim, layer_shapes, proj
from pruning_utils.paths import PROJECT_ROOT

WEIGHT_SUFFIXES = (".safetensors", ".bin")
MB = 2 ** 20  # sizes are reported in MiB, the unit of torch.cuda memory stats and of `du -m`


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


# ---------------------------------------------------------------------------------------------- size and cost


def tensor_bytes(t: torch.Tensor) -> int:
    """Return the bytes a tensor stores: a torchao INT8 weight its int8 data and scales, not its logical dtype."""
    from pruning_utils.model.linears import is_int8_tensor

    if is_int8_tensor(t):
        return sum(tensor_bytes(getattr(t, n)) for n in t.tensor_data_names) + sum(
            tensor_bytes(x) for n in (getattr(t, "optional_tensor_data_names", None) or [])
            if (x := getattr(t, n, None)) is not None)
    return t.numel() * t.element_size()


def count_params(model) -> dict[str, int]:
    """Return `total` parameters (tied embeddings counted once) and `non_embedding` (without embedding and lm_head).

    INT8 weights (torchao) count their logical values, so an INT8 model counts what its fp32 source does.
    """
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # an INT8 lm_head quantized apart from its tied fp32 table is a copy of that table: the fp32 source counts it once
    copy = head is not None and getattr(model.config, "tie_word_embeddings", False) and head.weight is not embed.weight
    skip = {id(head.weight)} if copy else set()
    params = [p for p in model.parameters() if id(p) not in skip]  # parameters() yields a tied tensor once
    excluded = {id(p) for m in (embed, head) if m is not None for p in m.parameters()}
    total = sum(p.numel() for p in params)
    return {"total": total, "non_embedding": total - sum(p.numel() for p in params if id(p) in excluded)}


def nonzero_params_non_embedding(model) -> int:
    """Return the non-embedding parameters less the zeros a sparse + low-rank linear stores in its dense weight (its
    2:4 or unstructured sparsity): below `count_params(model)['non_embedding']` only for sparse models."""
    from pruning_utils.model.linears import SparseLowRankLinear

    zeros = sum(int((m.weight == 0).sum()) for layer in decoder_layers(model) for name in PROJECTIONS
                if isinstance(m := proj(layer, name), SparseLowRankLinear))
    return count_params(model)["non_embedding"] - zeros


def _linear_macs(module) -> int:
    """Return multiply-accumulates per token of a projection: dense, factorised (r (in + out)) or sparse + low-rank."""
    rank = getattr(module, "rank", None)
    dense = module.in_features * module.out_features
    if rank is None:
        return dense
    low = rank * (module.in_features + module.out_features)
    return dense + low if hasattr(module, "u") else low  # SparseLowRankLinear keeps its (dense-stored) sparse part


def flops_per_token(model, seq_len: int = 512) -> float:
    """Return analytic forward FLOPs per token (2 x multiply-accumulates) of a causal prefill of `seq_len` tokens.

    Counted: q/k/v/o projections, attention scores and weighted sum, MLP gate/up/down and lm_head.
    Not counted: norms, rotary, softmax, activation and residual adds (element-wise, under 1%).
    Attention cost grows with context: in a causal prefill token i sees i keys, so the mean
    context is (seq_len + 1) / 2 keys per token.
    """
    hd = head_dim(model)
    context = (seq_len + 1) / 2
    macs = 0.0
    for layer, shape in zip(decoder_layers(model), layer_shapes(model)):
        # q, k, v, o, gate, up, down as stored (a factorised projection costs r (in + out))
        macs += sum(_linear_macs(proj(layer, name)) for name in PROJECTIONS)
        macs += 2 * shape.n_heads * hd * context  # q.k scores and the weighted sum of values
    head = model.get_output_embeddings()
    if head is not None:  # the Linears it multiplies by: a pruned LM head (`prune.lm_head`) its kept rows only
        macs += sum(_linear_macs(m) for m in head.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * macs


def checkpoint_size_mb(folder: str | Path) -> float:
    """Return the size in MiB of the weight files (*.safetensors, *.bin) in a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder '{folder}' does not exist; save the model there first")
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"no weight file (*.safetensors, *.bin) in '{folder}'; is it a model checkpoint?")
    return sum(f.stat().st_size for f in files) / MB


# ---------------------------------------------------------------------------------------------- quality


SCORE_ROWS = 32  # token rows per log-softmax: [rows, vocab] of a 49k vocabulary stays in cache (3x faster than a batch)
HEAD_ROWS = 512  # token rows per LM-head product in perplexity(logits_rows=): [512, 152k] fp16 is 0.15 GiB


def token_scores(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None
                 ) -> tuple[float, float]:
    """Return the summed next-token NLL of `targets` [b, s] under `logits` [b, s, vocab] and, given the reference
    model's `ref_logits`, the summed KL(reference || model) over the same tokens (0.0 without).

    Each row's log-softmax is the same computation as over the whole batch (bit for bit); the sums are taken in
    float64, in `SCORE_ROWS`-row steps that never materialise a [batch, seq, vocab] float32 copy (cheaper on a CPU,
    and what keeps a 150k vocabulary's logits inside a GPU's memory). Scores are float32: bf16 logits lose the small
    differences perplexity is meant to show.
    """
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(logits.shape[0]):
        for i in range(0, logits.shape[1], SCORE_ROWS):
            logp = F.log_softmax(logits[b, i:i + SCORE_ROWS].float(), -1)
            nll -= logp.gather(-1, targets[b, i:i + SCORE_ROWS, None]).sum(dtype=torch.float64)
            if ref_logits is not None:
                ref = F.log_softmax(ref_logits[b, i:i + SCORE_ROWS].float(), -1)
                terms = ref.exp() * (ref - logp)
                # tokens a model cannot emit (-inf logits, a pruned LM head): a target among them costs +inf, as does
                # any reference mass on them (p log(p / 0) is +inf even where p underflows, 0 where p is 0 too).
                # Looked for step by step: a [batch, seq, vocab] mask of the whole batch is 0.6 GiB at 150k x 4k
                gone = torch.isneginf(logp)
                if gone.any():
                    terms = terms.masked_fill(gone, float("inf")).masked_fill(gone & torch.isneginf(ref), 0.0)
                kl += terms.sum(dtype=torch.float64)
    return nll.item(), kl.item()



def perplexity(model, chunks: torch.Tensor, batch_size: int = 4, desc: str = "perplexity",
               progress: bool = True, device: torch.device | str | None = None, reference=None,
               logits_rows: int | None = None, reference_device: torch.device | str | None = None
               ) -> dict[str, float]:
    """Return `ppl`, mean `nll` and `tokens` scored over token chunks [n, seq_len], each chunk scored on its own;
    with a `reference` model also `kl`, the mean per-token KL(reference || model) on the same tokens; `reference` may
    also be the `reference.ReferenceOutputs` of the unpruned model on these chunks in these batches (the same KL
    without its full forward). `reference=model` measures the unpruned model itself: KL 0, and its outputs are kept
    (`models/_cache/reference/`) for the KL of every variant measured later on the same chunks.

    `device` (offload mode): the model stays where it is and each decoder layer runs on `device` in turn, over
    `calibration.OFFLOAD_WINDOWS` chunks at a time; the same figures as a plain forward (no `reference` then).

    `logits_rows` (off by default): the decoder body runs once per batch and the LM head (the reference's too) is
    applied `logits_rows` token rows at a time, so no [batch, seq, vocab] tensor exists; the same figures up to the
    rounding of a smaller matrix product (what a 150k vocabulary needs on a 15 GiB GPU, see memory_plan).

    `reference_device`: the `reference` model stays where it is (the host) and its outputs come from a layer walk on
    this device (`reference.ReferenceOutputs(compute_device=)`): the KL of a student on the GPU to an unpruned model
    that does not fit beside it.
    """
    from pruning_utils.progress import progress as bar

    if chunks.dim() != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be a LongTensor [n, seq_len >= 2], got shape {tuple(chunks.shape)}")
    if device is not None:
        return _perplexity_offloaded(model, chunks, batch_size, device, desc, progress)
    device = _device(model)
    itself = reference is model  # the unpruned model itself: KL 0, and its outputs kept for its variants' KL
    if reference is not None and not hasattr(reference, "logits"):
        from pruning_utils.measure.reference import reference_outputs

        # its forwards once per run, not per variant
        reference = reference_outputs(reference, chunks, batch_size, compute_device=reference_device)
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    with torch.inference_mode(), reference.scoring(model) if reference is not None else nullcontext():
        for start in bar(range(0, len(chunks), batch_size), desc=desc, disable=not progress, leave=False):
            ids = chunks[start:start + batch_size].to(device)
            if logits_rows:  # itself: the body's output is kept for the KL of the variants measured later
                ref = None if reference is None or itself else (reference.head, reference.head_input(start, ids))
                nll, kl = _head_scores(model, ids, logits_rows, reference.head_input(start, ids) if itself else None,
                                       ref)
                total_nll, total_kl, total_tokens = total_nll + nll, total_kl + kl, total_tokens + ids[:, 1:].numel()
                continue
            logits = reference.logits(start, ids) if itself else model(input_ids=ids, use_cache=False).logits
            ref_logits = reference.logits(start, ids).to(device) if reference is not None and not itself else None
            nll, kl = token_scores(logits[:, :-1], ids[:, 1:], None if ref_logits is None else ref_logits[:, :-1])
            total_nll += nll
            total_kl += kl
            total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    out = {"ppl": _exp(mean), "nll": mean, "tokens": total_tokens}
    if reference is not None:
        out["kl"] = 0.0 if itself else total_kl / total_tokens
    return out


def _exp(nll: float) -> float:
    """Return exp(mean NLL): inf where it overflows (a target the model cannot emit has an infinite NLL)."""
    return math.inf if nll >= 709.0 else math.exp(nll)  # NaN stays NaN


def _head_scores(model, ids: torch.Tensor, rows: int, hidden: torch.Tensor | None, reference: tuple | None
                 ) -> tuple[float, float]:
    """Return `token_scores` of a batch with the LM head applied `rows` token rows at a time to the decoder body's
    output `hidden` (computed when None), and the reference `(head, head_input)`'s likewise: the logits of a batch
    never exist whole."""
    from pruning_utils.model.arch import base_model, lm_head

    if hidden is None:
        hidden = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    head, nll, kl = lm_head(model), 0.0, 0.0
    for b in range(ids.shape[0]):
        for i in range(0, ids.shape[1] - 1, rows):
            j = min(i + rows, ids.shape[1] - 1)  # the last position predicts nothing
            ref = None if reference is None else reference[0](reference[1][b:b + 1, i:j])
            n, k = token_scores(head(hidden[b:b + 1, i:j]), ids[b:b + 1, i + 1:j + 1], ref)
            nll, kl = nll + n, kl + k
    return nll, kl


def _perplexity_offloaded(model, chunks: torch.Tensor, batch_size: int, device, desc: str, progress: bool) -> dict:
    from pruning_utils.model.arch import lm_head
    from pruning_utils.model.calibration import last_hidden, offload_group, on_device
    from pruning_utils.progress import progress as bar

    total_nll, total_tokens = 0.0, 0
    step = offload_group(batch_size)
    with torch.inference_mode():
        for start in bar(range(0, len(chunks), step), desc=f"{desc} (offload)", disable=not progress, leave=False):
            group = chunks[start:start + step]
            hidden = last_hidden(model, group, batch_size, device=device)
            with on_device(lm_head(model), device) as head:
                for b, h in zip(range(0, len(group), batch_size), hidden):
                    ids = group[b:b + batch_size].to(device)
                    total_nll += token_scores(head(h)[:, :-1], ids[:, 1:])[0]
                    total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": _exp(mean), "nll": mean, "tokens": total_tokens}


# ---------------------------------------------------------------------------------------------- speed


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer read afterwards measures finished work (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(values: list[float], prefix: str) -> dict[str, float]:
    qs = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_min": min(values),
            f"{prefix}_max": max(values), f"{prefix}_iqr": qs[2] - qs[0]}


def load_avg() -> float:
    """Return the 1-minute load average (runnable threads, this process's included), NaN where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return math.nan


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's share)
    except AttributeError:
        return os.cpu_count() or 1


def _too_wide(values: list[float], max_rel_iqr: float) -> bool:
    spread = _spread(values, "v")
    return spread["v_iqr"] > max_rel_iqr * spread["v_median"]


def is_noisy(prefill_ms: list[float], load_avg: float, cores: int, max_rel_iqr: float = 0.15) -> bool:
    """Return True when timings are not to be trusted: IQR / median above `max_rel_iqr`, or load above the cores."""
    # a load average above the core count means runnable threads queued for a core: some repeat waited
    return _too_wide(prefill_ms, max_rel_iqr) or (math.isfinite(load_avg) and load_avg > cores)


def latency(model, batch_size: int = 1, seq_len: int = 512, new_tokens: int = 32, warmup: int = 2,
            repeats: int = 5, vocab_size: int | None = None, seed: int = 0,
            timer: Callable[[], float] = time.perf_counter, max_repeats: int | None = None,
            max_rel_iqr: float = 0.15) -> dict:
    """Return prefill milliseconds and greedy KV-cache decode tokens/s (median, min, max, IQR over the repeats).

    Prefill is the forward of a [batch_size, seq_len] random prompt building the KV cache with only the
    last position's logits, as generation does; decode then produces `new_tokens` greedy tokens one at a time.
    A manual decode loop is used instead of `generate`, so an EOS token cannot stop it early.

    While the prefill IQR exceeds `max_rel_iqr` x median, more repeats run, up to `max_repeats` (default
    3 x `repeats`). `latency_noisy` is True when the spread is still too wide, or when the 1-minute load average
    (`load_avg`, the highest seen before and after) exceeded the cores this process may use: other work competed
    for the CPU, so the row should be re-measured rather than compared.
    """
    device = _device(model)
    vocab = vocab_size or model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    prefill_ms, decode_tps = [], []
    limit = max(repeats, max_repeats if max_repeats is not None else 3 * repeats)
    load = load_avg()
    with torch.inference_mode():
        i = 0
        while i < warmup + repeats or (i < warmup + limit and _too_wide(prefill_ms, max_rel_iqr)):
            i += 1
            synchronize(device)
            t0 = timer()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            synchronize(device)
            t1 = timer()
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            synchronize(device)
            t2 = timer()
            if i > warmup:  # warm-up runs pay for allocator growth and kernel selection; they are not timed
                prefill_ms.append((t1 - t0) * 1000)
                if new_tokens:
                    decode_tps.append(batch_size * new_tokens / max(t2 - t1, 1e-9))
    load = max(load, load_avg())
    result = {"batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens, "repeats": len(prefill_ms)}
    result.update(_spread(prefill_ms, "prefill_ms"))
    result.update(load_avg=load, latency_noisy=is_noisy(prefill_ms, load, usable_cores(), max_rel_iqr))
    if decode_tps:
        result.update(_spread(decode_tps, "decode_tok_s"))
        result["decode_ms_per_token"] = 1000 * batch_size / result["decode_tok_s_median"]
    result.update(device=str(device), device_name=device_name(device), dtype=str(_dtype(model)).replace("torch.", ""),
                  threads=torch.get_num_threads())
    return result


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int | None:
    """Return this process's resident memory in bytes (Linux /proc), or None where it cannot be read."""
    try:  # /proc/self/statm: resident pages is the second field (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# the highest VmHWM read before a reset: `track_peak_memory` resets the mark per measured block, and the peak of the
# whole process (`process_peak_rss_bytes`, e.g. a rehearsed stage's) must not lose what came before a reset
_PEAK_BEFORE_RESETS = 0


def _clear_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (see proc(5))
        return True
    except OSError:
        return False


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux 4+), keeping the mark it had in
    `_PEAK_BEFORE_RESETS`; return whether it worked."""
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, _peak_rss_bytes() or 0)
    return _clear_peak_rss()


def restart_process_peak() -> bool:
    """Forget this process's peak resident memory so far (`process_peak_rss_bytes` then counts from now on, e.g.
    from a stage's start); return whether the kernel's mark could be reset."""
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = 0
    return _clear_peak_rss()


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_peak_rss_bytes() -> int | None:
    """Return the peak resident memory of this whole process so far (VmHWM, across the resets of
    `track_peak_memory`), or None where /proc cannot be read."""
    mark = _peak_rss_bytes()
    return None if mark is None else max(mark, _PEAK_BEFORE_RESETS)


@contextmanager
def track_peak_memory(device: torch.device | str, interval_s: float = 0.005) -> Iterator[dict]:
    """Yield a dict filled on exit with `peak_mb` (peak during the block), `start_mb`, `delta_mb` and `kind`.

    CUDA: allocated tensor memory (`max_memory_allocated`, reset on entry). CPU: peak resident set size of the
    whole process: the kernel's high-water mark (VmHWM) reset on entry through /proc/self/clear_refs (Linux 4+);
    where that is refused, RSS sampled by a background thread (`ru_maxrss` cannot be reset and would keep the
    peak of whatever ran earlier, e.g. loading the model); without /proc, `ru_maxrss` is the fallback.
    Everything else the process holds counts: for one model's own memory use `variant_peak_memory_mb`.
    """
    device = torch.device(device)
    stats: dict = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            yield stats
        finally:
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            stats.update(kind="cuda_max_allocated", start_mb=start / MB, peak_mb=peak / MB,
                         delta_mb=(peak - start) / MB)
        return
    start = rss_bytes()
    if start is not None and _reset_peak_rss():
        try:
            yield stats
        finally:
            peak = max(_peak_rss_bytes() or 0, start)
            stats.update(kind="cpu_vmhwm", start_mb=start / MB, peak_mb=peak / MB, delta_mb=(peak - start) / MB)
        return
    if start is None:
        start = _max_rss_bytes()
        try:
            yield stats
        finally:
            peak = _max_rss_bytes()
            stats.update(kind="cpu_ru_maxrss", start_mb=start / MB, peak_mb=peak / MB, delta_mb=(peak - start) / MB)
        return
    peak, stop = [start], threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], rss_bytes() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes() or 0)
        stats.update(kind="cpu_rss_sampled", start_mb=start / MB, peak_mb=peak[0] / MB, delta_mb=(peak[0] - start) / MB)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> dict:
    """Return the peak-memory stats (see `track_peak_memory`) of calling `fn()`."""
    with track_peak_memory(device) as stats:
        fn()
    return stats


def model_bytes(model) -> int:
    """Return the bytes held by a model's parameters and buffers (a tensor shared by two names counted once; INT8
    weights by their stored bytes)."""
    from pruning_utils.model.linears import is_int8_tensor

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if is_int8_tensor(t) else t.data_ptr()  # a wrapper subclass has no storage of its own
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def _prefill(model, batch_size: int, seq_len: int) -> None:
    """Run the prefill forward `latency` times (KV cache, last logits only) on a fixed random prompt."""
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=prompt.to(_device(model)), use_cache=True, logits_to_keep=1)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so what loading freed does not look resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then include freed pages
        pass


def _memory_in_process(model, batch_size: int, seq_len: int) -> dict:
    """Return weights + the peak extra memory of one prefill, measured in this process."""
    device = _device(model)
    weights = model_bytes(model)
    if device.type != "cuda":
        _prefill(model, 1, 1)  # first call: thread pools and kernel caches, paid once per process, not per model
        trim_heap()
    with track_peak_memory(device) as mem:
        _prefill(model, batch_size, seq_len)
    workspace = max(mem["delta_mb"], 0.0)
    kind = mem["kind"] if device.type == "cuda" else f"in_process_{mem['kind']}"
    return {"peak_memory_mb": weights / MB + workspace, "weights_mb": weights / MB, "workspace_mb": workspace,
            "memory_kind": kind}


def _memory_child(spec: str, dtype: str, batch_size: int, seq_len: int, threads: int) -> dict:
    """Load `spec` on CPU in this (fresh) process and return `_memory_in_process` of it."""
    from pruning_utils.model.loading import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(spec, device="cpu", dtype=dtype)
    out = _memory_in_process(model, batch_size, seq_len)
    out["memory_kind"] = out["memory_kind"].replace("in_process", "fresh_process")
    return out


def variant_peak_memory_mb(model=None, spec: str | Path | None = None, *, batch_size: int = 1, seq_len: int = 512,
                           fresh_process: bool | None = None, timeout_s: float = 1800) -> dict:
    """Return one model's own memory: `peak_memory_mb` = `weights_mb` + `workspace_mb`, and `memory_kind`.

    `weights_mb` are the bytes of its parameters and buffers; `workspace_mb` is the peak extra memory of one
    prefill forward ([batch_size, seq_len], KV cache, last logits, as `latency` runs it). Other models in the
    process do not count. CUDA: `max_memory_allocated` minus what was allocated before, in this process.
    CPU (default): a fresh spawned process loads the model, from `spec` (a `load_model` spec) or from a temporary
    checkpoint of `model`, and measures the rise of its peak RSS during the forward, because in a long-lived
    process the allocator reuses freed memory and the figure would depend on what ran before.
    `fresh_process=False` measures in this process (fast, but the workspace may then read low).
    """
    if model is None and spec is None:
        raise ValueError("give the model, its load_model spec, or both")
    device = _device(model) if model is not None else torch.device("cpu")
    if device.type == "cuda" or fresh_process is False:
        if model is None:
            raise ValueError("fresh_process=False or a CUDA measurement needs the model itself; pass model=")
        return _memory_in_process(model, batch_size, seq_len)
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from pruning_utils.model.checkpoint import resolve_checkpoint_dir, save_pruned

    dtype = str(_dtype(model)).replace("torch.", "") if model is not None else "float32"
    with tempfile.TemporaryDirectory(prefix="peak-memory-") as tmp:
        if spec is None:
            spec = save_pruned(model, None, Path(tmp) / "model")
        elif resolve_checkpoint_dir(spec).is_dir():
            spec = resolve_checkpoint_dir(spec).resolve()  # the child must not depend on this process's models/ setting
        # spawn, not fork: a forked child would start with this process's pages (the other models) resident
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_memory_child, str(spec), dtype, batch_size, seq_len,
                               torch.get_num_threads()).result(timeout=timeout_s)


# ---------------------------------------------------------------------------------------------- environment


def device_name(device: torch.device | str) -> str:
    """Return a readable name of a device: the GPU model, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(repo: str | Path = PROJECT_ROOT) -> str:
    """Return the short commit hash of the project repository, or 'unknown'."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment_info(model=None) -> dict[str, str | int]:
    """Return where a measure was taken: device, dtype, library versions, Python, git commit, threads."""
    device = _device(model) if model is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(_dtype(model)).replace("torch.", "") if model is not None else "n/a",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count() or 0,
    }
