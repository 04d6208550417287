"""GGUF export: a pruned Llama / Mistral / Qwen2 checkpoint as one `.gguf` file for llama.cpp and other GGUF readers.

    python3 -m pruning_utils.compress.gguf_export MODEL_DIR OUT.gguf --type f16   # or q8_0, f32

Written with the `gguf` package: `GGUFWriter`, its tensor-name map (`gguf.get_tensor_name_map`) and its Q8_0
quantizer (`gguf.quants.quantize`). What a GGUF reader expects, and so what is written:
- Architecture: `llama` for Llama and Mistral (llama.cpp runs Hugging Face Mistral checkpoints as `llama`, which is
  also what a head-pruned Llama saved as its Mistral twin is), `qwen2` for Qwen2. Other families are refused.
- One shape for every layer. GGUF's llama / qwen2 architectures take one head count and one width for all layers:
  llama.cpp builds every layer from `{arch}.attention.head_count` and `{arch}.feed_forward_length`. A non-uniform plan
  (per-layer different head counts or MLP widths) is refused with the layers that differ named.
- Head size: after head pruning it no longer equals `embedding_length / head_count`, so it is written explicitly as
  `{arch}.attention.key_length`, `value_length` and `rope.dimension_count`.
- Rotary layout: Hugging Face rotates the pairs (x_i, x_{i+d/2}) of a head; llama.cpp's `llama` architecture rotates
  adjacent pairs (x_2i, x_2i+1), so the rows of q_proj and k_proj (and their biases) are reordered within each head
  (`rotary_rows`). `qwen2` rotates (x_i, x_{i+d/2}) like Hugging Face: its weights are written as they are.
- Biases: Qwen2's q/k/v biases; a Llama's attention / MLP biases are written too (llama.cpp reads them when present).
- Tied embeddings: no `output.weight` (readers fall back to `token_embd.weight`).
- Types: `f32` everything; `f16` 2-D weights in float16, norms and biases in float32; `q8_0` 2-D weights in Q8_0
  (blocks of 32 along a row), a weight whose rows are not a multiple of 32 long (e.g. after neuron pruning) in f16.
- Tokenizer: read from the checkpoint's `tokenizer.json`. A byte-level BPE (SmolLM2, Qwen2, Llama 3) is written as
  the `gpt2` tokenizer model with its tokens, token types, merges, special token ids and chat template
  (`gguf.SpecialVocab`); the pre-tokenizer name llama.cpp splits text by is recognised from tokenizer.json's
  pre-tokenizer (`bpe_pre_tokenizer`). A checkpoint without tokenizer.json (the tiny test models) gets no vocabulary
  (`tokenizer.ggml.model = no_vocab`); another tokenizer kind (SentencePiece with byte fallback) is refused.
Refused as well: INT8 (torchao) and factorised (low-rank) checkpoints (export the fp32 pruned one), and rope scaling
other than the default (Llama 3.1+ `llama3` scaling).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf.quants import quantize

from pruning_utils.atomic import atomic_file
from pruning_utils.model.arch import LayerShape, arch_of, decoder_layers, head_dim, is_uniform, layer_shapes, lm_head

OUT_TYPES = ("f16", "q8_0", "f32")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# model_type -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's adjacent-pair rotary)
GGUF_ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}
# the `Split` regex of a byte-level BPE tokenizer.json -> llama.cpp's pre-tokenizer name
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


class GGUFExportError(ValueError):
    """Raised for a model or tokenizer that the GGUF export cannot write faithfully."""


def gguf_architecture(config) -> tuple[gguf.MODEL_ARCH, bool]:
    """Return the GGUF architecture of a model config and whether its q/k rows are reordered, or raise."""
    model_type = arch_of(config).model_type
    if model_type not in GGUF_ARCHITECTURES:
        raise GGUFExportError(f"GGUF export of '{model_type}' models is not implemented; supported: "
                              f"{', '.join(GGUF_ARCHITECTURES)} (llama.cpp architectures llama, qwen2)")
    return GGUF_ARCHITECTURES[model_type]


def check_uniform(shapes: list[LayerShape]) -> None:
    """Raise GGUFExportError naming the layers of each shape when the layers differ in head count or MLP width."""
    if is_uniform(shapes):
        return
    groups: dict[LayerShape, list[str]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(str(i))
    described = "; ".join(f"layer{'s' * (len(ls) > 1)} {', '.join(ls)}: {s.n_heads} query heads, {s.n_kv_heads} KV "
                          f"heads, MLP width {s.intermediate}" for s, ls in groups.items())
    raise GGUFExportError(
        f"the layers differ ({described}): GGUF's llama / qwen2 architectures take one head count and one MLP width "
        "for all layers. Export a uniform plan (ALLOCATION=uniform); a non-uniform checkpoint loads with "
        "pruning_utils.model.checkpoint.load_pruned")


def rope_theta(cfg: dict) -> float:
    """Return the rotary base of a config dict, refusing rope scaling, which the export does not write."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise GGUFExportError(f"rope scaling '{kind}' is not exported (only the default rotary embedding is); "
                              "export a model without rope scaling")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def rotary_rows(w: np.ndarray, hd: int) -> np.ndarray:
    """Return q/k rows (weight or bias) reordered within each head from Hugging Face's rotary pairs (i, i + hd/2) to
    llama.cpp's `llama` pairs (2i, 2i + 1)."""
    return w.reshape(-1, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(shape: tuple[int, ...], out_type: str) -> gguf.GGMLQuantizationType:
    """Return the GGML type a tensor of this shape is written in for `out_type` (norms and biases stay f32; Q8_0
    needs rows a multiple of its block, 32, long, else f16)."""
    t = gguf.GGMLQuantizationType
    if out_type == "f32" or len(shape) == 1:
        return t.F32
    if out_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[t.Q8_0][0] == 0:
        return t.Q8_0
    return t.F16


def bpe_pre_tokenizer(pre: dict | None) -> str | None:
    """Return llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json `pre_tokenizer`, or None if unknown."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # one digit at a time, then GPT-2's rules
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def vocab_tokens(tok: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Return the `n_vocab` token strings and GGUF token types of a tokenizer.json; ids the tokenizer lacks become
    unused `[PAD<id>]` entries, so the list has one token per embedding row."""
    tokens: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, int(gguf.TokenType.NORMAL))
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens, default=-1) >= n_vocab:
        raise GGUFExportError(f"the tokenizer has token id {max(tokens)} but the model only {n_vocab} embedding rows; "
                              "export the model with the tokenizer it was trained with")
    return ([tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)],
            [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n_vocab)])


