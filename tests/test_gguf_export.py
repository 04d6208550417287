"""GGUF export (compress/gguf_export.py): metadata, tensors and tokenizer read back with gguf.GGUFReader, the q/k row
order checked against llama.cpp's rotary convention, and logits reloaded through transformers' GGUF loader."""
import copy
import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from pruning_utils.compress.gguf_export import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    GGUFExportError,
    bpe_pre_tokenizer,
    export_gguf,
    export_variants,
    main,
    parse_exports,
    write_tokenizer,
)
from pruning_utils.model.arch import decoder_layers, proj
from pruning_utils.model.checkpoint import load_pruned, save_pruned
from pruning_utils.model.surgery import prune_heads, prune_neurons
from pruning_utils.model.tiny import TinyTokenizer, tiny_model

Q = gguf.GGMLQuantizationType
VOCAB = 300  # > the tiny BPE's tokens: the GGUF vocabulary is padded to the embedding rows
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pruned models leave Python as GGUF files.",
         "llama.cpp reads one head count for all layers, 12 of them.", "Hello world! <|im_start|>user hi<|im_end|>"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE trained offline on a few sentences, with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT
    return fast


def pruned(family: str, heads: int = 2, width: int = 32, **overrides):
    """Return a tiny model of `family` pruned uniformly to `heads` query heads (of 8, 2 KV groups) and `width`
    MLP channels (of 96)."""
    model = tiny_model(family, **overrides)
    per_group = heads // 2
    prune_heads(model, {li: [g * 4 + j for g in range(2) for j in range(per_group)] for li in range(3)})
    prune_neurons(model, {li: list(range(width)) for li in range(3)})
    return model


def fields(path) -> tuple[dict, dict]:
    """Return the GGUF file's metadata `{key: value}` (token arrays left out) and `{tensor name: tensor}`."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")}
    return meta, {t.name: t for t in reader.tensors}


def as_float(t) -> np.ndarray:
    """Return a GGUFReader tensor de-quantized to float32, shaped (rows, row length) like a torch weight."""
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


def logits(model, text_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(text_ids).logits


def rounded(model, out_type: str):
    """Return a copy of the model whose 2-D weights went through the export's number format and back."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and out_type == "f16":
                p.copy_(p.half().float())
            elif p.ndim == 2 and out_type == "q8_0":
                p.copy_(torch.from_numpy(dequantize(quantize(p.detach().numpy(), Q.Q8_0), Q.Q8_0)).reshape(p.shape))
    return model


