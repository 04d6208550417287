"""The module classes a checkpoint may rebuild in place of an `nn.Linear`, and INT8 weights through torchao.

The compression methods (`compress.lowrank`, `compress.sparse_lowrank`, `compress.quantize`) create these modules;
checkpoints (`model.checkpoint`, `encoder.checkpoint`) only need to rebuild empty shells of them before loading
weights, so the classes live here, below both, and the checkpoint format never imports a compression algorithm.
INT8 (`quantize_linears`, `int8_state_dict`, `load_int8_state_dict`) lives here for the same reason: a checkpoint
re-quantizes the structure it rebuilt before copying the stored INT8 data into it.
"""
from __future__ import annotations

import functools
import logging
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



# ---------------------------------------------------------------------------------------------- INT8 (torchao)
# torchao's tensor subclasses replace `torch.ao.quantization` (deprecated in torch): the same nn.Linear modules keep
# an `Int8Tensor` weight (int8 rows + one fp32 scale per row), run on CPU and CUDA, and need no module swap, so
# every other piece of the project (surgery, hooks, counts) still sees an nn.Linear.
# torchao logs a warning per optional kernel library its build lacks (CUDA-only ones on a CPU machine) and torch one
# per enum torchao registers, whoever imports torchao first (transformers may): notices, not faults
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
INT8_MODES = ("weight_only", "dynamic")  # int8 weights, fp32 activations | activations quantized per row per call


class NotApplicableError(ValueError):
    """Raised for a compression method that cannot run on the requested device (the row is reported as n/a)."""


@functools.lru_cache(maxsize=None)
def _torchao_missing() -> bool:
    try:  # an import, not a find_spec: a torchao built for another torch may fail to import
        _torchao()
    except Exception:  # noqa: BLE001 - any import failure means the same: no INT8 here
        return True
    return False


def int8_applicable(device: torch.device | str) -> bool:
    """Return True when torchao INT8 can run on `device` (CPU or CUDA, torchao installed)."""
    return torch.device(device).type in ("cpu", "cuda") and not _torchao_missing()


def check_int8_device(device: torch.device | str) -> None:
    """Raise NotApplicableError unless torchao is installed and `device` is a CPU or CUDA device."""
    if _torchao_missing():
        raise NotApplicableError("INT8 needs torchao, which is not installed or does not import with this torch; "
                                 "`pip install 'torchao>=0.12'` (a release made for the installed torch), or report "
                                 "the int8 row as not applicable")
    if not int8_applicable(device):
        raise NotApplicableError(f"torchao INT8 runs on CPU and CUDA, but the model is on {device}; quantize a CPU "
                                 "copy (model.cpu()), or report the int8 row as not applicable on this device")


