"""INT8 through torchao (CPU and CUDA): weight-only or dynamic-activation INT8 of every `nn.Linear`, optionally the
embedding table, with SmoothQuant-style smoothing and projections left in fp32 as options.

`linears.quantize_linears` swaps each chosen weight for a torchao `Int8Tensor` (int8 rows, one fp32 scale per row);
the module stays an `nn.Linear`. Modes (`linears.INT8_MODES`):
- `weight_only`: activations stay fp32 and weights are dequantized in the matmul; quality is that of per-row weight
  rounding, and decode (memory-bound) reads a quarter of the bytes;
- `dynamic`: activations are also quantized (one scale per token row, per call) for int8 x int8 matmuls; it is
  sensitive to activation outliers (SmolLM2's down_proj inputs), which `smooth_windows` moves into the weights
  (`smooth_for_int8`) and `keep_fp32` sidesteps.

INT8 checkpoint folder (written and read by `checkpoint`: `save_pruned` / `load_pruned` dispatch on the model and
the plan file; `checkpoint.save_quantized` / `load_quantized` are the INT8-only entry points):
- `config.json`: the fp32 structure, written by the same rules as a pruned checkpoint (`arch.stock_config`);
- `pruning_plan.json`: the project's plan file with `"weights": "int8"` and the variant's measured row;
- `model_int8.safetensors`: plain tensors only (`linears.int8_state_dict`): each INT8 weight as `<name>:qdata`
  (int8) and `<name>:scale` (fp32), everything else as in an fp32 checkpoint, a tied table once;
- `int8_checkpoint.json`: format tag, mode, kept-fp32 projections, smoothing, the cumulative plan, per-layer shapes;
- the tokenizer files.
Why plain tensors rather than `torch.save` of the torchao state dict: safetensors stores no pickled classes, so the
file loads without trusting code, does not depend on torchao's class layout between versions, and is read the same
way as every other checkpoint (manifest, `read_weights`). Loading builds the fp32 structure from the config,
quantizes it with the recorded mode (which recreates the same tensor subclasses) and copies the stored int8 data and
scales into them (`linears.load_int8_state_dict`): the reloaded model computes exactly what was saved.
"""
from __future__ import annotations

import copy

import torch

from pruning_utils.model.arch import PROJECTIONS
from pruning_utils.model.linears import INT8_MODES, check_int8_device, quantize_linears

INT8_MODE = "weight_only"  # the default: quality first (results/int8_torchao.csv compares the modes)


def _checked(model, mode: str, keep_fp32) -> tuple[tuple[str, ...], torch.device]:
    """Return `keep_fp32` as a tuple and the model's device, after checking the names, the mode and the device."""
    keep_fp32 = tuple(keep_fp32)
    unknown = [k for k in keep_fp32 if k not in PROJECTIONS + ("lm_head",)]
    if unknown:
        raise ValueError(f"keep_fp32: unknown projection(s) {unknown}; known: {', '.join(PROJECTIONS + ('lm_head',))}")
    if mode not in INT8_MODES:
        raise ValueError(f"unknown INT8 mode '{mode}'; known: {', '.join(INT8_MODES)}")
    device = next(model.parameters()).device
    check_int8_device(device)
    return keep_fp32, device


