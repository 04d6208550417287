"""Pruned checkpoints under `models/<name>/`: safetensors weights, tokenizer, config and the plan file.

Uniform shapes are written as a stock config, so `AutoModelForCausalLM.from_pretrained` loads them with
no project code. A head-pruned Llama whose head count no longer divides `hidden_size` is refused by
`LlamaConfig`'s validation even with `head_dim` set; it is written as Mistral, whose layers compute exactly
the same function when Llama has no biases (Mistral has neither attention nor MLP biases, and
`sliding_window=None` makes its attention full). Non-uniform shapes are recorded in the config's
`per_layer_config` mapping (transformers 5's standard field); transformers cannot yet build layers from
it, so `load_pruned` rebuilds the shapes itself.

The plan file also says how the weights are stored, and `load_pruned` dispatches on it:
- `"weights": "fp32"` (default): `model.safetensors`; stock-loadable when the shapes are uniform and no projection
  is replaced (width- and depth-pruned models);
- `"modules"`: projections replaced by a factorised form (`linears.LowRankLinear`, `linears.SparseLowRankLinear`),
  `{"<layer>.<projection>": {"kind": ..., "rank": r}}`; the loader builds them empty, then loads the safetensors
  (not stock-loadable: a stock loader would find no `q_proj.weight`);
- `"weights": "int8"`: the torchao INT8 format of `quantize` (`model_int8.safetensors` + `int8_checkpoint.json`).

Faults: `save_pruned` refuses a model holding NaN or inf weights and writes through `atomic.atomic_folder`, which adds
`manifest.json` (every file's size and sha256) last. Loaders first put back a copy an interrupted save left
(`atomic.recover_folder`), then check the manifest, config.json's layer count against the plan file and the weights,
and refuse missing or unexpected weights, each with a `CheckpointError` naming the file. Checkpoints written before
manifests load unchecked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from pruning_utils.atomic import atomic_folder, folder_problem, recover_folder, write_manifest, write_text_atomic
from pruning_utils.model.arch import arch_of, decoder_layers, head_dim, layer_shape, layer_shapes, stock_config
from pruning_utils.model.devices import resolve_device, resolve_dtype
from pruning_utils.model.linears import (
    MODULE_KINDS_BY_CLASS,
    check_int8_device,
    empty_module,
    int8_state_dict,
    is_int8_tensor,
    load_int8_state_dict,
    quantize_linears,
)
from pruning_utils.model.plan import PruningPlan
from pruning_utils.model.tiny import TinyTokenizer
from pruning_utils.paths import models_dir

PLAN_FILE = "pruning_plan.json"
INT8_FILE = "int8_checkpoint.json"
INT8_WEIGHTS_FILE = "model_int8.safetensors"  # plain int8 data + scales (`quantize`'s docstring says why)
INT8_FORMAT = "semantic-llm-pruning-int8/2"  # /1 was torch.ao's pickled packed params, no longer read
FORMAT = "semantic-llm-pruning/1"


class CheckpointError(ValueError):
    """Raised for a checkpoint folder that is missing, half-written or written by something else."""


class NonFiniteWeightsError(ValueError):
    """Raised instead of saving a model whose weights hold NaN or inf (the checkpoint already there stays as it was)."""


def resolve_checkpoint_dir(dest: str | os.PathLike) -> Path:
    """Return the folder a bare name stands for (under models/), or the path itself."""
    p = Path(dest)
    return models_dir() / p if len(p.parts) == 1 and not p.is_absolute() else p


def nonfinite_weights(model) -> list[str]:
    """Return the names of the model's floating-point weights that hold a NaN or an inf."""
    import torch

    from pruning_utils.model.linears import int8_parts

    # an INT8 weight is checked through its parts (its scales): torchao defines no isfinite on the wrapper
    flat = [(f"{name}:{p}", getattr(t, p)) for name, t in model.state_dict().items() if is_int8_tensor(t)
            for p in int8_parts(t)]
    flat += [(name, t) for name, t in model.state_dict().items() if not is_int8_tensor(t)]
    return [name for name, t in flat
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_nonfinite(model, final: Path) -> None:
    """Raise NonFiniteWeightsError naming the first weight holding NaN or inf, before anything is written to `final`."""
    bad = nonfinite_weights(model)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        kept = "the checkpoint already there is unchanged" if final.exists() else "nothing was written"
        raise NonFiniteWeightsError(
            f"refusing to save {final}: weight {bad[0]}{more} holds NaN or inf values; {kept}. Re-run the step that "
            "produced the model (a diverged recovery, an overflowing half-precision dtype: try float32)")


def verify_checkpoint(folder) -> Path:
    """Return the checkpoint folder once a copy an interrupted save left is put back (`atomic.recover_folder`) and its
    manifest verifies; raises CheckpointError naming the file that is missing, truncated or changed."""
    folder = resolve_checkpoint_dir(folder)
    recover_folder(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}: run the stage that writes it first (see run_all.sh)")
    problem = folder_problem(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}; delete the folder and re-run the stage "
                              "that wrote it (see run_all.sh)")
    return folder


