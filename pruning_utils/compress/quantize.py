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

import torch

from pruning_utils.model.arch import PROJECTIONS
from pruning_utils.model.linears import check_int8_device, quantize_linears


def quantize_int8(model, inplace: bool = False, per_channel: bool = True, smooth_windows: torch.Tensor | None = None,
                  smooth_alpha: float | None = None, keep_fp32: tuple[str, ...] | list[str] = (),
                  progress: bool = True):
    """Return the model with every `nn.Linear` (projections and lm_head) replaced by a dynamic INT8 one (CPU only).

    `per_channel`: one weight scale per output row (default) instead of one per matrix. Activations are quantized
    per tensor at run time, so models with massive activation outliers (SmolLM2's down_proj inputs, for one) lose
    much more than weight-only INT8 would; `smooth_windows` (calibration token windows) first moves those ranges
    into the weights with `smooth_for_int8` at `smooth_alpha` (default `SMOOTH_ALPHA`). `keep_fp32`: projection
    names (e.g. `down_proj`) left in fp32 everywhere, trading speed for the quality lost where outliers are
    token-specific.
    """
    keep_fp32 = tuple(keep_fp32)
    unknown = [k for k in keep_fp32 if k not in PROJECTIONS + ("lm_head",)]
    if unknown:
        raise ValueError(f"keep_fp32: unknown projection(s) {unknown}; known: {', '.join(PROJECTIONS + ('lm_head',))}")
    check_int8_device(next(model.parameters()).device)
    plan = getattr(model, "pruning_plan", None)
    if not inplace:
        model = copy.deepcopy(model)
    model = model.float().eval()
    if smooth_windows is not None:
        smooth_alpha = SMOOTH_ALPHA if smooth_alpha is None else smooth_alpha
        smooth_for_int8(model, smooth_windows, alpha=smooth_alpha, progress=progress, skip=keep_fp32)
    model = quantize_linears(model, per_channel, keep_fp32)
    if plan is not None:
        model.pruning_plan = plan
    model.int8, model.int8_per_channel = True, per_channel
    model.int8_smoothing = smooth_alpha if smooth_windows is not None else None
    model.int8_keep_fp32 = keep_fp32
    return model


# SmoothQuant-style smoothing (Xiao et al., 2023): dynamic INT8 quantizes each activation tensor with one scale, so a
# few channels of huge magnitude (SmolLM2's down_proj inputs: benchmarks/int8_smoothing.py prints them) flatten every
# other channel to a handful of levels. Dividing those input channels by s and multiplying the matching weight
# columns by s moves the range into the weights, which are quantized per output row and absorb it. The division is
# folded into the op that produces the input (an RMSNorm's weight, or up_proj's rows since down_proj's input is
# act(gate) * up), so the fp32 model computes the same function and nothing runs at inference.
# (producer, consumers): the consumers share one input, whose statistics are read at the first of them
SMOOTH_GROUPS = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                 ("post_attention_layernorm", ("gate_proj", "up_proj")),
                 ("up_proj", ("down_proj",)))
SMOOTH_ALPHA = 0.65  # the benchmark's choice with down_proj in fp32


def activation_maxima(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Return per decoder layer the max |input| per channel of q_proj, gate_proj and down_proj on `windows`."""
    from pruning_utils.model.arch import decoder_layers, proj
    from pruning_utils.model.hooks import hooks
    from pruning_utils.progress import progress as bar

    layers = list(decoder_layers(model))
    maxima = [dict() for _ in layers]

    def record(li, name):
        def fn(module, args):
            m = args[0].detach().abs().flatten(0, -2).amax(0).float()
            maxima[li][name] = torch.maximum(maxima[li][name], m) if name in maxima[li] else m
        return fn

    specs = [(proj(layer, name), "pre", record(li, name)) for li, layer in enumerate(layers)
             for name in (targets[0] for _, targets in SMOOTH_GROUPS)]
    dev = next(model.parameters()).device
    with hooks(*specs), torch.no_grad():
        for i in bar(range(0, len(windows), batch_size), desc="activation ranges", disable=not progress):
            model(windows[i:i + batch_size].to(dev), use_cache=False)
    return maxima


def smooth_for_int8(model, windows: torch.Tensor, alpha: float = SMOOTH_ALPHA, batch_size: int = 4,
                    progress: bool = True, skip: tuple[str, ...] = ()) -> list[dict]:
    """Rescale activation channels into the weights (exact in fp32) before dynamic INT8; return the scales per layer.

    `alpha` in [0, 1] sets how much of the range moves: s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha).
    A group whose consumers are all in `skip` (projections left in fp32) is left as it is: its input is never
    quantized, and unchanged weights can be shared with the fp32 model.
    """
    from pruning_utils.model.arch import decoder_layers, proj

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    maxima = activation_maxima(model, windows, batch_size=batch_size, progress=progress)
    scales = []
    with torch.no_grad():
        for layer, amax in zip(decoder_layers(model), maxima):
            layer_scales = {}
            for source, targets in SMOOTH_GROUPS:
                if all(t in skip for t in targets):
                    continue
                key, lins = targets[0], [proj(layer, t) for t in targets]
                wmax = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in lins]).amax(0)
                s = amax[key].clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
                s = s.clamp(min=1e-5)
                src = proj(layer, source) if source == "up_proj" else getattr(layer, source)
                # the producer's output channel j (a norm weight entry, or up_proj's row j) shrinks by s_j ...
                w = src.weight
                w.div_(s.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
                if getattr(src, "bias", None) is not None:
                    src.bias.div_(s.to(src.bias.dtype))
                # ... and every consumer's input column j grows by s_j
                for lin in lins:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                layer_scales[key] = s
            scales.append(layer_scales)
    return scales