def quantize_int8(model, inplace: bool = False, mode: str = INT8_MODE, smooth_windows: torch.Tensor | None = None,
                  smooth_alpha: float | None = None, keep_fp32: tuple[str, ...] | list[str] = (),
                  embedding: bool = True, progress: bool = True):
    """Return the model with every `nn.Linear` (projections and lm_head) holding torchao INT8 weights (CPU: fp32
    activations; CUDA: the model's dtype).

    `mode`: `weight_only` or `dynamic` (module docstring). `embedding`: also store the input-embedding table as
    INT8 (with tied embeddings the lm_head's table serves both). `smooth_windows` (calibration token windows) first
    moves activation outlier ranges into the weights with `smooth_for_int8` at `smooth_alpha` (default
    `SMOOTH_ALPHA`); `keep_fp32`: projection names (e.g. `down_proj`) left in fp32 everywhere.
    """
    keep_fp32, device = _checked(model, mode, keep_fp32)
    plan = getattr(model, "pruning_plan", None)
    if not inplace:
        model = copy.deepcopy(model)
    # activations stay in the model's dtype on CUDA (fp16 / bf16 there); CPU kernels want fp32
    model = (model.float() if device.type == "cpu" else model).eval()
    if smooth_windows is not None:
        smooth_alpha = SMOOTH_ALPHA if smooth_alpha is None else smooth_alpha
        smooth_for_int8(model, smooth_windows, alpha=smooth_alpha, progress=progress, skip=keep_fp32)
    model = quantize_linears(model, mode, keep_fp32, embedding=embedding)
    if plan is not None:
        model.pruning_plan = plan
    model.int8, model.int8_mode, model.int8_embedding = True, mode, embedding
    model.int8_smoothing = smooth_alpha if smooth_windows is not None else None
    model.int8_keep_fp32 = keep_fp32
    return model



def quantize_int8_by_layer(model, mode: str = INT8_MODE, keep_fp32: tuple[str, ...] | list[str] = (),
                           prepare=None):
    """Return an INT8 copy of `model` built one decoder layer at a time: the same modules as
    `quantize_int8(model, embedding=False, mode=, keep_fp32=)` with `model`'s own input embedding set in, while
    `model` is left as it is.

    `quantize_int8` copies the whole model (and on CPU up-casts the copy to fp32) before quantizing: twice the
    model, three times in bf16 on a CPU. Here each decoder layer is copied, passed to `prepare(index, layer)` (if
    given, e.g. to reorder its neurons), up-cast on CPU and quantized before the next; the input embedding is
    shared with `model`; on CUDA (activations in the model's dtype) the final norm and the LM head are shared too,
    on CPU they get fp32 copies (its INT8 kernels take fp32 activations). Peak: the model, its INT8 copy and one
    layer. No smoothing (it runs the whole copy on calibration windows: `quantize_int8`).
    """
    from pruning_utils.measure.metrics import trim_heap
    from pruning_utils.model.arch import decoder_layers

    keep_fp32, device = _checked(model, mode, keep_fp32)
    cpu = device.type == "cpu"
    originals = decoder_layers(model)
    layers = torch.nn.ModuleList()
    for i, layer in enumerate(originals):
        fresh = copy.deepcopy(layer)
        if prepare is not None:
            prepare(i, fresh)
        layers.append(quantize_linears((fresh.float() if cpu else fresh).eval(), mode, keep_fp32))
        if cpu:  # each layer's up-cast leaves freed heap behind: ~1 GiB over a 1.5B model's 28 layers if kept
            trim_heap()
    # the structure around the layers: every parameter still the model's own (the memo maps each to itself)
    memo = {id(p): p for p in model.parameters()}
    memo[id(originals)] = layers
    memo[id(model.get_input_embeddings())] = model.get_input_embeddings()  # the module itself shared
    out = copy.deepcopy(model, memo).eval()
    if cpu:  # fp32 copies of what is not the embedding or a layer (the final norm, an untied or tied LM head) unless
        # already fp32: those stay shared (a 0.5B model's tied LM head: 0.5 GiB not copied)
        embedding, inside = model.get_input_embeddings().weight, {id(m) for m in layers.modules()}
        for module in out.modules():
            if id(module) in inside:
                continue
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dtype == torch.float32:
                    continue
                if param is not embedding or module is out.get_output_embeddings():
                    # one copy: .float().clone() of a bf16 matrix held two (a 152k-row LM head: +0.9 GiB at 1.5B)
                    setattr(module, name, torch.nn.Parameter(param.detach().to(torch.float32, copy=True),
                                                             requires_grad=False))
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.float()
    plan = getattr(model, "pruning_plan", None)
    if plan is not None:
        out.pruning_plan = plan
    out.int8, out.int8_mode, out.int8_embedding = True, mode, False
    out.int8_smoothing, out.int8_keep_fp32 = None, keep_fp32
    return out


# SmoothQuant-style smoothing (Xiao et al., 2023): dynamic INT8 quantizes each activation row with one scale, so a
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
