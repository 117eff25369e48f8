"""The side virtualenv with libtpu (the TPU compiler) that the TPU-compile tests run in.

libtpu stays out of the llmjax test install (it makes CPU runs look for a TPU); this venv reuses the
installed packages (--system-site-packages) and adds only libtpu. `llmjax compile` finds it by itself.
"""

import os
import pathlib
import subprocess
import sys

LIBTPU = "libtpu==0.0.42.1"  # the release jax[tpu]==0.10.2 asks for
REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def tpu_venv() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLMJAX_TPU_VENV", pathlib.Path.home() / ".cache" / "llmjax" / "tpu-venv"))


def tpu_python() -> str:
    """The venv's python, creating the venv and installing libtpu on first use."""
    venv = tpu_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import libtpu"], capture_output=True)
    if probe.returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", LIBTPU], check=True)
    return str(python)


def tpu_env() -> dict:
    """Environment for a subprocess in the venv: CPU only (libtpu just compiles), this checkout importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # compiles may run side by side
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