def gguf_model(path):
    """Return the GGUF file loaded by transformers' own GGUF loader (de-quantized, q/k rows put back), fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------- metadata and tensors


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_metadata_and_tensors_after_head_pruning(family, arch, out_type, tmp_path, models_dir):
    folder = save_pruned(pruned(family), TinyTokenizer(), "m")
    out = export_gguf(folder, tmp_path / "m.gguf", out_type)
    meta, tensors = fields(out)
    assert meta["general.architecture"] == arch and meta["general.name"] == "m"
    expected = {"block_count": 3, "context_length": 256, "embedding_length": 64, "feed_forward_length": 32,
                "attention.head_count": 2, "attention.head_count_kv": 2, "vocab_size": 128,
                "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16}  # 16 != 64 / 2
    assert {k: meta[f"{arch}.{k}"] for k in expected} == expected
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[out_type]
    assert meta["tokenizer.ggml.model"] == "no_vocab"  # the tiny models' stub tokenizer has no tokenizer.json

    biases = {"llama": ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
              "qwen2": ["attn_q", "attn_k", "attn_v"], "mistral": []}[family]
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    names |= {f"blk.{i}.{n}.weight" for i in range(3) for n in per_block}
    names |= {f"blk.{i}.{n}.bias" for i in range(3) for n in biases}
    assert set(tensors) == names
    # GGUF lists a matrix's dimensions row length first: [in_features, out_features]
    shapes = {"attn_q": [64, 32], "attn_k": [64, 32], "attn_v": [64, 32], "attn_output": [32, 64],
              "ffn_gate": [64, 32], "ffn_up": [64, 32], "ffn_down": [32, 64], "attn_norm": [64]}
    for n, shape in shapes.items():
        assert [int(d) for d in tensors[f"blk.1.{n}.weight"].shape] == shape, n
    matrix = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[out_type]
    for name, t in tensors.items():
        assert t.tensor_type == (matrix if len(t.shape) == 2 else Q.F32), name


def test_tied_embeddings_write_no_output_weight(tmp_path):
    model = pruned("qwen2", tie_word_embeddings=True)
    _, tensors = fields(export_gguf(model, tmp_path / "t.gguf", "f32"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_q8_0_writes_rows_that_do_not_fit_its_block_in_f16(tmp_path):
    with pytest.warns(UserWarning, match="written in f16"):
        out = export_gguf(pruned("mistral", width=40), tmp_path / "q.gguf", "q8_0")
    _, tensors = fields(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # rows 40 long
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0  # rows 64 long


def test_non_uniform_plan_is_refused_naming_the_layers(tmp_path):
    model = tiny_model("llama")
    prune_heads(model, {1: [0, 1, 4, 5]})
    with pytest.raises(GGUFExportError, match=r"layers 0, 2: 8 query heads.*layer 1: 4 query heads.*one head count "
                                              r"and one MLP width for all layers"):
        export_gguf(model, tmp_path / "n.gguf")
    assert not list(tmp_path.iterdir())


def test_unsupported_family_and_type_are_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="'qwen3'.*supported: llama, mistral, qwen2"):
        export_gguf(tiny_model("qwen3"), tmp_path / "q.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4'; known: f16, q8_0, f32"):
        export_gguf(tiny_model("llama"), tmp_path / "q.gguf", "q4")


def test_command_line(tmp_path, models_dir, capsys):
    folder = save_pruned(pruned("llama"), None, "cli")
    assert main([str(folder), str(tmp_path / "cli.gguf"), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli.gguf").is_file()
    model = tiny_model("llama")
    prune_neurons(model, {0: list(range(64))})
    assert main([str(save_pruned(model, None, "ragged")), str(tmp_path / "r.gguf")]) == 2
    assert "MLP width 64" in capsys.readouterr().err


def test_notebook_exports_list_each_file_or_why_it_was_refused(tmp_path, models_dir):
    assert parse_exports(" mix:q8_0, baseline ,,") == [("mix", "q8_0"), ("baseline", "f16")]
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4' in 'mix:q4'"):
        parse_exports("mix:q4")
    save_pruned(pruned("llama"), None, "uniform")
    ragged = tiny_model("llama")
    prune_neurons(ragged, {0: list(range(64))})
    save_pruned(ragged, None, "ragged")
    rows = export_variants("uniform:q8_0,ragged", "unused", tmp_path / "gguf")
    assert [(r["variant"], r["type"]) for r in rows] == [("uniform", "q8_0"), ("ragged", "f16")]
    assert rows[0]["refused"] == "" and rows[0]["size_mib"] > 0
    assert fields(rows[0]["file"])[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "MLP width 64" in rows[1]["refused"] and rows[1]["file"] == ""
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["uniform-q8_0.gguf"]  # nothing half-written
    from pruning_utils.model.loading import ModelSpecError

    with pytest.raises(ModelSpecError, match="unknown model spec 'nosuch'.*a folder under"):
        export_variants("nosuch", "unused", tmp_path / "gguf")


# ---------------------------------------------------------------------------------------------- rotary layout


def rope(x: np.ndarray, pos: int, adjacent: bool, base: float = 10000.0) -> np.ndarray:
    """Rotate the last axis by position `pos`: pairs (2i, 2i+1) (llama.cpp's `llama`) or (i, i+d/2) (Hugging Face,
    llama.cpp's `qwen2`), pair i by the angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    angle = pos * base ** (-np.arange(0, d, 2) / d)
    a, b = (x[..., 0::2], x[..., 1::2]) if adjacent else (x[..., : d // 2], x[..., d // 2:])
    ra, rb = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    out = np.empty_like(x)
    if adjacent:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    return out


def attention_scores(wq, bq, wk, bk, adjacent: bool, hd: int = 16) -> np.ndarray:
    """Return the query-key dot products of every query head with its KV head, at query position 7 and key
    position 3, for two fixed hidden vectors."""
    rng = np.random.default_rng(0)
    xq, xk = rng.normal(size=64), rng.normal(size=64)
    q = rope((wq @ xq + bq).reshape(-1, hd), 7, adjacent)
    k = rope((wk @ xk + bk).reshape(-1, hd), 3, adjacent)
    return np.einsum("hd,hd->h", q, np.repeat(k, len(q) // len(k), axis=0))


def test_llama_q_k_rows_follow_llama_cpp_rotary_and_qwen2_rows_stay(tmp_path):
    # llama.cpp's `llama` rotates adjacent pairs; with the exported rows it must give Hugging Face's scores
    model = pruned("llama", heads=4)  # with q/k biases: they are reordered with their rows
    _, t = fields(export_gguf(model, tmp_path / "l.gguf", "f32"))
    q, k = (proj(decoder_layers(model)[0], n) for n in ("q_proj", "k_proj"))
    hf = [p.detach().numpy().astype(np.float64) for p in (q.weight, q.bias, k.weight, k.bias)]
    exported = [as_float(t[f"blk.0.{n}"]).astype(np.float64).reshape(h.shape)
                for n, h in zip(["attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias"], hf)]
    expected = attention_scores(*hf, adjacent=False)
    np.testing.assert_allclose(attention_scores(*exported, adjacent=True), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(attention_scores(*hf, adjacent=True), expected, atol=1e-3)  # the order matters
    # qwen2 rotates (i, i + d/2) like Hugging Face: rows written as they are
    qwen = pruned("qwen2", heads=4)
    _, t = fields(export_gguf(qwen, tmp_path / "q.gguf", "f32"))
    q = proj(decoder_layers(qwen)[0], "q_proj")
    np.testing.assert_array_equal(as_float(t["blk.0.attn_q.weight"]), q.weight.detach().numpy())
    np.testing.assert_array_equal(as_float(t["blk.0.attn_q.bias"]), q.bias.detach().numpy())


# --------------------------------------------------------------------------------------- tokenizer and logits


def test_pre_tokenizer_names_match_what_readers_split_by():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert bpe_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated"}
    no_regex = dict(byte_level, use_regex=False)
    assert bpe_pre_tokenizer({"type": "Sequence", "pretokenizers": [split, no_regex]}) == "qwen2"
    assert bpe_pre_tokenizer({"type": "Whitespace"}) is None
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_SPLIT == PRETOKENIZE_REGEX
    # transformers' GGUF reader rebuilds these names with the same regexes
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert mapping.GGUF_PRE_TOKENIZER_SPLITS["qwen2"] == QWEN2_SPLIT
    assert mapping.GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == LLAMA3_SPLIT


def test_a_tokenizer_other_than_byte_level_bpe_is_refused(tmp_path):
    sentencepiece = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}, "decoder": {"type": "Sequence"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(sentencepiece))
    with pytest.raises(GGUFExportError, match="only byte-level BPE tokenizers are exported.*without a tokenizer"):
        write_tokenizer(gguf.GGUFWriter(None, "llama"), tmp_path, 128)


def test_tokenizer_is_carried_over(bpe_tokenizer, tmp_path, models_dir):
    from transformers import AutoTokenizer

    folder = save_pruned(pruned("llama", attention_bias=False, mlp_bias=False, vocab_size=VOCAB), bpe_tokenizer, "t")
    out = export_gguf(folder, tmp_path / "gguf" / "t.gguf", "f16")
    meta, _ = fields(out)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == CHAT
    assert meta["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "tokenizer.ggml.add_bos_token" in meta and not meta["tokenizer.ggml.add_bos_token"]
    tokens, types = (gguf.GGUFReader(out).fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type"))
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[bpe_tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    reloaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == bpe_tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_transformers_reloads_a_head_pruned_llama_with_the_same_logits(out_type, bpe_tokenizer, tmp_path, models_dir):
    # 2 heads of 16: the head size is not hidden / heads (32), so only key_length / rope.dimension_count can say it
    folder = save_pruned(pruned("llama", attention_bias=False, mlp_bias=False, vocab_size=VOCAB), bpe_tokenizer, "h")
    out = export_gguf(folder, tmp_path / "gguf" / "h.gguf", out_type)
    checkpoint, _ = load_pruned(folder)
    ids = torch.tensor([bpe_tokenizer(TEXTS[0])["input_ids"]])
    reference = logits(rounded(checkpoint, out_type), ids)  # the checkpoint with the file's number format
    assert (logits(gguf_model(out), ids) - reference).abs().max() < 1e-5
    if out_type != "f32":
        assert (reference - logits(checkpoint, ids)).abs().max() < 0.05  # and that format is close to the checkpoint


def test_transformers_reloads_a_tied_qwen2_with_its_biases(bpe_tokenizer, tmp_path, models_dir):
    # transformers' GGUF loader reads no head size for qwen2, so the head size here is hidden / heads (8 of 8)
    model = pruned("qwen2", heads=8, head_dim=8, tie_word_embeddings=True, vocab_size=VOCAB)
    out = export_gguf(save_pruned(model, bpe_tokenizer, "q"), tmp_path / "gguf" / "q.gguf", "f32")
    ids = torch.tensor([bpe_tokenizer(TEXTS[1])["input_ids"]])
    assert (logits(gguf_model(out), ids) - logits(model, ids)).abs().max() < 1e-5


@pytest.mark.slow
def test_embedded_smollm2_head_pruned_round_trips_in_f16(embedded, tmp_path):
    model, tok = embedded
    model = copy.deepcopy(model)
    prune_heads(model, {li: [0, 1, 3, 4, 6, 7] for li in range(30)})  # 9 -> 6 heads of 64: not 576 / 6 = 96
    out = export_gguf(model, tmp_path / "s.gguf", "f16", tokenizer=tok)
    meta, _ = fields(out)
    assert meta["llama.attention.head_count"] == 6 and meta["llama.attention.key_length"] == 64
    assert meta["tokenizer.chat_template"] == tok.chat_template
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    assert (logits(gguf_model(out), ids) - logits(rounded(model, "f16"), ids)).abs().max() < 1e-5
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "<|im_start|>user\nHow many legs do 12345 ants have?<|im_end|>"
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
