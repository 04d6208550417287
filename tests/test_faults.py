"""Faults and bad input: a save killed at any step, a full disk, damaged checkpoint files and NaN weights lose
nothing, and every refusal names the file or tensor at fault and what to do."""
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pruning_utils.model.checkpoint as ck
from pruning_utils import atomic
from pruning_utils.encoder import checkpoint as enc
from pruning_utils.model.checkpoint import CheckpointError, NonFiniteWeightsError, load_pruned, save_pruned
from pruning_utils.model.loading import ModelSpecError, embedded_model_dir, load_model
from pruning_utils.model.tiny import TinyTokenizer, tiny_encoder, tiny_model
from pruning_utils.pipeline import stages
from pruning_utils.recovery.lora import RecoveryConfig, RecoveryDivergedError, attach_lora, merge_lora

EMBED = "model.embed_tokens.weight"


class Killed(BaseException):
    """The process died here: nothing after it runs, not even the cleanup in `finally` blocks."""


@contextmanager
def failing_at(step: int | None, error: BaseException | None = None):
    """Record the steps of a save (file writes, fsyncs, renames, deletions) as `(name, args)` in the yielded list; the
    call at `step` raises `error` once, or, by default, `Killed`, after which every later step raises too (a dead
    process)."""
    seen: list[tuple[str, tuple]] = []

    def wrap(name, fn):
        def counted(*a, **k):
            seen.append((name, a))
            if step is not None and (len(seen) == step or (error is None and len(seen) > step)):
                raise error or Killed(name)
            return fn(*a, **k)
        return counted

    with pytest.MonkeyPatch.context() as mp:
        for owner, attr in ((os, "replace"), (os, "fsync"), (shutil, "rmtree"), (Path, "write_text"),
                            (ck, "save_file")):
            mp.setattr(owner, attr, wrap(attr, getattr(owner, attr)))
        yield seen


def _embed(folder: Path) -> torch.Tensor:
    return load_file(folder / "model.safetensors")[EMBED]


