"""Dynamic INT8 quantization of every `nn.Linear` (CPU only), and an INT8 checkpoint format that reloads.

`torch.ao.quantization.quantize_dynamic` stores weights as qint8 (per-row scales by default) and quantizes activations
per batch at run time; its kernels (fbgemm / qnnpack) exist only on CPU, so a CUDA model is refused and the
variant is reported as not applicable there. torch marks `torch.ao.quantization` deprecated in favour of
torchao, but it still ships with torch and needs no extra package, which is why it is used here.

INT8 checkpoint folder (`save_quantized` / `load_quantized`; `checkpoint.save_pruned` / `load_pruned` dispatch here):
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
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .arch import head_dim, layer_shapes, stock_config
from .checkpoint import CheckpointError, resolve_checkpoint_dir
from .metrics import checkpoint_size_mb
from .plan import PruningPlan

QUANT_FILE = "int8_checkpoint.json"
WEIGHTS_FILE = "model_int8.bin"  # .bin: `metrics.checkpoint_size_mb` counts it as a weight file
FORMAT = "semantic-llm-pruning-int8/1"


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


def write_int8(model, folder: Path, plan: PruningPlan) -> None:
    """Write an INT8 model's quantized state dict and its meta file into `folder` (`checkpoint.save_pruned` calls it)."""
    shapes = layer_shapes(model)  # dynamic quantized Linear keeps in_features / out_features
    _, stock = stock_config(model.config.to_dict(), shapes, head_dim(model), plan.base_heads, plan.base_intermediate)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    meta = {"format": FORMAT, "quantization": "dynamic int8: qint8 weights of every nn.Linear, activations per batch",
            "per_channel": bool(getattr(model, "int8_per_channel", True)),
            "torch": torch.__version__, "fp32_stock_loadable": stock, "query_heads": [s.n_heads for s in shapes],
            "intermediate": [s.intermediate for s in shapes], "plan": plan.to_dict()}
    (folder / QUANT_FILE).write_text(json.dumps(meta, indent=1, default=str))


def save_quantized(model, tokenizer, folder, plan: PruningPlan | None = None, extra: dict | None = None) -> Path:
    """Write an INT8 model (from `quantize_int8`) atomically as config + quantized state dict + meta files + tokenizer.

    The folder is an ordinary project checkpoint (`checkpoint.save_pruned`, plan file `"weights": "int8"`), so
    `checkpoint.load_pruned` and `loading.load_model` reload it; returns the folder.
    """
    from .checkpoint import save_pruned

    if not getattr(model, "int8", False):
        raise ValueError("save_quantized expects a model returned by quantize_int8; quantize it first "
                         "(a plain model is saved with checkpoint.save_pruned)")
    return save_pruned(model, tokenizer, folder, plan=plan, extra=extra)


def load_quantized(folder):
    """Return `(model, tokenizer)` from a folder written by `save_quantized` (on CPU)."""
    from .checkpoint import build_structure, load_tokenizer

    folder = resolve_checkpoint_dir(folder)
    path = folder / QUANT_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {QUANT_FILE}: it is not an INT8 checkpoint of this project; "
                              "write one with quantize.save_quantized, or load a pruned checkpoint with load_pruned")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-save it")
    per_channel = bool(meta.get("per_channel", True))
    structure = build_structure(json.loads((folder / "config.json").read_text()), meta, torch.float32)
    if getattr(structure.config, "tie_word_embeddings", False):
        structure.tie_weights()
    model = _quantize(structure.eval(), per_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own TypedStorage notice while unpacking qint8 params
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.pruning_plan, model.int8, model.int8_per_channel = PruningPlan.from_dict(meta["plan"]), True, per_channel
    return model, load_tokenizer(folder)


def size_mb(folder) -> float:
    """Return the size on disk in MiB of a checkpoint's weight files (INT8 or fp32 alike)."""
    return checkpoint_size_mb(resolve_checkpoint_dir(folder))
