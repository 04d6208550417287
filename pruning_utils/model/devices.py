"""Which device and dtype a model runs in: CUDA when present, half precision that the GPU supports, fp32 on CPU."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | None = None) -> torch.device:
    """Return the requested device, or CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return the dtype to use: an explicit one, else fp16 on CUDA without bf16 (T4/P100 included) or bf16,
    fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "", "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; known: {', '.join(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    if device.type == "cuda":
        # T4 (sm75) and P100 (sm60) have no bf16: half precision there is fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32
