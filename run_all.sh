#!/usr/bin/env bash
# The whole pipeline: install what is missing, then run notebooks 00 -> 02 -> 03 -> 03b -> 04 -> 05 -> 06 with papermill
# (05: adaptive runtime, per-prompt pruning levels of the unpruned model; reads only 00's importance scores;
#  07, encoder classifiers: with ENCODER_STAGE=on, or alone with --profile encoder).
#   bash run_all.sh                      # default profile: embedded SmolLM2-135M + embedded text, CPU
#   bash run_all.sh --profile smoke      # tiny random model, a few minutes
#   bash run_all.sh --profile encoder    # notebook 07 alone: the embedded BERT-family classifier
#   bash run_all.sh --profile kaggle-qwen2.5-0.5b --only 00,02 -p HEAD_RATE 0.2
#   PRUNE_MODEL=Qwen/Qwen2.5-0.5B bash run_all.sh --force
#   bash run_all.sh --help               # options, stages, profiles; --list-params: every parameter and its default
# Options:
#   --profile NAME   parameter set: default | smoke | encoder | kaggle-qwen2.5-0.5b | kaggle-qwen2.5-3b (pruning_utils/pipeline/profiles.py)
#   --only KEYS      run only these stages, e.g. 02,03 (keys: 00 02 03 03b 04 05 06 07; 07 needs the encoder
#                    stage: -p ENCODER_STAGE on, or --profile encoder, else --only 07 is refused)
#   --force          re-run the selected stages even when finished with the same parameters
#   -p NAME VALUE    override one parameter (repeatable); PRUNE_<NAME>=VALUE in the environment does the same
# Executed notebooks land in results/notebooks/; finished stages with unchanged parameters are skipped.
# Exit codes: 0 done, 1 a stage failed (named, with its executed notebook), 2 bad usage: an unknown stage,
# parameter or profile, a value of the wrong type or out of range, a stage the profile leaves out (nothing was run).
# SKIP_INSTALL=1 skips scripts/install.sh (the project must then already be installed: pip install -e .).
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
for arg in "$@"; do
  case "$arg" in
    # no install needed to read the help or to check a command line
    -h|--help|--list-params|--check) exec python3 -m pruning_utils.pipeline.stages "$@" ;;
  esac
done
# the command line is checked first (standard library only): a typo fails here, not after the install
python3 -m pruning_utils.pipeline.stages --check "$@"
export PRUNING_RUN_STARTED="${PRUNING_RUN_STARTED:-$(date +%s)}"  # the run time table counts the install too
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  bash scripts/install.sh
fi
exec python3 -m pruning_utils.pipeline.stages "$@"
