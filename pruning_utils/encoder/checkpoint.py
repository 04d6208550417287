"""Encoder checkpoints: safetensors (fp32, or INT8 data + scales), config, tokenizer and plan file, written atomically.

BERT's attention derives its head size as hidden_size / num_attention_heads, so a config cannot say
"9 heads of 32" for hidden 384. Neuron- and layer-pruned encoders with uniform widths are written as stock configs
(`AutoModelForSequenceClassification.from_pretrained` loads them, no project code); head-pruned ones keep the
source config and record the per-layer shapes in the plan file, and `load_encoder` rebuilds them (the stock
loader refuses them with a size mismatch rather than computing something else).
"""
from __future__ import annotations

import json
from pathlib import Path

from pruning_utils.atomic import atomic_folder
from pruning_utils.encoder.arch import (
    encoder_arch_of,
    encoder_layer_shapes,
    encoder_layers,
    encoder_proj,
    set_encoder_proj,
)
from pruning_utils.encoder.surgery import identity_plan, prune_heads, prune_neurons
from pruning_utils.model.checkpoint import (
    CheckpointError,
    check_layer_count,
    check_weights_match,
    read_json,
    read_weights,
    refuse_nonfinite,
    resolve_checkpoint_dir,
    verify_checkpoint,
)
from pruning_utils.model.linears import (
    MODULE_KINDS_BY_CLASS,
    empty_module,
    int8_state_dict,
    load_int8_state_dict,
    quantize_linears,
)
from pruning_utils.model.plan import PruningPlan

FORMAT = "semantic-llm-pruning-encoder/1"
PLAN_FILE = "pruning_plan.json"
INT8_WEIGHTS_FILE = "model_int8.safetensors"  # plain int8 data + scales, as `checkpoint` writes decoders


def replaced_modules(model) -> dict[str, dict]:
    """Return `{"<layer>.<projection>": {"kind", "rank"}}` for every factorised projection of an encoder."""
    out = {}
    for li, layer in enumerate(encoder_layers(model)):
        for name in ("query", "key", "value", "attn_out", "intermediate", "output"):
            m = encoder_proj(layer, name)
            kind = MODULE_KINDS_BY_CLASS.get(type(m).__name__)
            if kind is not None:
                out[f"{li}.{name}"] = {"kind": kind, "rank": int(m.rank)}
    return out


def save_encoder(model, tokenizer, dest, extra: dict | None = None) -> Path:
    """Write weights (safetensors: fp32, or INT8 data + scales), config, tokenizer and plan file atomically;
    returns the folder."""
    from safetensors.torch import save_file

    encoder_arch_of(model)
    final = resolve_checkpoint_dir(dest)
    refuse_nonfinite(model, final)  # before anything is written: the checkpoint already there stays
    plan = getattr(model, "pruning_plan", None) or identity_plan(model)
    shapes = encoder_layer_shapes(model)
    int8, modules = bool(getattr(model, "int8", False)), replaced_modules(model)
    heads_cut = any(s.n_heads != model.config.num_attention_heads for s in shapes)
    uniform = len({s.intermediate for s in shapes}) == 1
    with atomic_folder(final) as tmp:
        if int8:
            save_file(int8_state_dict(model), tmp / INT8_WEIGHTS_FILE, metadata={"format": "pt"})
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        cfg = model.config.to_dict()
        if not uniform:
            cfg["intermediate_size"] = max(s.intermediate for s in shapes)  # the template every layer is cut from
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": FORMAT, "stock_loadable": uniform and not heads_cut and not int8 and not modules,
                "weights": "int8" if int8 else "fp32", "modules": modules,
                "int8_embeddings": bool(getattr(model, "int8_embeddings", False)),
                "int8_mode": getattr(model, "int8_mode", None),
                "heads": [s.n_heads for s in shapes], "intermediate": [s.intermediate for s in shapes],
                "plan": plan.to_dict(), "extra": extra or {}}
        (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return final


def read_encoder_meta(folder) -> dict:
    """Return an encoder checkpoint's plan file once the folder verifies (`checkpoint.verify_checkpoint`: an interrupted
    save's copy put back, the manifest checked), or raise saying what is wrong and what to do."""
    folder = verify_checkpoint(folder)
    path = folder / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {PLAN_FILE}: not an encoder checkpoint of this project; write it "
                              "with encoder.save_encoder, or load a plain model with "
                              "AutoModelForSequenceClassification")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r} (an encoder checkpoint); "
                              "a decoder checkpoint loads with checkpoint.load_pruned")
    return meta


def load_encoder(folder):
    """Return `(model, tokenizer)` from a folder written by `save_encoder` (INT8 ones on CPU), in eval mode.

    Raises CheckpointError naming the file when the folder is damaged: a file missing, truncated or changed, a
    config.json whose layer count differs from the plan file's or the weights' (see `checkpoint.load_pruned`).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve_checkpoint_dir(folder)
    meta = read_encoder_meta(folder)
    check_layer_count(folder, read_json(folder / "config.json"), meta["heads"])
    if meta["stock_loadable"]:
        state = read_weights(folder, names_only=True)  # a cut-short file is named here, not deep in transformers
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    else:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder))
        # shape each layer by surgery (which rows are kept does not matter: the weights are overwritten)
        prune_heads(model, {li: list(range(h)) for li, h in enumerate(meta["heads"])})
        prune_neurons(model, {li: list(range(w)) for li, w in enumerate(meta["intermediate"])})
        layers = encoder_layers(model)
        for key, rec in (meta.get("modules") or {}).items():
            li, name = key.split(".", 1)
            set_encoder_proj(layers[int(li)], name, empty_module(rec["kind"], int(rec["rank"]),
                                                                  encoder_proj(layers[int(li)], name)))
        state = read_weights(folder)
        if meta["weights"] == "int8":
            if not meta.get("int8_mode"):
                raise CheckpointError(f"{folder} holds a torch.ao INT8 encoder (an older version of this project), "
                                      "which is no longer read; re-run the encoder stage (notebook 07) to re-save it")
            model = quantize_linears(model.eval(), meta["int8_mode"], embedding=bool(meta.get("int8_embeddings")))
            missing, unexpected = load_int8_state_dict(model, state)
            model.int8, model.int8_mode, model.int8_embeddings = True, meta["int8_mode"], meta.get("int8_embeddings")
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
    check_weights_match(folder, model, encoder_layers(model), state, missing, unexpected)
    model.pruning_plan = PruningPlan.from_dict(meta["plan"])
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.eval(), tok
