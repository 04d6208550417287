#!/usr/bin/env bash
# The whole pipeline: install what is missing, then run notebooks 00 -> 02 -> 03 -> 04 -> 06 with papermill.
#   bash run_all.sh                      # default profile: embedded SmolLM2-135M + embedded text, CPU
#   bash run_all.sh --profile smoke      # tiny random model, a few minutes
#   bash run_all.sh --profile kaggle-qwen2.5-0.5b --only 00,02 -p HEAD_RATE 0.2
#   PRUNE_MODEL=Qwen/Qwen2.5-0.5B bash run_all.sh --force
# Executed notebooks land in results/notebooks/; finished stages with unchanged parameters are skipped.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  bash scripts/install.sh
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec python3 -m pruning_utils.stages "$@"