def read_json(path: Path) -> dict:
    """Return a checkpoint's JSON file, or raise CheckpointError naming it and the JSON problem."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing; re-run the stage that wrote {path.parent}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); delete {path.parent} and re-run its stage") from err


def check_layer_count(folder: Path, cfg: dict, recorded: list) -> None:
    """Raise CheckpointError when config.json's layer count differs from the per-layer shapes the plan file records."""
    if cfg.get("num_hidden_layers") != len(recorded):
        raise CheckpointError(
            f"{folder / 'config.json'} says num_hidden_layers={cfg.get('num_hidden_layers')} but {PLAN_FILE} records "
            f"{len(recorded)} layers: config.json was edited or comes from another checkpoint; restore it or re-run "
            "the stage that wrote the checkpoint")


def read_weights(folder: Path, names_only: bool = False) -> dict:
    """Return `{name: tensor}` from every safetensors file of a folder (`names_only`: `{name: None}`, headers only);
    raises CheckpointError naming a file that is cut short or not safetensors."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as reader:
                out.update({k: None if names_only else reader.get_tensor(k) for k in reader.keys()})
        except SafetensorError as err:
            raise CheckpointError(f"{f} is not a whole safetensors file ({err}): it was cut short or overwritten; "
                                  f"delete {folder} and re-run the stage that wrote it") from err
    return out


def check_weights_match(folder: Path, model, layers, names, missing, unexpected) -> None:
    """Raise CheckpointError when the weights stored (`names`) and the structure built from config.json and the plan
    file differ: missing or unexpected names, with both layer counts when those differ."""
    if not (missing or unexpected):
        return
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."  # found by identity: no path spelled
    stored = len({n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)})
    what = (f"config.json builds {len(layers)} layers but the weights hold {stored}" if stored != len(layers)
            else "the weights do not match the recorded shapes")
    raise CheckpointError(f"{folder}: {what} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                          "restore the files or re-run the stage that wrote the checkpoint")


def _stock_config(model, plan: PruningPlan) -> tuple[dict, bool]:
    """Return the config dict to write and whether stock `from_pretrained` can load it (rules: `arch.stock_config`)."""
    return stock_config(model.config.to_dict(), layer_shapes(model), head_dim(model), plan.base_heads,
                        plan.base_intermediate)


def _write_weights(model, folder: Path) -> None:
    """Write the state dict as one safetensors file, tied embeddings once (as transformers expects)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def replaced_modules(model) -> dict[str, dict]:
    """Return `{"<layer>.<projection>": {"kind", "rank"}}` for every projection stored in a factorised form."""
    from pruning_utils.model.arch import PROJECTIONS, proj

    out = {}
    for li, layer in enumerate(decoder_layers(model)):
        for name in PROJECTIONS:
            m = proj(layer, name)
            kind = MODULE_KINDS_BY_CLASS.get(type(m).__name__)
            if kind is not None:
                out[f"{li}.{name}"] = {"kind": kind, "rank": int(m.rank)}
    return out


