"""The module classes a checkpoint may rebuild in place of an `nn.Linear`, and the dynamic INT8 rule.

The compression methods (`compress.lowrank`, `compress.sparse_lowrank`, `compress.quantize`) create these modules;
checkpoints (`model.checkpoint`, `encoder.checkpoint`) only need to rebuild empty shells of them before loading
weights, so the classes live here, below both, and the checkpoint format never imports a compression algorithm.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class LowRankLinear(nn.Sequential):
    """`Linear(in, r, bias=False)` then `Linear(r, out, bias)`: a factorised projection that reports its shapes."""

    def __init__(self, first: nn.Linear, second: nn.Linear):
        super().__init__(first, second)

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features

    @property
    def rank(self) -> int:
        return self[0].out_features


class SparseLowRankLinear(nn.Module):
    """y = W_sparse x + U (Vᵀ x) + b, with W_sparse stored densely (zeros included) and rank-r factors U, V."""

    def __init__(self, weight: Tensor, bias: Tensor | None, u: Tensor, v: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.u = nn.Parameter(u)  # [out, r]
        self.v = nn.Parameter(v)  # [in, r]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + (x @ self.v) @ self.u.T if self.rank else y


MODULE_KINDS_BY_CLASS = {"LowRankLinear": "lowrank", "SparseLowRankLinear": "sparse_lowrank"}


def empty_module(kind: str, rank: int, linear):
    """Return an uninitialised factorised stand-in for `linear` of the recorded kind and rank (weights loaded later)."""
    w, has_bias = linear.weight, linear.bias is not None
    if kind == "lowrank":
        return LowRankLinear(nn.Linear(w.shape[1], rank, bias=False, dtype=w.dtype),
                             nn.Linear(rank, w.shape[0], bias=has_bias, dtype=w.dtype))
    if kind == "sparse_lowrank":
        return SparseLowRankLinear(torch.empty_like(w), torch.empty_like(linear.bias) if has_bias else None,
                                   w.new_empty(w.shape[0], rank), w.new_empty(w.shape[1], rank))
    raise ValueError(f"unknown replaced-module kind '{kind}'; known: {', '.join(MODULE_KINDS_BY_CLASS.values())}")



# ---------------------------------------------------------------------------------------------- dynamic INT8

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


def quantize_linears(model, per_channel: bool, keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Return `model` with its nn.Linear modules (names not ending in `keep_fp32`) made dynamic INT8, in place."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    # quantize_dynamic takes module names; a name ending in one of `keep_fp32` (a projection such as down_proj) stays
    names = {n: qconfig for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in keep_fp32}
    with warnings.catch_warnings():
        # torch.ao announces its move to torchao on every call; the API itself is unchanged
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)
