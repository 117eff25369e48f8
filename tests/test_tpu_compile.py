"""Remat policies cut the compiled step's temporary memory, as the TPU compiler reports it.

XLA:CPU merges a rematerialised forward pass back into the original (so its memory analysis does not
change with remat); the TPU compiler keeps it. libtpu compiles for a TPU topology on this CPU. It stays
out of the llmjax install (it makes CPU runs noisy): this test puts it in a side virtualenv that reuses
the installed packages (tests/helpers/tpu_venv.py).
"""

import json
import pathlib
import subprocess

import pytest

from helpers.tpu_venv import tpu_env, tpu_python

HELPER = pathlib.Path(__file__).parent / "helpers" / "tpu_remat_memory.py"


@pytest.mark.slow
def test_remat_reduces_compiled_temporary_memory_on_tpu():
    out = subprocess.run([tpu_python(), str(HELPER)], capture_output=True, text=True, timeout=900,
                         cwd=pathlib.Path(__file__).parent.parent, env=tpu_env())
    assert out.returncode == 0, out.stderr[-3000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    none, full = (mem[p]["temp_bytes"] for p in ("none", "full"))
    assert full < 0.5 * none, mem
    assert mem["full"]["argument_bytes"] == mem["none"]["argument_bytes"]  # same sharded state either way
