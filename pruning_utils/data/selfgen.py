"""Text sampled from the model being pruned: calibration that carries the model's own distribution, and the
held-out set of the fidelity measure.

Why: statistics taken on one domain (e.g. Python docs) tune the pruned model to that domain; text the model
writes itself covers what the model does in general. Samples are seeded and cached on disk, keyed by the model's
weights and the sampling settings, so every stage of a run reuses the same windows.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pruning_utils.atomic import atomic_file
from pruning_utils.paths import models_dir

# Openings that pick no domain: the bare BOS plus a few generic starts (the model continues in its own voice).
NEUTRAL_PROMPTS = ("", "The", "In", "Today", "Here is", "Question:", "Once upon a time", "1.")
PURPOSES = ("calibration", "fidelity")  # distinct seed streams: the fidelity set never shares a sample


def model_fingerprint(model) -> str:
    """Return a short hash of the model's identity: its name and every parameter's name, shape and checksums
    (a pruned, refit or LoRA-merged model never shares the fingerprint of the model it came from)."""
    h = hashlib.sha256(str(getattr(model.config, "name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if type(p) not in (torch.Tensor, torch.nn.Parameter):  # an INT8 (torchao) weight: checksum its values
                p = p.dequantize()
            total, magnitude = _checksums(p)
            h.update(f"{name}{tuple(p.shape)}:{total:.10e}:{magnitude:.10e}".encode())
    return h.hexdigest()[:16]


FINGERPRINT_BLOCK = 1 << 22  # elements up-cast at a time: 32 MiB of fp64, whatever the tensor's size


def _checksums(p: torch.Tensor) -> tuple[float, float]:
    """Return the fp64 sum and absolute sum of a tensor, up-cast `FINGERPRINT_BLOCK` elements at a time (a whole
    fp64 copy of a 150k-vocabulary embedding, and its absolute value, would take 3.5 GiB at 1.5B)."""
    flat = p.detach().reshape(-1)
    total = magnitude = 0.0
    for block in flat.split(FINGERPRINT_BLOCK):
        block = block.double()
        total += block.sum().item()
        magnitude += block.abs_().sum().item()
    return total, magnitude


def sample_settings(model, seq_len: int, seed: int, temperature: float, top_p: float, prompts: tuple[str, ...],
                    purpose: str, batch_size: int) -> dict:
    """Return the settings that identify a self-generated text cache (model fingerprint, sampling, prompts)."""
    param = next(model.parameters())
    return dict(model=model_fingerprint(model), seq_len=seq_len, seed=seed, temperature=temperature, top_p=top_p,
                prompts=list(prompts), purpose=purpose, batch_size=batch_size, device=param.device.type,
                dtype=str(param.dtype))


def cache_path(settings: dict, batch: int, cache_dir: str | Path | None = None) -> Path:
    """Return the cache file of one batch of samples (under models/_cache/selfgen by default)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else models_dir() / "_cache" / "selfgen"
    return root / f"{settings['purpose']}-{key}-b{batch:04d}.safetensors"


def _prompt_ids(tokenizer, prompts: tuple[str, ...], seq_len: int) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = tokenizer.eos_token_id
    out = []
    for text in prompts:
        ids = [int(bos)] + ([int(t) for t in tokenizer.encode(text, add_special_tokens=False)] if text else [])
        out.append(ids[:max(1, seq_len // 4)])  # the opening never takes over the window
    return out


@torch.no_grad()
def _generate_batch(model, tokenizer, batch: int, settings: dict) -> torch.Tensor:
    seq_len, size = settings["seq_len"], settings["batch_size"]
    device = next(model.parameters()).device
    openings = _prompt_ids(tokenizer, tuple(settings["prompts"]), seq_len)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id
    rows = [openings[i % len(openings)] for i in range(batch * size, (batch + 1) * size)]
    width = max(len(r) for r in rows)
    # Left padding keeps every opening's last token at the end of its row, where sampling continues.
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    new = seq_len - min(len(r) for r in rows)
    # One seed per (seed, purpose, batch): a batch is the same whatever n_samples asked for it, and the
    # calibration and fidelity sets drawn with the same SEED never share a sample.
    stream = (settings["seed"] * len(PURPOSES) + PURPOSES.index(settings["purpose"])) * 100_003 + batch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(stream)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=settings["temperature"],
                             top_p=settings["top_p"], top_k=0, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return torch.stack([row[width - len(r):][:seq_len].cpu() for row, r in zip(out, rows)])


def _save(ids: torch.Tensor, path: Path, settings: dict) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:  # written whole, then renamed: a crash never leaves a half cache to trust
        save_file({"ids": ids.contiguous()}, str(tmp), metadata={"settings": json.dumps(settings)})


def sample_windows(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                   top_p: float = 0.95, purpose: str = "calibration", prompts: tuple[str, ...] = NEUTRAL_PROMPTS,
                   batch_size: int = 32, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Return `n_samples` windows of `seq_len` tokens sampled from `model` (BOS + a neutral opening, then the
    model's own text), as a LongTensor [n_samples, seq_len]; deterministic for a seed, cached per batch on disk
    (asking for fewer samples returns a prefix of the longer set)."""
    from safetensors.torch import load_file

    from pruning_utils.progress import progress

    if purpose not in PURPOSES:
        raise ValueError(f"unknown selfgen purpose '{purpose}'; known: {', '.join(PURPOSES)}")
    if n_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"selfgen needs n_samples >= 1, seq_len >= 2, batch_size >= 1 "
                         f"(got {n_samples}, {seq_len}, {batch_size})")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"selfgen needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    settings = sample_settings(model, seq_len, seed, float(temperature), float(top_p), tuple(prompts), purpose,
                               batch_size)
    batches = []
    for b in progress(range(-(-n_samples // batch_size)), desc=f"selfgen {purpose}", unit="batch"):
        path = cache_path(settings, b, cache_dir)
        if path.exists():
            batches.append(load_file(str(path))["ids"])
            continue
        batches.append(_generate_batch(model, tokenizer, b, settings))
        _save(batches[-1], path, settings)
    return torch.cat(batches)[:n_samples]
