"""Layer-local refit of pruned MLPs by gradient: the kept gate/up rows and down columns together (issue 34).

The least-squares refit (`reconstruction`) changes only `down_proj`'s kept columns, because that is the one
projection whose output is linear in what it keeps. The kept neurons' `gate_proj`/`up_proj` rows sit behind the
SiLU gate, so no closed form moves them; a few Adam steps on the layer's own output error do. Per layer, on the
unpruned model's MLP inputs X over the calibration windows (one-shot, like the default refit) and its MLP outputs Y:

    min over (gate rows, up rows, down columns) of  mean ||mlp_pruned(X) - Y||²

starting from the pruned (and usually lstsq-refit) weights. Shapes do not change, so the checkpoint still loads with
stock `from_pretrained`. The last `holdout` of the windows never enters a step: a layer whose error on them does not
fall keeps its weights, so the refit cannot make a layer worse on text it did not train on. Optimisation runs in
float32 on a copy of the layer's MLP whatever the model's dtype (fp16 Adam steps underflow), then is cast back.

Every layer's relative error ||mlp(X) - Y||² / ||Y||² on the held-out windows, before and after, is returned, so a
notebook can show what the steps bought.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pruning_utils.model import calibration
from pruning_utils.model.arch import decoder_layers, mlp, proj

LABEL = "local"  # appended to a variant's `reconstruction` column: lstsq+local


class LocalRefitError(ValueError):
    """Raised when the pruned and unpruned models cannot be paired layer by layer, or a setting is impossible."""


@dataclass
class LayerRefit:
    """One layer's relative output error on the held-out windows before and after the steps (`kept`: the steps
    were kept, i.e. the error fell)."""
    layer: int
    error_before: float
    error_after: float
    kept: bool


def reconstruction_label(reconstruction: str, steps: int) -> str:
    """Return the `reconstruction` column of a variant refit by `reconstruction` then `steps` local steps."""
    return f"{reconstruction}+{LABEL}" if steps > 0 else reconstruction


def _width(layer) -> int:
    return proj(layer, "down_proj").in_features


def _relative_error(module, x: Tensor, y: Tensor, chunk: int = 8192) -> float:
    """Return ||module(x) - y||² / ||y||² in float64 sums, `chunk` rows at a time."""
    num = den = 0.0
    with torch.no_grad():
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            ys = ys.float()
            num += float(((module(xs.float()) - ys) ** 2).sum(dtype=torch.float64))
            den += float((ys ** 2).sum(dtype=torch.float64))
    return num / max(den, 1e-30)


def _mlp_io(layer, hidden: list[Tensor], calls: list) -> tuple[Tensor, Tensor]:
    """Return the MLP inputs [tokens, hidden] of an unpruned layer on `hidden`, and its outputs on them."""
    block = mlp(layer)
    with torch.no_grad():
        x = torch.cat([calibration.input_of(layer, block, h, call).flatten(0, -2) for h, call in zip(hidden, calls)])
        y = torch.cat([block(part) for part in x.split(8192)])
    return x, y


def _train(block, x: Tensor, y: Tensor, steps: int, lr: float, batch_tokens: int, generator: torch.Generator) -> None:
    """Run `steps` Adam steps (cosine-decayed learning rate) of the mean squared output error on random token
    batches."""
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = x.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(n, (min(batch_tokens, n),), generator=generator).to(x.device)
            loss = ((block(x[idx].float()) - y[idx].float()) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def refit_mlps(pruned, dense, windows: Tensor, steps: int = 60, lr: float = 2e-3, batch_tokens: int = 4096,
               holdout: float = 0.125, seed: int = 0, batch_size: int = 16,
               device: torch.device | str | None = None, progress: bool = True) -> list[LayerRefit]:
    """Refit, in place, every MLP of `pruned` narrower than `dense`'s at the same depth; return one `LayerRefit`
    per such layer.

    `dense` is the unpruned model `pruned` was cut from (same layer count: a depth-pruned model has no pairing);
    `windows` the calibration windows [n, seq_len] (at least 2: the last `holdout` of them is held out);
    `device`: offload mode's compute device for the walk of `dense`. Reproducible from `seed`."""
    if steps < 0 or lr <= 0 or batch_tokens < 1:
        raise LocalRefitError(f"need steps >= 0, lr > 0 and batch_tokens >= 1 (got {steps}, {lr}, {batch_tokens})")
    if not 0 < holdout < 1:
        raise LocalRefitError(f"holdout is the fraction of windows kept out of the steps, in (0, 1); got {holdout}")
    layers_p, layers_d = decoder_layers(pruned), decoder_layers(dense)
    if len(layers_p) != len(layers_d):
        raise LocalRefitError(f"the pruned model has {len(layers_p)} decoder layers and the unpruned one "
                              f"{len(layers_d)}: a local refit pairs layers by depth, so refit before dropping layers "
                              "(or pass the model the pruned one was cut from)")
    todo = [li for li, (lp, ld) in enumerate(zip(layers_p, layers_d)) if _width(lp) < _width(ld)]
    if steps == 0 or not todo:
        return []
    n_held = max(1, round(windows.shape[0] * holdout))
    if windows.shape[0] - n_held < 1:
        raise LocalRefitError(f"{windows.shape[0]} calibration window(s) leave none to train on after holding "
                              f"{n_held} out; pass more windows")
    report = []
    bar = tqdm(total=len(todo), desc="local MLP refit", unit="layer", disable=not progress)
    walk = calibration.walk_layers(dense, windows, batch_size, max(todo), device=device)
    for li, layer, hidden, calls in walk:
        if li not in todo:
            continue
        x, y = _mlp_io(layer, hidden, calls)
        per_window = x.shape[0] // windows.shape[0]
        split = (windows.shape[0] - n_held) * per_window
        target = mlp(layers_p[li])
        # offload mode: the steps run on the compute device, the kept weights go back to the layer's home
        where = torch.device(device) if device is not None else next(target.parameters()).device
        x, y = x.to(where), y.to(where)
        block = copy.deepcopy(target).float().to(where)
        before = _relative_error(block, x[split:], y[split:])
        _train(block, x[:split], y[:split], steps, lr, batch_tokens, torch.Generator().manual_seed(seed + li))
        after = _relative_error(block, x[split:], y[split:])
        kept = after < before
        if kept:
            with torch.no_grad():
                for p_target, p_new in zip(target.parameters(), block.parameters()):
                    p_target.copy_(p_new.to(device=p_target.device, dtype=p_target.dtype))
        report.append(LayerRefit(li, before, after if kept else before, kept))
        del x, y, block
        bar.update()
        bar.set_postfix(error=f"{sum(r.error_before for r in report) / len(report):.4f} -> "
                              f"{sum(r.error_after for r in report) / len(report):.4f}")
    bar.close()
    return report