def _strays(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def test_a_replace_killed_at_any_step_leaves_a_complete_copy_that_loads(models_dir, tmp_path):
    old, new = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    save_pruned(old, TinyTokenizer(), "ckpt")
    with failing_at(None) as seen:
        save_pruned(new, TinyTokenizer(), "ckpt")
    names = [name for name, _ in seen]
    assert names.count("replace") >= 2 and "fsync" in names  # the new copy is flushed before the renames
    contents = (old.state_dict()[EMBED], new.state_dict()[EMBED])
    gap_seen = False
    for step in range(1, len(seen) + 1):
        models = tmp_path / f"models-{step}"
        shutil.copytree(models_dir, models)
        with failing_at(step), pytest.raises(Killed):
            save_pruned(new, TinyTokenizer(), models / "ckpt")
        final = models / "ckpt"
        gap_seen |= not final.exists()
        # at every instant a complete copy exists: under the name, or moved aside between the two renames
        assert atomic.is_complete(final) or any(atomic.is_complete(p) for p in atomic.strays_of(final, ("old",))), step
        for reader in ("loader", "cleanup", "next save"):
            copy = tmp_path / f"{reader}-{step}"
            shutil.copytree(models, copy)
            if reader == "loader":
                loaded, tok = load_pruned(copy / "ckpt")  # puts back a copy the kill left aside
                assert any(torch.equal(loaded.state_dict()[EMBED], c) for c in contents), step
                assert isinstance(tok, TinyTokenizer)
            elif reader == "cleanup":
                stages.remove_half_written(copy)
                assert _strays(copy) == [] and atomic.is_complete(copy / "ckpt"), step
                assert any(torch.equal(_embed(copy / "ckpt"), c) for c in contents), step
            else:
                save_pruned(tiny_model("llama", seed=2), None, copy / "ckpt")
                assert sorted(p.name for p in copy.iterdir()) == ["ckpt"], step  # strays of the name removed
    assert gap_seen, "no step fell between the two renames"


def test_cleanup_puts_back_the_last_complete_copy_before_deleting_strays(models_dir):
    save_pruned(tiny_model("qwen2", seed=0), None, "head_pruned")
    before = _embed(models_dir / "head_pruned")
    os.replace(models_dir / "head_pruned", models_dir / ".old-head_pruned-0123abcd")  # killed between the renames
    (models_dir / ".tmp-head_pruned-4567cdef").mkdir()  # a new copy killed before its manifest
    (models_dir / ".tmp-head_pruned-4567cdef" / "config.json").write_text("{}")
    (models_dir / ".tmp-mlp_pruned-89abcdef").mkdir()  # another name's stray with no complete copy anywhere
    removed = stages.remove_half_written(models_dir)
    assert removed == [".tmp-head_pruned-4567cdef", ".tmp-mlp_pruned-89abcdef"]
    assert sorted(p.name for p in models_dir.iterdir()) == ["head_pruned"]
    assert torch.equal(_embed(models_dir / "head_pruned"), before)


def test_strays_belong_to_their_own_name_only(models_dir):
    save_pruned(tiny_model("mistral"), None, "a-b")
    os.replace(models_dir / "a-b", models_dir / ".old-a-b-0123abcd")  # "a-b"'s copy, not "a"'s
    assert atomic.stray_owner(models_dir / ".old-a-b-0123abcd") == "a-b"
    assert not atomic.recover_folder(models_dir / "a") and not (models_dir / "a").exists()
    save_pruned(tiny_model("mistral"), None, "a")  # a save of "a" leaves "a-b"'s copy alone
    assert (models_dir / ".old-a-b-0123abcd").is_dir()
    assert atomic.recover_folder(models_dir / "a-b") and atomic.is_complete(models_dir / "a-b")


def test_a_full_disk_leaves_the_previous_checkpoint_intact(models_dir):
    save_pruned(tiny_model("llama", seed=0), None, "ckpt")
    with failing_at(None) as seen:
        save_pruned(tiny_model("llama", seed=1), None, "ckpt")
    before = _embed(models_dir / "ckpt")
    aside = next(i for i, (name, a) in enumerate(seen) if name == "replace" and Path(a[0]).name == "ckpt")
    writes = range(1, aside + 1)  # every write, flush and rename of the new copy before the old one is moved aside
    assert {seen[i - 1][0] for i in writes} == {"save_file", "write_text", "fsync", "replace"}
    for step in writes:
        with failing_at(step, OSError(errno.ENOSPC, "No space left on device")), pytest.raises(OSError) as err:
            save_pruned(tiny_model("llama", seed=2), None, "ckpt")
        assert err.value.errno == errno.ENOSPC, step
        assert sorted(p.name for p in models_dir.iterdir()) == ["ckpt"], step  # nothing half-written stays
        assert atomic.is_complete(models_dir / "ckpt") and torch.equal(_embed(models_dir / "ckpt"), before), step


def test_truncated_weights_are_named(models_dir):
    folder = save_pruned(tiny_model("llama"), None, "ckpt")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is truncated or was changed: {size // 2} of the "
                                              rf"{size} bytes written.*re-run the stage that wrote it"):
        load_pruned("ckpt")
    (folder / atomic.MANIFEST_FILE).unlink()  # a checkpoint from before manifests: safetensors' own check, named
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a whole safetensors file .*cut short"):
        load_pruned("ckpt")
    enc_folder = enc.save_encoder(tiny_encoder(), None, models_dir / "enc")
    (enc_folder / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or was changed: 8 of the \d+ bytes"):
        enc.load_encoder(enc_folder)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))  # as written


