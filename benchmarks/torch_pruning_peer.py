"""Peer row for the quality benchmark (issue 6): prune with Torch-Pruning (VainF, `torch-pruning` on PyPI).

Torch-Pruning traces the model into a dependency graph and prunes coupled channels together, so gate/up
out-channels and down_proj in-channels of a layer shrink as one group. We use its own `BasePruner` with
`GroupTaylorImportance` (|w * dL/dw| from a causal-LM loss) or `GroupMagnitudeImportance` (p=2), in its
per-layer mode (`global_pruning=False`: each layer is its own ranking scope).

Matching our counts: Torch-Pruning keeps `int(width * (1 - ratio))` channels (floor), we keep
`width - round_half_up(width * rate)` (`allocation.plan_neurons`). We pass each layer the ratio
`1 - (kept + 0.5) / width`, whose floor is exactly our `kept` (1536 -> 1152 on SmolLM2 at 0.25). For heads it
removes `ceil(ceil(ratio * H) / n_kv)` query heads per KV group; the ratio `(r * n_kv - 0.5) / H` makes that
our `r = round_half_up(H / n_kv * rate)` (9 -> 6 on SmolLM2 at 0.2). K/V stay intact: with `prune_num_heads`
and GQA Torch-Pruning empties the K/V part of each attention group. Every group is checked before any is
pruned, so an unexpected shape raises `NotImplementedError` with the model untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pruning_utils.model.arch import (
    attention,
    decoder_layers,
    final_norm,
    head_dim,
    is_uniform,
    layer_norms,
    layer_shapes,
    mlp,
    proj,
    set_mlp_width,
    set_query_heads,
)
from pruning_utils.prune.allocation import round_half_up  # round half up: the same counts as our plans

IMPORTANCES = ("taylor", "magnitude")


def _importance(name: str):
    """Return the Torch-Pruning scorer of a criterion name."""
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ValueError(f"unknown importance '{name}'; known: {', '.join(IMPORTANCES)}")


def _accumulate_gradients(model, windows: torch.Tensor) -> None:
    """Fill `.grad` with the gradient of the mean causal-LM loss over the windows, one window at a time (memory)."""
    model.zero_grad(set_to_none=True)
    for window in windows.split(1):
        (model(input_ids=window, labels=window, use_cache=False).loss / len(windows)).backward()


def _check_group(group, attn_of: dict[nn.Module, tuple[int, nn.Module]], r: int, hd: int, group_size: int) -> set[int]:
    """Return the layers whose attention a group prunes; raise NotImplementedError unless that is S2-shaped."""
    touched = set()
    for dep, idxs in group:
        module = dep.target.module
        if module not in attn_of or not idxs:
            continue
        li, layer = attn_of[module]
        touched.add(li)
        if module in (proj(layer, "k_proj"), proj(layer, "v_proj")):
            raise NotImplementedError(f"layer {li}: Torch-Pruning would prune K/V channels; S2 keeps K/V intact")
        heads = sorted({i // hd for i in idxs})
        per_group = [sum(1 for h in heads if h // group_size == g)
                     for g in range(proj(layer, "k_proj").out_features // hd)]
        if len(idxs) != len(heads) * hd or set(per_group) != {r}:
            raise NotImplementedError(
                f"layer {li}: Torch-Pruning removes query channels {len(idxs)} = heads {heads} "
                f"(per KV group {per_group}), not {r} whole head(s) per KV group as S2 needs")
    return touched


def prune_with_torch_pruning(model, windows: torch.Tensor, mlp_rate: float = 0.25, head_rate: float = 0.0,
                             importance: str = "taylor"):
    """Prune a Llama-family decoder in place with Torch-Pruning
    (uniform MLP width, optional query heads); returns it."""
    import torch_pruning as tp

    scorer = _importance(importance)
    layers, shapes, hd = decoder_layers(model), layer_shapes(model), head_dim(model)
    device = next(model.parameters()).device
    windows = windows.to(device)
    # Embeddings, final norm and lm_head carry the hidden size: ignoring them keeps the residual width intact.
    # RMSNorm weights are bare parameters to Torch-Pruning: declare their (hidden) dim and keep them ignored too.
    norms = [m.weight for m in model.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None]
    ignored: list = [model.get_input_embeddings(), final_norm(model), model.get_output_embeddings(), *norms]
    ratios, num_heads, attn_of = {}, {}, {}
    r = round_half_up(shapes[0].n_heads // shapes[0].n_kv_heads * head_rate) if head_rate > 0 else 0
    for li, (layer, s) in enumerate(zip(layers, shapes)):
        ignored += layer_norms(layer)
        kept = s.intermediate - round_half_up(s.intermediate * mlp_rate)
        if kept == s.intermediate:
            ignored.append(mlp(layer))
        else:
            ratios[mlp(layer)] = 1 - (kept + 0.5) / s.intermediate  # floor(width * (1 - ratio)) == kept
        if r == 0:
            ignored.append(attention(layer))
            continue
        num_heads.update({proj(layer, "q_proj"): s.n_heads, proj(layer, "k_proj"): s.n_kv_heads,
                          proj(layer, "v_proj"): s.n_kv_heads})
        attn_of.update({proj(layer, n): (li, layer) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    head_ratio = (r * shapes[0].n_kv_heads - 0.5) / shapes[0].n_heads if r else 0.0

    impl = model.config._attn_implementation
    model.requires_grad_(True)  # tracing follows grad_fn; Taylor needs gradients
    try:
        with torch.enable_grad():
            if importance == "taylor":  # before eager: the gradients are the same, SDPA's memory is not
                _accumulate_gradients(model, windows)
            if r:
                # SDPA/flash hide repeat_kv inside one op; eager exposes it, so GQA is traced as q heads sharing K/V.
                model.set_attn_implementation("eager")
            pruner = tp.pruner.BasePruner(
                model,
                # transformers 5: the KV cache object breaks tracing, so trace with use_cache=False; the graph does
                # not depend on the length, and a short input keeps eager's seq_len^2 attention maps small
                example_inputs={"input_ids": windows[:1, :32], "use_cache": False},
                output_transform=lambda out: out.logits,
                importance=scorer,
                global_pruning=False,
                pruning_ratio=head_ratio,  # only attention groups fall back to it: a non-zero gate for head pruning
                pruning_ratio_dict=ratios,
                ignored_layers=ignored,
                unwrapped_parameters=[(w, 0) for w in norms],
                num_heads=num_heads,
                prune_num_heads=bool(r),
                prune_head_dims=False,  # keep head_dim: RoPE and K/V shapes depend on it
                head_pruning_ratio=head_ratio,
            )
            groups = list(pruner.step(interactive=True))
        touched = set().union(*(_check_group(g, attn_of, r, hd, shapes[0].n_heads // shapes[0].n_kv_heads)
                                for g in groups))
        if r and touched != set(range(len(layers))):
            raise NotImplementedError(f"Torch-Pruning pruned heads only in layers {sorted(touched)}, "
                                      "not in every layer")
        for group in groups:
            group.prune()
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(impl)
    new = layer_shapes(model)
    for layer, s in zip(layers, new):
        set_mlp_width(layer, s.intermediate)
        set_query_heads(layer, s.n_heads, s.n_kv_heads)
    if not is_uniform(new):
        raise RuntimeError(f"Torch-Pruning produced non-uniform layers: {new}")
    model.config.intermediate_size, model.config.num_attention_heads = new[0].intermediate, new[0].n_heads
    with torch.no_grad():
        model(input_ids=windows[:1, :8], use_cache=False)  # the pruned model must still run
    return model