def save_pruned(model, tokenizer, dest, plan: PruningPlan | None = None, extra: dict | None = None) -> Path:
    """Write model, tokenizer, config and plan to `dest` atomically (temp folder, then rename); returns the folder.

    A model holding NaN or inf weights is refused (NonFiniteWeightsError) before anything is written.
    An INT8 model (`quantize.quantize_int8`) is written in the INT8 format, a model with factorised
    projections with its `modules` record (see the module docstring).
    """
    arch_of(model)
    final = resolve_checkpoint_dir(dest)
    refuse_nonfinite(model, final)
    plan = plan or getattr(model, "pruning_plan", None) or PruningPlan.identity(
        layer_shapes(model), getattr(model.config, "name_or_path", ""))
    with atomic_folder(final) as tmp:
        # not model.save_pretrained: it re-validates the config, which LlamaConfig fails for non-dividing head counts
        int8 = bool(getattr(model, "int8", False))
        modules = replaced_modules(model)
        if int8:
            write_int8(model, tmp, plan)
        else:
            _write_weights(model, tmp)
        cfg, stock = _stock_config(model, plan)
        stock = stock and not int8 and not modules
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        shapes = layer_shapes(model)
        meta = {
            "format": FORMAT,
            "source_model": plan.source_model or getattr(model.config, "name_or_path", ""),
            "stock_loadable": stock,
            "query_heads": [s.n_heads for s in shapes],
            "kv_heads": [s.n_kv_heads for s in shapes],
            "intermediate": [s.intermediate for s in shapes],
            "weights": "int8" if int8 else "fp32",
            "modules": modules,
            "plan": plan.to_dict(),
            "extra": extra or {},
        }
        (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return final


def is_pruned_checkpoint(folder) -> bool:
    """Return True when the folder holds a plan file written by this project."""
    return (Path(folder) / PLAN_FILE).is_file()


def read_checkpoint_meta(folder) -> dict:
    """Return the plan file's contents once the folder verifies (`verify_checkpoint`), or raise CheckpointError saying
    what is wrong and what to do."""
    folder = verify_checkpoint(folder)
    path = folder / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {PLAN_FILE}: it was not written by semantic-llm-pruning; "
            "load it with load_model(path) as a plain model, or re-run the pruning stage"
        )
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                              "re-run the stage that wrote it")
    return meta


def record_extra(folder, extra: dict) -> dict:
    """Replace the `extra` record of a saved checkpoint's plan file (e.g. a row measured on the saved model) and
    re-record the manifest, so the folder still verifies; returns the plan file's new contents."""
    meta = read_checkpoint_meta(folder)
    meta["extra"] = extra
    folder = resolve_checkpoint_dir(folder)
    write_text_atomic(folder / PLAN_FILE, json.dumps(meta, indent=1, default=str))
    write_manifest(folder)  # a crash between the two leaves a folder that names the changed file, not a silent one
    return meta


def read_plan(folder) -> PruningPlan:
    """Return the cumulative plan (relative to the source model) stored with a checkpoint."""
    return PruningPlan.from_dict(read_checkpoint_meta(folder)["plan"])


def build_structure(cfg: dict, meta: dict, dtype, empty: bool = True):
    """Return a model of the recorded per-layer shapes and replaced modules. `empty`: its parameters on the meta device
    (load them next with `load_state_dict(..., assign=True)`), so the unpruned model is never allocated and loading an
    8B checkpoint pruned to 12 GiB costs 12 GiB of host memory, not 15 + 12; buffers (rotary frequencies) are real.
    Otherwise allocated and random (the INT8 loader quantizes the structure before its weights are read)."""
    from accelerate import init_empty_weights

    if not empty:
        return _build_structure(cfg, meta, dtype)
    with init_empty_weights(include_buffers=False):
        return _build_structure(cfg, meta, dtype)


