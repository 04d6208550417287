"""CPU speed of dynamic INT8 against fp32 on the encoder classifier of notebook 07, timed alternately.

Notebook 07 times each variant once, one after the other, so a change of machine load between rows changes their
ms/batch. Here the fp32 and INT8 models run one batch each in turn (same batch, same threads), so both see the same
load; the medians and their ratio go to results/benchmarks/encoder_int8_speed.json.

Usage (after `bash run_all.sh --profile encoder`, which caches the fine-tuned baseline under models/):
    python3 -m benchmarks.encoder_int8_speed [--folder models/encoder-baseline] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from pruning_utils.encoder import tasks as et
from pruning_utils.encoder.checkpoint import load_encoder
from pruning_utils.encoder.surgery import quantize_encoder
from pruning_utils.paths import models_dir, results_dir
from pruning_utils.pipeline.results import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default=str(models_dir() / "encoder-baseline"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not os.path.isdir(args.folder):
        raise SystemExit(f"{args.folder} does not exist: run `bash run_all.sh --profile encoder` first")
    model, tok = load_encoder(args.folder)
    quantized = quantize_encoder(copy.deepcopy(model))
    task = et.embedded_task(1600, 500, seed=0)
    batch = et.inputs_only(next(et.batches(tok, task.validation, args.batch, args.max_length)))
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            model(**batch), quantized(**batch)
        for _ in range(args.repeats):
            for name, m in (("fp32", model), ("int8", quantized)):
                t0 = time.perf_counter()
                m(**batch)
                times[name].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(median_ms_per_batch=med, speedup=med["fp32"] / med["int8"], times_ms=times, batch=args.batch,
               max_length=args.max_length, threads=torch.get_num_threads(), load_avg=os.getloadavg()[0],
               torch=torch.__version__)
    write_json(out, results_dir() / "benchmarks" / "encoder_int8_speed.json")
    print(f"fp32 {med['fp32']:.1f} ms/batch, int8 {med['int8']:.1f} ms/batch: {out['speedup']:.2f}x")


if __name__ == "__main__":
    main()
