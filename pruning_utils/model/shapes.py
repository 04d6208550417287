"""Real model shapes without the hub: committed `config.json` files of published models, built with seeded random
weights and a byte-level tokenizer of the right vocabulary size (`load_model("shape:qwen2.5-3b")`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pruning_utils.model.arch import arch_of
from pruning_utils.model.tiny import TinyTokenizer

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
SHAPES: dict[str, Path] = {p.stem: p for p in sorted(SHAPES_DIR.glob("*.json"))}
_HEADROOM = 1.2  # init and the first forward need some memory beyond the weights themselves


def shape_json(name: str) -> dict:
    """Return the committed JSON of a shape (HF config fields plus `_source` and `_published_params`)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape '{name}'; known: {', '.join(SHAPES)} (load them as 'shape:<name>')")
    return json.loads(SHAPES[name].read_text())


def shape_config(name: str):
    """Return the transformers config of a shape (the committed JSON without its `_` keys)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in shape_json(name).items() if not k.startswith("_")}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def config_params(config) -> int:
    """Return the parameter count of a causal LM config of a supported family, computed without building it."""
    arch_of(config)  # another family may own parameters this arithmetic does not know
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    if getattr(config, "attention_bias", False):
        attn += heads * hd + 2 * kv * hd + h
    elif config.model_type == "qwen2":
        attn += heads * hd + 2 * kv * hd  # Qwen2 has q/k/v biases by architecture, with no config field for them
    mlp = 3 * h * inter + (2 * inter + h if getattr(config, "mlp_bias", False) else 0)
    layer = attn + mlp + 2 * h  # plus the two RMSNorm weights
    if config.model_type == "qwen3":
        layer += 2 * hd  # QK-norm: one RMSNorm weight of head_dim for queries, one for keys
    head = 0 if config.tie_word_embeddings else vocab * h
    return vocab * h + config.num_hidden_layers * layer + h + head


def shape_params(name: str) -> int:
    """Return the parameter count of a shape from its config arithmetic (no model is built)."""
    return config_params(shape_config(name))


def available_memory(device: torch.device) -> int | None:
    """Return the free bytes of a device (host RAM for CPU), or None when they cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise MemoryError saying what to do when a shape's weights in `dtype` would not fit on `device` (and host)."""
    params = shape_params(name)
    size = torch.empty((), dtype=dtype).element_size()
    need = params * size * _HEADROOM
    # the model is built on the host first, so the host must hold it even when it goes to a GPU
    for where in {torch.device("cpu"), device}:
        free = available_memory(where)
        if free is not None and need > free:
            smaller = [s for s in SHAPES if shape_params(s) < params]
            advice = [f"dtype=torch.bfloat16 ({params * 2 * _HEADROOM / 2**30:.1f} GiB)"] if size > 2 else []
            advice += [f"a smaller shape ({', '.join(smaller)})"] if smaller else []
            raise MemoryError(
                f"shape '{name}' in {dtype} needs about {need / 2**30:.1f} GiB on {where}, but only "
                f"{free / 2**30:.1f} GiB is free: use {' or '.join(advice) or 'a machine with more memory'}")


def _no_init_weights():
    """Return transformers' context that skips weight initialisation while a model is constructed."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def shape_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` of a shape: seeded random weights (HF init, std `initializer_range`, so
    activations stay finite through every layer) in eval mode, and a byte tokenizer of the config's vocabulary."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    config = shape_config(name)
    check_fits(name, dtype, dev)
    torch.manual_seed(seed)
    # torch's default init in each layer's constructor would be overwritten by HF's: skip it, not init twice
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.init_weights()  # HF init: normal(0, initializer_range), zero biases, unit norms; ties the LM head
    model.config.name_or_path = f"shape:{name}"
    return model.to(dev).eval(), TinyTokenizer(config.vocab_size)
