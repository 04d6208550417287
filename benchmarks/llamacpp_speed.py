"""The pruned checkpoints run in llama.cpp: greedy agreement with PyTorch and real prompt / generation speed.

    python3 -m benchmarks.llamacpp_speed [--variants baseline,head_pruned,mlp_pruned,mix_pruned] [--types f16,q8_0]

Each variant (the embedded model and the default run's saved checkpoints under models/) is exported to GGUF with
`pruning_utils.compress.gguf_export` (cached under models/_cache/gguf/), loaded by llama.cpp's Python binding
(`llama-cpp-python`; built from its source distribution on the package index when missing, a one-time build whose
minutes are printed and recorded), and measured alone on the CPU:
- agreement: `logit_max_abs_diff`, the largest logit difference at the prompts' last position; and the same
  prompt token ids go to PyTorch (fp32 greedy) and to llama.cpp (greedy, no sampling penalties);
  `agree_prompts` is the fraction of prompts whose first `--check-tokens` generated tokens are identical, and
  `agree_prefix` the mean length of the common prefix as a fraction of them;
- speed: `pp_tok_s`, a `--prompt-tokens` prompt evaluated in one call (prompt processing), and `tg_tok_s`,
  `--gen-tokens` greedy tokens one at a time after it (generation); the median of `--repeats` runs after a warm-up;
- the parameter-bytes limit: generation reads every weight once per token, so its speed-up over the f16 baseline can
  be at most the ratio of weight bytes read per token (`bytes_per_token`: every tensor of the file, except the token
  embedding table when a separate output matrix exists, since only one of its rows is read); `limit_x` is that ratio
  and `of_limit` the measured speed-up as a fraction of it.
Writes results/benchmarks/llamacpp_speed.csv (one row per variant and type).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from pruning_utils.compress.gguf_export import export_gguf
from pruning_utils.measure import metrics
from pruning_utils.measure.evaluation import format_prompt, load_instructions
from pruning_utils.model.loading import EMBEDDED_MODEL, load_model
from pruning_utils.paths import PROJECT_ROOT, models_dir
from pruning_utils.pipeline import results

OUT = PROJECT_ROOT / "results" / "benchmarks" / "llamacpp_speed.csv"
BINDING = "llama-cpp-python"


def ensure_binding() -> float:
    """Import llama_cpp, building `llama-cpp-python` from its source distribution first when missing; returns the
    minutes the build took (0.0 when it was installed)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return 0.0
    print(f"{BINDING} is missing: building it from its source distribution (one time; minutes on a 2-core CPU)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", BINDING, BINDING], check=True)
    return (time.perf_counter() - t0) / 60


def gguf_file(variant: str, out_type: str) -> Path:
    """Return the GGUF file of a variant (exported once, then reused while the checkpoint is unchanged)."""
    source = EMBEDDED_MODEL if variant == "baseline" else variant
    folder = models_dir() / (variant if variant != "baseline" else "smollm2-135m-instruct")
    stamp = max((p.stat().st_mtime_ns for p in folder.glob("*.safetensors")), default=0)
    path = models_dir() / "_cache" / "gguf" / f"{variant}-{out_type}-{stamp}.gguf"
    if not path.exists():
        export_gguf(source, path, out_type)
    return path


