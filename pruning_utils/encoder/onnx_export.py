"""Encoder classifiers in ONNX: export (dynamic batch and sequence axes), ONNX Runtime dynamic INT8, evaluation.

`OnnxClassifier` wraps an ONNX Runtime session behind the call a PyTorch classifier answers (`model(**batch).logits`),
so `tasks.evaluate` measures an ONNX row exactly as it measures the PyTorch rows (same batches, metrics and timing
protocol). Needs `pip install onnx onnxruntime` (requirements.txt).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import torch

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OPSET = 17


def require_onnx():
    """Return the `onnxruntime` module; raises ImportError with the pip command when onnx / onnxruntime is missing."""
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX encoder rows need onnx and onnxruntime ({e}): pip install onnx onnxruntime"
                          ) from e
    return onnxruntime


def input_names(model) -> tuple[str, ...]:
    """Return the inputs of `ONNX_INPUTS` the classifier's forward takes, in that order."""
    taken = inspect.signature(model.forward).parameters
    return tuple(n for n in ONNX_INPUTS if n in taken)


class _Logits(torch.nn.Module):
    """The classifier as a function of positional input tensors to logits (what the exporter traces)."""

    def __init__(self, model, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).logits


def export_onnx(model, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write the fp32 classifier (pruned or not) to `path` as ONNX, batch and sequence axes dynamic; returns path."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = input_names(model)
    device = next(model.parameters()).device
    ids = torch.full((2, 8), 5, dtype=torch.long, device=device)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    kwargs = dict(input_names=list(names), output_names=["logits"], dynamic_axes=axes, opset_version=opset)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: seconds, and no onnxscript dependency
    model.eval()
    with torch.no_grad():
        torch.onnx.export(_Logits(model, names), tuple(example[n] for n in names), str(path), **kwargs)
    return path


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Write ONNX Runtime's dynamic INT8 copy of `src` (QInt8 weights, activations quantized per batch); returns dst."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


def file_mb(path: str | Path) -> float:
    """Return a file's size in MB (10^6 bytes, as `checkpoint_size_mb`)."""
    return Path(path).stat().st_size / 1e6


class OnnxClassifier:
    """An ONNX Runtime session (CPU) answering `model(**inputs).logits` as a PyTorch classifier does."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require_onnx()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.names = tuple(i.name for i in self.session.get_inputs())

    def eval(self):
        """Return self (sessions have no training mode)."""
        return self

    def __call__(self, **inputs) -> SimpleNamespace:
        """Return `.logits` (a CPU tensor) of a batch of input tensors; a missing token_type_ids is all zeros."""
        ids = inputs["input_ids"]
        feed = {n: (inputs[n] if n in inputs else torch.zeros_like(ids)).cpu().numpy() for n in self.names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def evaluate_onnx(path: str | Path, tokenizer, task, batch_size: int = 32, max_length: int = 64, warmup: int = 10,
                  iters: int = 50) -> dict:
    """Return `tasks.evaluate`'s metrics and timing of an ONNX classifier file on the task's validation split."""
    from pruning_utils.encoder import tasks as et

    return et.evaluate(OnnxClassifier(path), tokenizer, task, batch_size, max_length, warmup, iters)
