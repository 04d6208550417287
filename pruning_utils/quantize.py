"""Dynamic INT8 quantization of every `nn.Linear` (CPU only), and an INT8 checkpoint format that reloads.

`torch.ao.quantization.quantize_dynamic` stores weights as qint8 (per-row scales by default) and quantizes activations
per batch at run time; its kernels (fbgemm / qnnpack) exist only on CPU, so a CUDA model is refused and the
variant is reported as not applicable there. torch marks `torch.ao.quantization` deprecated in favour of
torchao, but it still ships with torch and needs no extra package, which is why it is used here.

INT8 checkpoint folder (written and read by `checkpoint`: `save_pruned` / `load_pruned` dispatch on the model and
the plan file; `checkpoint.save_quantized` / `load_quantized` are the INT8-only entry points):
- `config.json`: the fp32 structure, written by the same rules as a pruned checkpoint (`arch.stock_config`);
- `pruning_plan.json`: the project's plan file with `"weights": "int8"` and the variant's measured row;
- `model_int8.bin`: `torch.save(model.state_dict())` of the quantized model (packed qint8 weights, fp32 rest),
  readable with `torch.load(weights_only=True)`;
- `int8_checkpoint.json`: format tag, the cumulative pruning plan, per-layer shapes and the torch version;
- the tokenizer files.
Loading builds the fp32 structure from the config (per-layer shapes rebuilt as `checkpoint.load_pruned` does),
quantizes it the same way, then loads the state dict. The format is tied to torch's packed-params layout: reload
it with the torch version recorded in the meta file.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn


class NotApplicableError(ValueError):
    """Raised for a compression method that cannot run on the requested device (the row is reported as n/a)."""


def int8_applicable(device: torch.device | str) -> bool:
    """Return True when dynamic INT8 can run on `device` (CPU only)."""
    return torch.device(device).type == "cpu"


def check_int8_device(device: torch.device | str) -> None:
    """Raise NotApplicableError unless `device` is the CPU, where dynamic INT8 kernels exist."""
    if not int8_applicable(device):
        raise NotApplicableError(
            f"dynamic INT8 (torch.ao quantize_dynamic) is CPU-only, but the model is on {device}; quantize a CPU copy "
            "(model.cpu()) to measure it on CPU, or report the int8 row as not applicable on this device")


def _quantize(model, per_channel: bool) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        # torch.ao announces its move to torchao on every call; the API itself is unchanged
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def quantize_int8(model, inplace: bool = False, per_channel: bool = True):
    """Return the model with every `nn.Linear` (projections and lm_head) replaced by a dynamic INT8 one (CPU only).

    `per_channel`: one weight scale per output row (default) instead of one per matrix. Activations are always
    quantized per tensor at run time, so models with massive activation outliers (SmolLM2's down_proj inputs,
    for one) lose much more than weight-only INT8 would.
    """
    check_int8_device(next(model.parameters()).device)
    plan = getattr(model, "pruning_plan", None)
    if not inplace:
        model = copy.deepcopy(model)
    model = _quantize(model.float().eval(), per_channel)
    if plan is not None:
        model.pruning_plan = plan
    model.int8, model.int8_per_channel = True, per_channel
    return model