def bytes_per_token(path: Path) -> int:
    """Return the weight bytes one generated token reads: every tensor, less the embedding table when untied."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    """Return `n` greedy tokens of the PyTorch model after the prompt ids."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def last_logits_gap(model, llm, ids: list[int]) -> float:
    """Return the largest |logit difference| of PyTorch and llama.cpp at the prompt's last position."""
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    llm.reset()
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[len(ids) - 1], dtype=torch.float32)
    return float((ours - theirs).abs().max())


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Return `n` greedy tokens of llama.cpp after the prompt ids (argmax, no penalties)."""
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """Return the length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def timed_speed(llm, prompt: list[int], gen_tokens: int, repeats: int) -> tuple[float, float]:
    """Return median (prompt tokens/s, generated tokens/s) of `repeats` runs after one warm-up."""
    pp, tg = [], []
    for r in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t2 = time.perf_counter()
        if r:  # the first run warms caches and the thread pool
            pp.append(len(prompt) / (t1 - t0))
            tg.append(gen_tokens / (t2 - t1))
    return statistics.median(pp), statistics.median(tg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.llamacpp_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="baseline,head_pruned,mlp_pruned,mix_pruned")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--prompts", type=int, default=4, help="prompts of the agreement check")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    build_min = ensure_binding()
    import llama_cpp

    threads = metrics.usable_cores()
    variants, types = args.variants.split(","), args.types.split(",")
    missing = [v for v in variants if v != "baseline" and not (models_dir() / v).is_dir()]
    if missing:
        raise SystemExit(f"no checkpoint for {', '.join(missing)} under {models_dir()}: run `bash run_all.sh` "
                         "(stages 02 and 03 write them) or name other --variants")
    base_model, tok = load_model(EMBEDDED_MODEL, device="cpu", dtype="float32")
    prompts = [tok.encode(format_prompt(tok, it["prompt"]), add_special_tokens=False)
               for it in load_instructions()[:args.prompts]]
    text = " ".join(it["prompt"] for it in load_instructions())
    long_prompt = (tok.encode(text, add_special_tokens=False) * 8)[:args.prompt_tokens]
    rows = []
    for variant in variants:
        model = base_model if variant == "baseline" else load_model(variant, device="cpu", dtype="float32")[0]
        reference = [torch_greedy(model, ids, args.check_tokens) for ids in prompts]
        for out_type in types:
            path = gguf_file(variant, out_type)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, args.prompt_tokens + args.gen_tokens + 8),
                                  n_threads=threads, n_threads_batch=threads, n_batch=args.prompt_tokens,
                                  logits_all=True, verbose=False)
            gap = max(last_logits_gap(model, llm, ids) for ids in prompts)
            answers = [cpp_greedy(llm, ids, args.check_tokens) for ids in prompts]
            prefixes = [common_prefix(a, b) / args.check_tokens for a, b in zip(answers, reference)]
            pp, tg = timed_speed(llm, long_prompt, args.gen_tokens, args.repeats)
            rows.append(dict(variant=variant, type=out_type,
                             params_non_embedding=metrics.count_params(model)["non_embedding"],
                             file_mb=round(path.stat().st_size / 2**20, 2), bytes_per_token=bytes_per_token(path),
                             logit_max_abs_diff=round(gap, 4),
                             agree_prompts=sum(p == 1.0 for p in prefixes) / len(prefixes),
                             agree_prefix=statistics.mean(prefixes), pp_tok_s=round(pp, 1), tg_tok_s=round(tg, 2),
                             prompt_tokens=len(long_prompt), gen_tokens=args.gen_tokens, repeats=args.repeats,
                             threads=threads, llama_cpp=metadata.version(BINDING), build_minutes=round(build_min, 1),
                             load_avg=metrics.load_avg()))
            print(rows[-1], flush=True)
            llm.close()
    table = pd.DataFrame(rows)
    base = table[(table["variant"] == "baseline") & (table["type"] == "f16")].iloc[0]
    table["tg_speedup_x"] = (table["tg_tok_s"] / base["tg_tok_s"]).round(3)
    table["pp_speedup_x"] = (table["pp_tok_s"] / base["pp_tok_s"]).round(3)
    table["limit_x"] = (base["bytes_per_token"] / table["bytes_per_token"]).round(3)
    table["of_limit"] = (table["tg_speedup_x"] / table["limit_x"]).round(3)
    results.write_csv(table, OUT, device=metrics.device_name("cpu"))
    print(table[["variant", "type", "file_mb", "agree_prompts", "agree_prefix", "pp_tok_s", "tg_tok_s",
                 "tg_speedup_x", "limit_x", "of_limit"]].to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
