"""Installing changes nothing of the user's outside the project, and a notebook's bootstrap cell installs the project
into its own kernel and imports it in the same kernel (no restart)."""
import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from pruning_utils.pipeline.stages import KERNEL_NAME, private_kernel

ROOT = Path(__file__).resolve().parent.parent


def _user_kernels() -> dict[str, str]:
    return {name: Path(d, "kernel.json").read_text() for name, d in KernelSpecManager().find_kernel_specs().items()
            if Path(d, "kernel.json").is_file()}


def test_the_runner_gives_papermill_a_private_kernel_of_its_own_interpreter():
    before, path_before = _user_kernels(), os.environ.get("JUPYTER_PATH")
    with private_kernel() as name:
        assert name == KERNEL_NAME
        spec = KernelSpecManager().get_kernel_spec(name)
        assert spec.argv[0] == sys.executable  # the runner's interpreter, whatever `python3` kernels exist
    assert os.environ.get("JUPYTER_PATH") == path_before and _user_kernels() == before
    assert KERNEL_NAME not in KernelSpecManager().find_kernel_specs() or KERNEL_NAME in before


def test_install_registers_the_kernel_under_the_project_name_only(tmp_path):
    script = (ROOT / "scripts" / "install.sh").read_text()
    lines = [ln.strip() for ln in script.splitlines() if "ipykernel install" in ln and not ln.strip().startswith("#")]
    assert lines, "install.sh registers a kernel for notebooks opened by hand"
    assert f"KERNEL_NAME={KERNEL_NAME}" in script and all('--name "$KERNEL_NAME"' in ln for ln in lines)
    cmd = re.sub(r"\s*>/dev/null.*$", "", lines[0])  # the command itself, its errors visible here
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path))
    subprocess.run(["bash", "-c", f"PY={sys.executable}; KERNEL_NAME={KERNEL_NAME}; {cmd}"], env=env, check=True,
                   capture_output=True)
    written = sorted(p.name for p in (tmp_path / "data" / "kernels").iterdir())
    assert written == [KERNEL_NAME], f"install wrote kernels {written}; the user's python3 must stay theirs"
    spec = json.loads((tmp_path / "data" / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable


def test_the_bootstrap_cell_imports_a_fresh_install_without_a_restart(tmp_path):
    # a fresh environment that cannot import the project; it borrows pip and setuptools from this interpreter's
    # site-packages through a path line (.pth files there, this checkout's editable install among them, stay unread)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    cell = (ROOT / "notebooks" / "src" / "shared_bootstrap.py").read_text()
    probe = ("import importlib.util\nassert importlib.util.find_spec('pruning_utils') is None, 'not a fresh env'\n"
             + cell + "\nimport pruning_utils.paths\nprint('IMPORTED', pruning_utils.paths.PROJECT_ROOT)\n")
    outside = tmp_path / "somewhere" / "notebooks"  # the notebook opened outside any checkout
    outside.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNING_", "PYTHON"))}
    env.update(PRUNING_REPO_URL=str(ROOT), INSTALL_REQUIREMENTS="0", HOME=str(tmp_path),
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    res = subprocess.run([str(python), "-c", probe], cwd=outside, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    clone = outside / "semantic-llm-pruning"
    assert f"IMPORTED {clone.resolve()}" in res.stdout, res.stdout[-2000:]
