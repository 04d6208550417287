"""Output Fisher of the refit targets: how much the calibration loss cares about each direction of their output.

For a refit target (o_proj, down_proj) with output y = W x, F = Σ_tokens g gᵀ with g = ∂L/∂y (L: the summed
next-token loss of the windows) is the empirical Fisher of the target's output. Under the usual Kronecker
approximation (g independent of x) a weight change ΔW raises the loss by about ½ tr(F ΔW G ΔWᵀ), G = Σ x xᵀ the
refit's Gram: `obs` with `fisher` scores removals in that metric instead of the plain output error tr(ΔW G ΔWᵀ).
The refit itself does not change: for any positive definite F the best kept columns of every output row are the
same ridge least squares (`reconstruction.reconstruct_linear`); only which channels go does.

One backward pass over the windows, no weight gradient kept: activations carry the gradient from the embeddings.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pruning_utils.model.arch import HEAD_INPUT, NEURON_INPUT, decoder_layers, proj
from pruning_utils.model.hooks import hooks
from pruning_utils.prune.passes import backward_batches


def output_fisher(model, windows: Tensor, batch_size: int = 4, show_progress: bool = True
                  ) -> dict[tuple[int, str], Tensor]:
    """Return Σ g gᵀ (float64, CPU, [hidden, hidden]) of the loss gradient at the output of every layer's o_proj /
    down_proj (keys like `collect_grams`: (layer, input module name)), over the windows' summed next-token loss."""
    out: dict[tuple[int, str], Tensor] = {}

    def grab(key: tuple[int, str]):
        def fwd(mod, args, y):
            def on_grad(g: Tensor) -> None:
                g = g.reshape(-1, g.shape[-1]).to(torch.float64)
                acc = out.setdefault(key, torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device))
                acc.addmm_(g.T, g)
            if y.requires_grad:
                y.register_hook(on_grad)
        return fwd

    specs = [(proj(layer, name), "forward", grab((li, name)))
             for li, layer in enumerate(decoder_layers(model)) for name in (HEAD_INPUT, NEURON_INPUT)]
    with hooks(*specs):
        backward_batches(model, windows, batch_size, desc="output Fisher", show_progress=show_progress)
    return {k: v.cpu() for k, v in sorted(out.items())}


def metric_root(fisher: Tensor) -> Tensor:
    """Return the symmetric square root S of a Fisher matrix (S S = F; negative rounding noise clipped to 0)."""
    e, v = torch.linalg.eigh(fisher.to(torch.float64))
    return (v * e.clamp_min(0).sqrt()) @ v.T