def _torchao():
    """Return `torchao.quantization`, imported without its DeprecationWarnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as q
    return q


def int8_config(mode: str = "weight_only"):
    """Return the torchao config of an INT8 `mode` (`INT8_MODES`): per-row symmetric int8 weights."""
    q = _torchao()
    if mode == "weight_only":
        return q.Int8WeightOnlyConfig()
    if mode == "dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    raise ValueError(f"unknown INT8 mode '{mode}'; known: {', '.join(INT8_MODES)}")


def is_int8_tensor(t) -> bool:
    """Return True for a torchao quantized tensor (a weight `quantize_linears` replaced)."""
    return isinstance(t, torch.Tensor) and hasattr(type(t), "tensor_data_names")


# The vocabulary tables (input embedding, lm_head: one tensor when tied) are stored as INT8 on disk but kept as
# fp32 values in memory: torchao's CPU and CUDA paths convert a whole INT8 weight to the activation dtype on every call,
# which for a 49k-row lm_head costs several times the fp32 matmul per decoded token, while the projections are small
# enough for it to cost nothing. The in-memory table holds exactly the dequantized INT8 values (q * scale), so the
# model computes what its reloaded checkpoint does, and its per-row scales ride along as a non-persistent buffer.
TABLE_SCALE = "int8_scale"


def int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Return `(q, scale)`: per-row symmetric INT8 of a 2-D table (q int8 in [-127, 127], scale [rows] fp32)."""
    scale = (w.detach().float().abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def from_int8_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Return the table `q * scale` (per row) in `dtype`: the values an INT8-stored table holds in memory."""
    return (q.float() * scale.float()[:, None]).to(dtype)


@torch.no_grad()
def store_table_int8(module: nn.Module) -> None:
    """Round `module.weight` (an embedding or lm_head table) to per-row INT8 values, in place; the scales are kept."""
    q, scale = int8_rows(module.weight)
    module.weight.data = from_int8_rows(q, scale, module.weight.dtype).to(module.weight.device)
    module.register_buffer(TABLE_SCALE, scale.to(module.weight.device), persistent=False)


def int8_tables(model) -> dict[int, Tensor]:
    """Return `{id(weight): scales}` of the tables `store_table_int8` rounded."""
    return {id(m.weight): getattr(m, TABLE_SCALE) for m in model.modules() if hasattr(m, TABLE_SCALE)}


def quantize_linears(model, mode: str = "weight_only", keep_fp32: tuple[str, ...] = (),
                     embedding: bool = False) -> nn.Module:
    """Return `model` with its nn.Linear weights (names not ending in `keep_fp32`, lm_head aside) made torchao INT8,
    in place.

    `embedding`: also store the vocabulary tables (input embedding, and lm_head unless kept in fp32) as INT8
    (`store_table_int8`: INT8 on disk, the same values in memory).
    """
    if mode not in INT8_MODES:
        raise ValueError(f"unknown INT8 mode '{mode}'; known: {', '.join(INT8_MODES)}")
    q = _torchao()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def linear(module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and module is not head and fqn.rsplit(".", 1)[-1] not in keep_fp32

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(model, int8_config(mode), filter_fn=linear)
    if embedding:
        tables = [m for m in (embed, None if "lm_head" in keep_fp32 else head) if m is not None]
        store_table_int8(tables[0])
        if len(tables) == 2 and tables[1].weight is tables[0].weight:  # tied: one table, one set of scales
            tables[1].register_buffer(TABLE_SCALE, getattr(tables[0], TABLE_SCALE), persistent=False)
        elif len(tables) == 2:
            store_table_int8(tables[1])
    return model


def int8_state_dict(model) -> dict[str, Tensor]:
    """Return the state dict as plain tensors: each torchao weight or INT8 table `<name>` split into `<name>:qdata`
    (int8) and `<name>:scale`, a tensor shared by two names (tied embeddings) kept under the first name only."""
    out, seen, tables = {}, set(), int8_tables(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if is_int8_tensor(t):
            for part in int8_parts(t):
                out[f"{name}:{part}"] = getattr(t, part).detach().contiguous().cpu()
        elif id(t) in tables:
            scale = tables[id(t)]
            # exact: the table holds q * scale, so dividing by the same scale gives back q (rounded away: 1 ulp)
            out[f"{name}:qdata"] = torch.round(t.detach().float() / scale[:, None]).to(torch.int8).cpu()
            out[f"{name}:scale"] = scale.detach().cpu()
        else:
            out[name] = t.detach().contiguous().cpu()
    return out


def int8_parts(t) -> list[str]:
    """Return the names of the plain tensors a torchao weight is made of (`qdata`, `scale`, ...)."""
    names = list(t.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", []) or [])
    return [n for n in names if getattr(t, n, None) is not None]


@torch.no_grad()
def load_int8_state_dict(model, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy an `int8_state_dict` into a model quantized the same way (`quantize_linears`); return (missing,
    unexpected) names. Names the model shares with an earlier one (tied embeddings) are not expected in `state`."""
    own, seen, missing, plain, used = model.state_dict(keep_vars=True), set(), [], {}, set()
    tables = {id(m.weight): m for m in model.modules() if hasattr(m, TABLE_SCALE)}
    for name, t in own.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        parts = int8_parts(t) if is_int8_tensor(t) else ["qdata", "scale"] if id(t) in tables else []
        absent = [f"{name}:{p}" for p in parts if f"{name}:{p}" not in state]
        if absent:
            missing += absent
        elif is_int8_tensor(t):
            for p in parts:
                getattr(t, p).copy_(state[f"{name}:{p}"])
        elif parts:
            scale = state[f"{name}:scale"].to(t.device)
            t.data = from_int8_rows(state[f"{name}:qdata"], scale, t.dtype).to(t.device)
            for m in model.modules():  # the tied lm_head shares the scales too
                if getattr(m, "weight", None) is t:
                    m.register_buffer(TABLE_SCALE, scale, persistent=False)
        elif name in state:
            plain[name] = state[name]
        else:
            missing.append(name)
        used.update([f"{name}:{p}" for p in parts] or [name])
    model.load_state_dict(plain, strict=False)  # every absent name was recorded above
    return missing, sorted(set(state) - used)
