"""torchao INT8 of the embedded model: weight-only, and dynamic (activations too) plain, SmoothQuant-style smoothed
and with projections left in fp32.

Dynamic INT8 quantizes each activation row with one scale; SmolLM2's down_proj inputs carry outliers of
orders of magnitude above the other channels, which costs the embedded model most of its quality. This script
measures, on the same evaluation windows, the perplexity, greedy decode tokens/s and checkpoint size of each
option (weights per output row throughout; smoothing statistics from calibration windows of the profile's text
source) and writes results/ablation_studies/int8_smoothing.csv. The INT8 defaults of the profiles
(COMPRESS_INT8_*, ADAPTIVE_INT8_*) are taken from here.

Usage:
    python3 -m benchmarks.int8_smoothing [--alphas 0.5,0.65,0.8] [--eval-tokens 8192] [--calib-windows 16]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pruning_utils.compress.quantize import activation_maxima, quantize_int8
from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.checkpoint import save_pruned
from pruning_utils.model.loading import load_model
from pruning_utils.paths import ablation_dir
from pruning_utils.pipeline.profiles import DEFAULTS
from pruning_utils.pipeline.results import write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", default="0.5,0.65,0.8")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--source", default=DEFAULTS["TEXT_SOURCE"])
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    model.float().eval()
    chunks = sources.eval_chunks(tok, sources.text_parts(args.source), seq_len=512, max_tokens=args.eval_tokens)
    windows = sources.calibration_windows(tok, args.source, n_samples=args.calib_windows, seq_len=256, seed=0,
                                          model=model)
    peaks = [float(d["down_proj"].max()) for d in activation_maxima(model, windows, progress=False)]
    print(f"down_proj input max |x| per layer: {', '.join(f'{p:.0f}' for p in peaks)}")
    alphas = [float(a) for a in args.alphas.split(",")]
    options = [("fp32", "", None, None, ()), ("int8 weight-only", "weight_only", None, None, ()),
               ("int8 dynamic", "dynamic", None, None, ())] + \
        [(f"int8 dynamic smooth {a}", "dynamic", a, windows, ()) for a in alphas] + \
        [("int8 dynamic down_proj fp32", "dynamic", None, None, ("down_proj",))] + \
        [(f"int8 dynamic smooth {a} + down_proj fp32", "dynamic", a, windows, ("down_proj",)) for a in alphas]
    rows = []
    for name, mode, alpha, win, keep in options:
        t0 = time.time()
        m = model if name == "fp32" else quantize_int8(model, mode=mode, smooth_windows=win, smooth_alpha=alpha,
                                                        keep_fp32=keep, progress=False)
        build_s = time.time() - t0
        with tempfile.TemporaryDirectory() as d:  # the checkpoint as written: INT8 data, scales, embedding table
            size_mb = metrics.checkpoint_size_mb(save_pruned(m, None, Path(d) / "m"))
        ppl = metrics.perplexity(m, chunks, progress=False)["ppl"]
        lat = metrics.latency(m, seq_len=128, new_tokens=32)
        rows.append(dict(option=name, mode=mode, smooth_alpha=alpha, keep_fp32=",".join(keep), ppl=ppl, size_mb=size_mb,
                         decode_tok_s=lat["decode_tok_s_median"], prefill_ms=lat["prefill_ms_median"],
                         build_s=build_s, eval_tokens=chunks.numel(), load_avg=os.getloadavg()[0],
                         latency_noisy=lat["latency_noisy"], torch=torch.__version__))
        print(f"{name:32s} ppl {ppl:7.2f}  decode {rows[-1]['decode_tok_s']:5.1f} tok/s")
        if m is not model:
            del m
    table = pd.DataFrame(rows)
    table["ppl_change_pct"] = 100 * (table["ppl"] / table.loc[0, "ppl"] - 1)
    table["ppl_reference"] = f"{table.loc[0, 'option']}@{int(table.loc[0, 'eval_tokens'])}"  # '<row>@<tokens>' 
    table["speedup"] = table["decode_tok_s"] / table.loc[0, "decode_tok_s"]
    write_csv(table, ablation_dir() / "int8_smoothing.csv")


if __name__ == "__main__":
    main()
