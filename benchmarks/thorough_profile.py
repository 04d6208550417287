"""The saved models of notebooks 02/03 under the default and the `thorough` profile, side by side (issue 15).

The thorough profile (obs heads and neurons, per-layer counts searched by KL, 448 calibration windows, ridge 1e-4)
runs into scratch results and models folders, so the committed default results and the default checkpoints stay
those of the default run (the caches are shared: they are keyed by what they hold):

    mkdir -p /tmp/thorough/ablation_studies /tmp/thorough/models && cp -r results/importance /tmp/thorough/
    cp results/ablation_studies/baseline.csv /tmp/thorough/ablation_studies/
    ln -s "$PWD/models/_cache" /tmp/thorough/models/_cache
    PRUNING_RESULTS_DIR=/tmp/thorough PRUNING_MODELS_DIR=/tmp/thorough/models \
        bash run_all.sh --profile thorough --only 02,03
    python3 -m benchmarks.thorough_profile --thorough /tmp/thorough

The table merges two runs (the default run's rows keep their commit, the thorough rows get theirs).

This reads head_pruned / mlp_pruned / mix_pruned from each folder's head_pruning.csv and mlp_pruning.csv, the
minutes of stages 02 and 03 from its run_time.csv and the calibration tokens and ridge from its stage stamps
(`results/stages/*.json`; where a folder has none, the profile's declared values), and writes
results/ablation_studies/thorough_profile.csv.
After a new default run alone, `python3 -m benchmarks.thorough_profile` reads its rows again beside the kept
thorough ones. Usage: python3 -m benchmarks.thorough_profile [--thorough DIR] [--default results] [--out CSV]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pruning_utils import paths
from pruning_utils.paths import PROJECT_ROOT
from pruning_utils.pipeline import results
from pruning_utils.pipeline.profiles import PROFILES

VARIANTS = {"head_pruned": ("head_pruning.csv", "02"), "mlp_pruned": ("mlp_pruning.csv", "03"),
            "mix_pruned": ("mlp_pruning.csv", "03")}
COLUMNS = ["profile", "variant", "criterion", "allocation", "reconstruction", "calib_tokens", "ridge_ratio",
           "query_heads", "intermediate", "params_non_embedding", "reduction_pct", "ppl", "ppl_change_pct",
           "ppl_reference", "fidelity_ppl", "kl_to_baseline", "eval_tokens", "stage_minutes", "load_avg", "device",
           "commit"]


def _stage_params(folder: Path, stage: str, profile: str) -> dict:
    """Return the parameters stage `stage` ran with (its stamp), or the profile's values when it has no stamp."""
    stamp = folder / "stages" / f"{stage}.json"
    if stamp.exists():
        return json.loads(stamp.read_text())["params"]
    return PROFILES[profile]


def _refit_windows(params: dict) -> int:
    """Return the calibration windows of a stage's refits: REFIT_CALIB, or N_CALIB in stamps written before 02 / 03
    had their own count."""
    return int(params["REFIT_CALIB"] if "REFIT_CALIB" in params else params["N_CALIB"])


def profile_rows(folder: Path, profile: str) -> pd.DataFrame:
    """Return one row per saved model of `folder` (a results folder of a run of notebooks 02 and 03)."""
    if profile not in PROFILES:
        raise SystemExit(f"unknown profile '{profile}'; known: {', '.join(PROFILES)}")
    table = folder / "ablation_studies"
    missing = [name for name in {"run_time.csv", *(f for f, _ in VARIANTS.values())} if not (table / name).exists()]
    if missing:
        raise SystemExit(f"{table} lacks {sorted(missing)}: run notebooks 02 and 03 into {folder} first "
                         "(see this script's docstring)")
    times = pd.read_csv(table / "run_time.csv").set_index("stage")
    rows = []
    for variant, (csv, stage) in VARIANTS.items():
        df = pd.read_csv(table / csv, dtype=results.STAMP_DTYPE)
        hit = df[df["variant"] == variant]
        if hit.empty:
            raise SystemExit(f"{table / csv} has no '{variant}' row: stage {stage} did not finish")
        if stage not in times.index:
            raise SystemExit(f"{table / 'run_time.csv'} has no stage {stage}")
        params = _stage_params(folder, stage, profile)
        row = hit.iloc[-1].to_dict()
        rows.append({**row, "profile": profile, "calib_tokens": _refit_windows(params) * int(params["CALIB_SEQ_LEN"]),
                     "ridge_ratio": float(params["RIDGE_RATIO"]), "stage_minutes": float(times.loc[stage, "minutes"]),
                     "commit": times.loc[stage, "commit"]})
    return pd.DataFrame(rows)[COLUMNS]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--thorough", help="results folder of the thorough run of notebooks 02/03; without it the "
                                       "thorough rows of --out are kept and only the default rows are read again")
    ap.add_argument("--default", default=str(PROJECT_ROOT / "results"), help="results folder of the default run")
    ap.add_argument("--out", default=str(paths.ablation_dir() / "thorough_profile.csv"))
    args = ap.parse_args(argv)
    if args.thorough:
        thorough = profile_rows(Path(args.thorough), "thorough")
    else:
        kept = (pd.read_csv(args.out, dtype=results.STAMP_DTYPE) if Path(args.out).exists()
                else pd.DataFrame(columns=["profile"]))
        thorough = kept[kept["profile"] == "thorough"]
        if thorough.empty:
            raise SystemExit(f"{args.out} holds no thorough rows to keep: give --thorough DIR (see the docstring)")
    table = pd.concat([profile_rows(Path(args.default), "default"), thorough], ignore_index=True)
    results.write_csv(table, args.out)
    print(table.drop(columns=["query_heads", "intermediate"]).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
