# %%
# Colab / Kaggle: install this project when `pruning_utils` is not importable; a no-op under run_all.sh.
# Checkpoints go to $PRUNING_MODELS_DIR (default <project>/models): on Kaggle, whose working folder holds ~20 GB, set
# os.environ["PRUNING_MODELS_DIR"] = "/kaggle/tmp/models" here, before pruning_utils is imported
# (run_all.sh passes it on)
import importlib
import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

REPO_URL = os.environ.get("PRUNING_REPO_URL", "https://github.com/OWNER/semantic-llm-pruning.git")
if importlib.util.find_spec("pruning_utils") is None:
    root = Path.cwd().parent  # opened from <project>/notebooks
    if not (root / "pyproject.toml").exists():
        root = Path("semantic-llm-pruning").resolve()
        if not root.exists():
            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(root)], check=True)
    # install.sh adds the missing requirements, never reinstalls a preinstalled torch, and installs the project
    # editable into this kernel's interpreter
    subprocess.run(["bash", str(root / "scripts" / "install.sh")], check=True,
                   env=dict(os.environ, PYTHON=sys.executable))
    # The editable install took effect through a .pth file, which Python reads at start-up only: read it now, so
    # this same kernel imports the project (no restart, "Run all" works the first time)
    for folder in site.getsitepackages() + [site.getusersitepackages()]:
        if os.path.isdir(folder):
            site.addsitedir(folder)
    importlib.invalidate_caches()
    if importlib.util.find_spec("pruning_utils") is None:
        raise RuntimeError(f"installed {root} (editable) into {sys.executable}, but this kernel still cannot import "
                           "pruning_utils; restart the kernel and run all cells again")
