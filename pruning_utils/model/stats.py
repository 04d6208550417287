"""Streamed statistics of a linear layer's inputs: memory never grows with the number of calibration tokens.

`Moments` keeps count, mean and centred sum of squares per channel (plus per-window sums for TF-IDF);
`GramStats` keeps Σ x xᵀ, Σ x and the token count, the input of every least-squares refit.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Hashable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from pruning_utils.model.hooks import hooks


class Moments:
    """Streamed per-channel count, mean and centred sum of squares;
    with `n_docs`, per-document |x| and activity sums."""

    def __init__(self, width: int, device: torch.device, n_docs: int = 0):
        self.n = 0.0
        self.mean = torch.zeros(width, device=device)
        self.m2 = torch.zeros(width, device=device)
        # Per-document sums cost n_docs x width floats: memory grows with documents, never with tokens.
        self.doc_abs = torch.zeros(n_docs, width, device=device) if n_docs else None
        self.doc_active = torch.zeros(n_docs, width, device=device) if n_docs else None

    def add(self, x: Tensor, row_doc: Tensor | None = None) -> None:
        """Accumulate a batch [rows, tokens, width]; `row_doc` names the document of each row."""
        x = x.float()
        nb = float(x.shape[0] * x.shape[1])
        # One fused kernel for the batch, merged with Chan's formula: exact, and no cancellation
        # like E[x^2] - E[x]^2 has on channels with a large mean.
        var_b, mean_b = torch.var_mean(x, dim=(0, 1), correction=0)
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / total)
        self.m2 += var_b * nb + delta ** 2 * (self.n * nb / total)
        self.n = total
        if self.doc_abs is not None:
            a = x.abs()
            active = (a > a.mean(-1, keepdim=True)).float()  # active: above the layer's mean |x| at that token
            self.doc_abs.index_add_(0, row_doc, a.sum(1))
            self.doc_active.index_add_(0, row_doc, active.sum(1))

    def to(self, device: torch.device | str) -> "Moments":
        """Return these moments on another device (offload mode brings each layer's back to the host)."""
        out = Moments.__new__(Moments)
        out.n = self.n
        out.mean, out.m2 = self.mean.to(device), self.m2.to(device)
        out.doc_abs = None if self.doc_abs is None else self.doc_abs.to(device)
        out.doc_active = None if self.doc_active is None else self.doc_active.to(device)
        return out

    def sq_norm(self) -> Tensor:
        """Return sum over tokens of x_j^2."""
        return (self.m2 + self.n * self.mean ** 2).cpu()

    def variance(self) -> Tensor:
        """Return the sample variance of x_j over tokens."""
        return (self.m2 / max(self.n - 1.0, 1.0)).cpu()


@dataclass
class GramStats:
    """Streamed input statistics of one linear layer: Σ x xᵀ, Σ x and the token count (float64)."""

    gram: Tensor  # [in, in]
    sum: Tensor  # [in]
    count: int = 0
    # error chasing (`add_paired`): Σ x x_refᵀ and Σ x_ref, x_ref = the unpruned model's input at the same token
    cross: Tensor | None = None  # [in, in]
    ref_sum: Tensor | None = None  # [in]

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> "GramStats":
        """Return zeroed statistics for `dim` input channels."""
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dtype=torch.float64, device=device))

    def add(self, x: Tensor) -> None:
        """Accumulate a batch of inputs [..., in] (any leading shape: batch, sequence)."""
        x = _flat(x, self.gram.device)
        # the batch product in fp32 (fp64 GEMM is ~10x slower on CPUs and far slower on consumer GPUs), the
        # running sum across batches in fp64; float64 inputs stay float64
        self.gram += (x.T @ x).double()
        self.sum += x.sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def add_paired(self, x: Tensor, ref: Tensor) -> None:
        """Accumulate inputs `x` and their cross terms with `ref`, the unpruned model's inputs at the same tokens."""
        self.add(x)
        x, ref = _flat(x, self.gram.device), _flat(ref, self.gram.device)
        if self.cross is None:
            self.cross, self.ref_sum = torch.zeros_like(self.gram), torch.zeros_like(self.sum)
        self.cross += (x.T @ ref).double()
        self.ref_sum += ref.sum(0, dtype=torch.float64)

    def to(self, device: torch.device | str) -> "GramStats":
        """Return these statistics on another device (a layer's Grams go to CPU once the layer is done)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GramStats(move(self.gram), move(self.sum), self.count, move(self.cross), move(self.ref_sum))

    @property
    def mean(self) -> Tensor:
        """Return the mean input per channel."""
        return self.sum / max(self.count, 1)


def _flat(x: Tensor, device: torch.device) -> Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).to(device)
    return x if x.dtype == torch.float64 else x.float()


class GramCollector:
    """Context manager streaming `GramStats` of the inputs of the given modules; hooks are removed on exit."""

    def __init__(self, modules: Mapping[Hashable, nn.Linear]):
        self.modules = dict(modules)
        self.stats = {k: GramStats.empty(m.in_features, m.weight.device) for k, m in self.modules.items()}
        self._stack: ExitStack | None = None

    def _hook(self, key: Hashable):
        def fn(module, args):
            self.stats[key].add(args[0])
        return fn

    def __enter__(self) -> "GramCollector":
        self._stack = ExitStack()
        self._stack.enter_context(hooks(*[(m, "pre", self._hook(k)) for k, m in self.modules.items()]))
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


def with_constant_channel(gram: Tensor, stats: GramStats, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Return the Gram and weight augmented with a constant input channel that carries the bias (Gram row = Σx,
    corner = token count; the weight's last column = the bias), so a refit treats the bias as one more column."""
    n = torch.tensor([[float(stats.count)]], dtype=gram.dtype, device=gram.device)
    s = stats.sum.to(gram.dtype)
    g = torch.cat([torch.cat([gram, s[:, None]], 1), torch.cat([s[None, :], n], 1)], 0)
    return g, torch.cat([weight, bias.detach().to(weight.device, weight.dtype)[:, None]], 1)


def cross_with_constant_channel(cross: Tensor, stats: GramStats) -> Tensor:
    """Return the cross terms Σ x x_refᵀ augmented like `with_constant_channel`: Σ x̃ x̃_refᵀ with x̃ = [x; 1]."""
    n = torch.tensor([[float(stats.count)]], dtype=cross.dtype, device=cross.device)
    return torch.cat([torch.cat([cross, stats.sum[:, None].to(cross.dtype)], 1),
                      torch.cat([stats.ref_sum[None, :].to(cross.dtype), n], 1)], 0)