def template_config(cfg: dict):
    """Return the transformers config of a config.json dict without its `per_layer_config`: the template every layer
    fits in (transformers 5.25 refuses to read a config whose `per_layer_config` varies the head count)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "per_layer_config")}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _build_structure(cfg: dict, meta: dict, dtype):
    from transformers import AutoModelForCausalLM

    from pruning_utils.model.arch import proj, set_proj
    from pruning_utils.model.surgery import (  # lazily: surgery is only needed for per-layer shapes
        prune_heads,
        prune_neurons,
    )

    model = AutoModelForCausalLM.from_config(template_config(cfg), dtype=dtype)
    # reuse surgery to shape each layer (which rows are kept does not matter: the weights are overwritten)
    hd = head_dim(model)
    for li, layer in enumerate(decoder_layers(model)):
        want_h, want_m = meta["query_heads"][li], meta["intermediate"][li]
        shape = layer_shape(layer, hd)
        n_heads, n_kv = shape.n_heads, shape.n_kv_heads
        per_group, group = want_h // n_kv, n_heads // n_kv
        if want_h != n_heads:
            prune_heads(model, {li: [g * group + j for g in range(n_kv) for j in range(per_group)]})
        if want_m != shape.intermediate:
            prune_neurons(model, {li: list(range(want_m))})
    layers = decoder_layers(model)
    for key, rec in (meta.get("modules") or {}).items():
        li, name = key.split(".", 1)
        layer = layers[int(li)]
        set_proj(layer, name, empty_module(rec["kind"], int(rec["rank"]), proj(layer, name)))
    return model


def load_pruned(folder, device: str | None = None, dtype=None):
    """Return `(model, tokenizer)` from a pruned checkpoint, rebuilding per-layer shapes and replaced modules.

    INT8 checkpoints (`"weights": "int8"`) load on CPU or CUDA (fp32 activations); another device, or no torchao,
    raises `linears.NotApplicableError`.
    Raises CheckpointError for a damaged folder (see the module docstring).
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_checkpoint_dir(folder)
    meta = read_checkpoint_meta(folder)
    dev = resolve_device(device)
    if meta.get("weights", "fp32") == "int8":
        check_int8_device(dev)
        model, tok = _load_int8(folder)
        return model.to(dev), tok
    dt = resolve_dtype(dtype, dev)
    cfg = read_json(folder / "config.json")
    check_layer_count(folder, cfg, meta["query_heads"])
    if cfg.get("per_layer_config") is None and not meta.get("modules"):
        names = read_weights(folder, names_only=True)  # a cut-short file is named here, not deep in transformers
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, output_loading_info=True)
        missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    else:
        model = build_structure(cfg, meta, dt)
        names = read_weights(folder)
        missing, unexpected = model.load_state_dict(names, strict=False, assign=True)  # the read tensors, no copy
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if model.config.tie_word_embeddings:
            model.tie_weights()
    check_weights_match(folder, model, decoder_layers(model), names, missing, unexpected)
    model.pruning_plan = PruningPlan.from_dict(meta["plan"])
    model = model.to(device=dev, dtype=dt).eval()
    return model, load_tokenizer(folder)


def load_tokenizer(folder: Path):
    """Return the tokenizer saved in a checkpoint folder (tiny or transformers), or None when none was saved.

    A checkpoint may be saved without a tokenizer (`save_pruned(model, None, ...)`); one whose tokenizer files the
    manifest lists but are gone is refused earlier, by `verify_checkpoint`, naming the file.
    """
    from transformers import AutoTokenizer

    if (folder / "tiny_tokenizer.json").exists():
        return TinyTokenizer(**json.loads((folder / "tiny_tokenizer.json").read_text()))
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None  # saved without a tokenizer
    cfg = read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    # a non-uniform checkpoint's config.json is refused by AutoConfig, which AutoTokenizer reads for the model type
    kw = {"config": template_config(cfg)} if cfg.get("per_layer_config") is not None else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------- INT8 format


