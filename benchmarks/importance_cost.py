"""Cost of the importance criteria relative to a plain forward pass over the same calibration tokens.

Targets (issue 3): all forward-only criteria in one pass <= 1.3x a plain forward; taylor <= 3.5x.
Writes results/benchmarks/importance_cost.json.  Usage: python3 -m benchmarks.importance_cost [--model smollm2-135m]
"""
import argparse
import json
import time

import torch

from pruning_utils.data import sources
from pruning_utils.measure import metrics
from pruning_utils.model.loading import load_model
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.prune import importance


def timed(fn, repeats: int) -> float:
    """Return the median wall time of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    windows = sources.calibration_windows(tok, n_samples=args.n, seq_len=args.seq_len, seed=0)

    def plain():
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch_size):
                model(input_ids=windows[i:i + args.batch_size], use_cache=False)

    forward_only = ["activation", "fluctuation", "tfidf"]
    base = timed(plain, args.repeats)
    fwd = timed(lambda: importance.compute_importance(model, windows, forward_only, batch_size=args.batch_size,
                                                      progress=False), args.repeats)
    tay = timed(lambda: importance.compute_importance(model, windows, ["taylor"], batch_size=args.batch_size,
                                                      progress=False), args.repeats)
    out = {
        "model": args.model, "tokens": windows.numel(), "plain_forward_s": base,
        "forward_only_criteria": forward_only, "forward_only_s": fwd, "forward_only_ratio": fwd / base,
        "taylor_s": tay, "taylor_ratio": tay / base, "targets": {"forward_only_ratio": 1.3, "taylor_ratio": 3.5},
        "env": metrics.environment_info(model),
    }
    path = PROJECT_ROOT / "results" / "benchmarks" / "importance_cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
