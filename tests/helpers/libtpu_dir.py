"""libtpu (the TPU compiler) for the TPU-compile tests, installed on first use into its own directory
(llmjax.compile.default_libtpu_dir(), ~0.7 GB; the test workers share one install, under a file lock), never
into the test environment: libtpu makes CPU runs look for a TPU. `llmjax compile` finds that directory by
itself; other compile subprocesses get it on PYTHONPATH (tpu_env). Not named libtpu.py: the scripts in this
folder run with it on sys.path, where JAX's `import libtpu` would find this file.
"""

import os
import pathlib

from llmjax.compile import install_libtpu, libtpu_available

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def libtpu_path() -> list[str]:
    """What a subprocess of this interpreter needs on its path to import libtpu, installing it on first use:
    nothing when this environment has libtpu itself."""
    return [] if libtpu_available() else [str(install_libtpu())]


def tpu_env() -> dict:
    """Environment for a compile subprocess of this interpreter: CPU only (libtpu just compiles), this checkout
    and libtpu importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # compiles may run side by side
    path = [str(REPO), *libtpu_path()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env