def write_int8(model, folder: Path, plan: PruningPlan) -> None:
    """Write an INT8 model's weights (plain int8 data + scales, safetensors) and its meta file into `folder`."""
    import torch

    shapes = layer_shapes(model)  # an INT8 nn.Linear keeps in_features / out_features
    _, stock = stock_config(model.config.to_dict(), shapes, head_dim(model), plan.base_heads, plan.base_intermediate)
    save_file(int8_state_dict(model), folder / INT8_WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"format": INT8_FORMAT,
            "quantization": "torchao int8: per-row symmetric int8 weights of every nn.Linear",
            "mode": getattr(model, "int8_mode", "weight_only"),
            "embedding": bool(getattr(model, "int8_embedding", False)),
            "keep_fp32": list(getattr(model, "int8_keep_fp32", ())),
            "smoothing_alpha": getattr(model, "int8_smoothing", None),
            "dtype": str(next(t for t in model.parameters() if not is_int8_tensor(t)).dtype).replace("torch.", ""),
            "torch": torch.__version__, "fp32_stock_loadable": stock, "query_heads": [s.n_heads for s in shapes],
            "intermediate": [s.intermediate for s in shapes], "plan": plan.to_dict()}
    (folder / INT8_FILE).write_text(json.dumps(meta, indent=1, default=str))


def save_quantized(model, tokenizer, folder, plan: PruningPlan | None = None, extra: dict | None = None) -> Path:
    """Write an INT8 model (from `quantize_int8`) atomically as config + quantized state dict + meta files + tokenizer.

    The folder is an ordinary project checkpoint (`checkpoint.save_pruned`, plan file `"weights": "int8"`), so
    `checkpoint.load_pruned` and `loading.load_model` reload it; returns the folder.
    """
    if not getattr(model, "int8", False):
        raise ValueError("save_quantized expects a model returned by quantize_int8; quantize it first "
                         "(a plain model is saved with checkpoint.save_pruned)")
    return save_pruned(model, tokenizer, folder, plan=plan, extra=extra)


def load_quantized(folder):
    """Return `(model, tokenizer)` from a folder written by `save_quantized` (on CPU)."""
    return _load_int8(verify_checkpoint(folder))


def _load_int8(folder: Path):
    """Return `(model, tokenizer)` from an INT8 checkpoint folder that `verify_checkpoint` has passed (on CPU)."""
    import torch

    path = folder / INT8_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {INT8_FILE}: it is not an INT8 checkpoint of this project; "
                              "write one with checkpoint.save_quantized, or load a pruned checkpoint with load_pruned")
    meta = read_json(path)
    if meta.get("format") != INT8_FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {INT8_FORMAT!r}: written by an "
                              "older version of this project; re-run the INT8 stage (notebook 03b) to re-save it")
    cfg = read_json(folder / "config.json")
    check_layer_count(folder, cfg, meta["query_heads"])
    structure = build_structure(cfg, meta, getattr(torch, meta.get("dtype", "float32")), empty=False)
    if getattr(structure.config, "tie_word_embeddings", False):
        structure.tie_weights()
    keep_fp32, mode, embedding = tuple(meta.get("keep_fp32", ())), meta["mode"], bool(meta.get("embedding"))
    model = quantize_linears(structure.eval(), mode, keep_fp32, embedding=embedding)
    state = read_weights(folder)
    missing, unexpected = load_int8_state_dict(model, state)
    check_weights_match(folder, model, decoder_layers(model), state, missing, unexpected)
    model.pruning_plan, model.int8, model.int8_mode = PruningPlan.from_dict(meta["plan"]), True, mode
    # smoothed norm / up_proj weights are ordinary fp32 entries of the state dict, so they came back with it
    model.int8_smoothing, model.int8_keep_fp32, model.int8_embedding = meta.get("smoothing_alpha"), keep_fp32, embedding
    return model, load_tokenizer(folder)
