"""Tiny random-init models of every supported family and a byte-level tokenizer: what the tests run on."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TINY_MODELS = tuple(f"tiny-{f}" for f in TINY_FAMILIES)


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
        raise ValueError(f"unknown tiny family '{family}'; known: llama, mistral, qwen2, qwen3")
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def _finish(model, family: str):
    """Give a fresh tiny model non-zero biases and its name; return it in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # default init is zero, which would hide bias-slicing bugs
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """Return a tiny random model of a family, in eval mode, with non-zero biases so bias handling is tested."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return _finish(model, family)


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


TINY_ENCODERS = ("bert", "roberta")


def tiny_encoder(family: str = "bert", num_labels: int = 2, seed: int = 0, **overrides):
    """Return a tiny random sequence classifier of an encoder family (4 heads of 16, eval mode, non-zero biases)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if family not in TINY_ENCODERS:
        raise ValueError(f"unknown tiny encoder family '{family}'; known: {', '.join(TINY_ENCODERS)}")
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=80, type_vocab_size=2, num_labels=num_labels, pad_token_id=0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "roberta":
        base.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    base.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(family, **base), dtype=torch.float32)
    return _finish(model, family)