def test_an_edited_layer_count_is_refused_naming_both_numbers(models_dir):
    folder = save_pruned(tiny_model("llama"), None, "ckpt")  # 3 layers, stock-loadable
    _edit_json(folder / "config.json", num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"config\.json was changed after it was written"):
        load_pruned("ckpt")
    (folder / atomic.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2 but pruning_plan\.json records 3 layers"):
        load_pruned("ckpt")
    meta = json.loads((folder / ck.PLAN_FILE).read_text())
    for n in (2, 4):  # fewer layers would drop weights, more would be random: the stock loader must refuse both
        _edit_json(folder / "config.json", num_hidden_layers=n)
        _edit_json(folder / ck.PLAN_FILE, query_heads=[8] * n, kv_heads=[2] * n, intermediate=[96] * n)
        with pytest.raises(CheckpointError, match=rf"config\.json builds {n} layers but the weights hold 3"):
            load_pruned("ckpt")
    _edit_json(folder / "config.json", num_hidden_layers=3)
    _edit_json(folder / ck.PLAN_FILE, **{k: meta[k] for k in ("query_heads", "kv_heads", "intermediate")})
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weights do not match.*missing \['model\.layers\.1\.mlp\.up_proj"):
        load_pruned("ckpt")  # a weight gone: stock from_pretrained would have initialised it at random
    enc_folder = enc.save_encoder(tiny_encoder(), None, models_dir / "enc")
    (enc_folder / atomic.MANIFEST_FILE).unlink()
    _edit_json(enc_folder / "config.json", num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2 but pruning_plan\.json records 3 layers"):
        enc.load_encoder(enc_folder)


def test_a_deleted_tokenizer_is_named_and_one_never_saved_is_none(models_dir):
    folder = save_pruned(tiny_model("qwen3"), TinyTokenizer(), "with-tok")
    (folder / "tiny_tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tiny_tokenizer\.json is missing .*re-run the stage"):
        load_pruned("with-tok")
    _, tok = load_pruned(save_pruned(tiny_model("qwen3"), None, "no-tok"))
    assert tok is None  # saved without a tokenizer: allowed, and documented


def test_checkpoints_from_before_manifests_still_load(models_dir, monkeypatch):
    model = tiny_model("mistral")
    folder = save_pruned(model, TinyTokenizer(), "old-style")
    (folder / atomic.MANIFEST_FILE).unlink()
    loaded, tok = load_pruned("old-style")
    assert torch.equal(loaded.state_dict()[EMBED], model.state_dict()[EMBED]) and tok is not None
    import pruning_utils.model.loading as loading

    def no_conversion():
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "embedded_gguf_path", no_conversion)
    cache = models_dir / "smollm2-135m-instruct"
    model.save_pretrained(cache)  # an embedded-model cache written before manifests
    assert embedded_model_dir(models_dir) == cache
    atomic.write_manifest(cache)
    (cache / "model.safetensors").write_bytes(b"")  # a damaged cache is converted again, not loaded
    with pytest.raises(AssertionError, match="converted again"):
        embedded_model_dir(models_dir)


def test_a_broken_config_json_is_named_not_blamed_on_the_network(models_dir, tmp_path):
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    (plain / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelSpecError, match=r"plain/config\.json is not valid JSON \(Expecting") as err:
        load_model(str(plain))
    assert "network" not in str(err.value)
    folder = save_pruned(tiny_model("llama"), None, "ckpt")
    (folder / atomic.MANIFEST_FILE).unlink()
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json is not valid JSON"):
        load_model("ckpt")


def test_nan_weights_are_refused_and_the_previous_checkpoint_stays(models_dir):
    save_pruned(tiny_model("llama", seed=0), None, "ckpt")
    before = _embed(models_dir / "ckpt")
    bad = tiny_model("llama", seed=1)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"weight model\.layers\.1\.mlp\.down_proj\.weight holds NaN or "
                                                    r"inf values; the checkpoint already there is unchanged"):
        save_pruned(bad, None, "ckpt")
    assert sorted(p.name for p in models_dir.iterdir()) == ["ckpt"]
    assert torch.equal(_embed(models_dir / "ckpt"), before)
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.classifier.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match=r"weight classifier\.bias holds NaN .* nothing was written"):
        enc.save_encoder(encoder, None, models_dir / "enc")
    assert not (models_dir / "enc").exists()


def test_a_non_finite_merged_weight_is_named():
    peft_model = attach_lora(tiny_model("mistral"), RecoveryConfig(target_modules=["v_proj"], r=2, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "layers.2.self_attn.v_proj.lora_" in name:
                p.fill_(1e30)  # finite adapters whose product overflows float32
    with pytest.raises(RecoveryDivergedError, match=r"merging the LoRA adapters gave NaN or inf in "
                                                    r"model\.layers\.2\.self_attn\.v_proj\.weight \(torch\.float32\)"):
        merge_lora(peft_model, {"steps": 3})