def adds_special(tok: dict) -> dict[str, bool]:
    """Return whether a tokenizer.json puts a special token before (`bos`) and after (`eos`) a single text."""
    post = tok.get("post_processor") or {}
    templates = [p for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
    single = templates[0].get("single", []) if templates else []
    return {"bos": bool(single) and "SpecialToken" in single[0], "eos": bool(single) and "SpecialToken" in single[-1]}


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path | None, n_vocab: int) -> str:
    """Write the tokenizer of `folder` (its tokenizer.json) into the GGUF metadata; returns the tokenizer model
    written: `gpt2` (byte-level BPE), or `no_vocab` when the folder has no tokenizer.json."""
    path = folder / "tokenizer.json" if folder is not None else None
    if path is None or not path.is_file():
        writer.add_tokenizer_model("no_vocab")
        return "no_vocab"
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tok.get("model") or {}, tok.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"{path}: only byte-level BPE tokenizers are exported (SmolLM2, Qwen2, Llama 3); this one is a "
            f"{model.get('type')} model with a {decoder.get('type')} decoder. To export the weights with no "
            "vocabulary, save the checkpoint without a tokenizer (save_pruned(model, None, ...))")
    pre = bpe_pre_tokenizer(tok.get("pre_tokenizer"))
    if pre is None:
        warnings.warn(f"{path}: pre-tokenizer {json.dumps(tok.get('pre_tokenizer'))[:200]} is not one llama.cpp "
                      "names; writing 'default', so llama.cpp may split text differently from Hugging Face")
    tokens, types = vocab_tokens(tok, n_vocab)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)  # merges, special ids, chat template
    for key, value in adds_special(tok).items():
        special.add_special_token.setdefault(key, value)
    special.add_to_gguf(writer, quiet=True)
    return "gpt2"


def write_metadata(writer: gguf.GGUFWriter, model, out_type: str) -> None:
    """Write the hyperparameters llama.cpp reads for the llama / qwen2 architectures (shapes from the weights)."""
    cfg = model.config.to_dict()
    shape, hd = layer_shapes(model)[0], head_dim(model)
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if sliding and sliding < cfg["max_position_embeddings"]:
        warnings.warn(f"sliding_window={sliding} is not exported (GGUF's {writer.arch} architecture attends to the "
                      "whole context): outputs differ from Hugging Face's beyond that many tokens")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(getattr(model.config, "name_or_path", "") or "model")).name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(len(decoder_layers(model)))
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_key_length(hd)  # written, not derived: hidden / heads is no head size after head pruning
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type(FILE_TYPES[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tensors(writer: gguf.GGUFWriter, model, arch: gguf.MODEL_ARCH, permute_qk: bool, out_type: str) -> list[str]:
    """Add every weight under its GGUF name (q/k rows reordered when `permute_qk`, the LM head left out when tied);
    returns the names of the 2-D weights a q8_0 export writes in f16 because Q8_0 does not fit their rows."""
    names = gguf.get_tensor_name_map(arch, len(decoder_layers(model)))
    rotary = (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K)
    tied = lm_head(model).weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    hd, in_f16 = head_dim(model), []
    for name, t in model.state_dict().items():
        found = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GGUFExportError(f"weight '{name}' has no GGUF name in the {writer.arch} architecture: a "
                                  "factorised (low-rank / sparse) projection cannot be exported; export the fp32 "
                                  "pruned checkpoint")
        kind, gguf_name = found
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            continue
        w = t.detach().float().cpu().numpy()
        if permute_qk and kind in rotary:
            w = rotary_rows(w, hd)
        qtype = tensor_type(w.shape, out_type)
        if out_type == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
            in_f16.append(gguf_name)
        data = quantize(w, qtype)  # f32 / f16: a numpy cast; Q8_0: packed blocks as uint8
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    return in_f16


@contextmanager
def tokenizer_folder(folder: Path | None, tokenizer) -> Iterator[Path | None]:
    """Yield the folder whose tokenizer.json is exported: the checkpoint's own, else `tokenizer` saved to a
    temporary folder (None without either)."""
    if tokenizer is None or (folder is not None and (folder / "tokenizer.json").is_file()):
        yield folder
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        yield Path(tmp)


def load_for_export(model_or_folder, tokenizer=None):
    """Return `(model, tokenizer, folder)`: a checkpoint folder or model spec is loaded on CPU in fp32 (`folder` is
    None unless a folder was given)."""
    if not isinstance(model_or_folder, (str, os.PathLike)):
        return model_or_folder, tokenizer, None
    from pruning_utils.model.checkpoint import resolve_checkpoint_dir
    from pruning_utils.model.loading import load_model

    model, loaded = load_model(str(model_or_folder), device="cpu", dtype="float32")
    folder = resolve_checkpoint_dir(model_or_folder)
    return model, loaded if tokenizer is None else tokenizer, folder if folder.is_dir() else None


def export_gguf(model_or_folder, out_path, out_type: str = "f16", tokenizer=None) -> Path:
    """Write a model (in memory with its `tokenizer`, or a checkpoint folder / model spec that `load_model` reads) as
    a GGUF file of `out_type` (f16, q8_0 or f32); returns the file's path. Raises GGUFExportError for what GGUF's
    llama / qwen2 architectures cannot hold (see the module docstring)."""
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type '{out_type}'; known: {', '.join(OUT_TYPES)}")
    model, tokenizer, folder = load_for_export(model_or_folder, tokenizer)
    if getattr(model, "int8", False):
        raise GGUFExportError("an INT8 (torchao) model cannot be exported: export the fp32 pruned checkpoint, with "
                              "--type q8_0 for 8-bit weights")
    arch, permute_qk = gguf_architecture(model.config)
    check_uniform(layer_shapes(model))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, tokenizer_folder(folder, tokenizer) as tok_dir:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            write_metadata(writer, model, out_type)
            write_tokenizer(writer, tok_dir, model.get_input_embeddings().weight.shape[0])
            in_f16 = write_tensors(writer, model, arch, permute_qk, out_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    if in_f16:
        warnings.warn(f"{len(in_f16)} weights written in f16, their rows not a multiple of 32 long (Q8_0's block): "
                      f"{', '.join(in_f16[:4])}{' ...' if len(in_f16) > 4 else ''}")
    return out


def parse_exports(spec: str) -> list[tuple[str, str]]:
    """Return the (variant, GGUF type) pairs of `spec`, e.g. 'mix_pruned_lora:q8_0,baseline' -> [('mix_pruned_lora',
    'q8_0'), ('baseline', 'f16')] (f16 where no type is named); an unknown type raises GGUFExportError."""
    pairs = []
    for item in (part.strip() for part in str(spec or "").split(",")):
        if not item:
            continue
        name, _, out_type = item.partition(":")
        out_type = out_type.strip() or "f16"
        if out_type not in OUT_TYPES:
            raise GGUFExportError(f"unknown GGUF type '{out_type}' in '{item}'; known: {', '.join(OUT_TYPES)} "
                                  "(write name or name:type, comma-separated)")
        pairs.append((name.strip(), out_type))
    return pairs


def export_variants(spec: str, baseline, out_dir=None) -> list[dict]:
    """Export the variants of `spec` (`parse_exports`) as <variant>-<type>.gguf in `out_dir` (default: models/gguf)
    and return a row per variant: its file and size, or in `refused` why GGUF cannot hold it (a non-uniform plan, an
    INT8 model, a family GGUF's llama / qwen2 architectures do not cover). `baseline` (a model spec or folder) is
    what 'baseline' names; any other name is a checkpoint under models/ (a missing one raises)."""
    from pruning_utils.paths import models_dir

    rows, folder = [], Path(out_dir) if out_dir is not None else models_dir() / "gguf"
    for name, out_type in parse_exports(spec):
        path = folder / f"{name}-{out_type}.gguf"
        try:
            export_gguf(baseline if name == "baseline" else name, path, out_type)
        except GGUFExportError as err:
            rows.append(dict(variant=name, type=out_type, file="", size_mib=float("nan"), refused=str(err)))
            continue
        rows.append(dict(variant=name, type=out_type, file=str(path), size_mib=round(path.stat().st_size / 2**20, 1),
                         refused=""))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Export a checkpoint folder or model spec to GGUF from the command line; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python3 -m pruning_utils.compress.gguf_export",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint folder (models/<name> or a path) or model spec, e.g. smollm2-135m")
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--type", default="f16", choices=OUT_TYPES, help="weight type (default: f16)")
    args = ap.parse_args(argv)
    try:
        out = export_gguf(args.model, args.out, args.type)
    except GGUFExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
