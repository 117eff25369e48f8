"""Remat policies cut the compiled step's temporary memory, as the TPU compiler reports it.

XLA:CPU merges a rematerialised forward pass back into the original (so its memory analysis does not
change with remat); the TPU compiler keeps it. libtpu compiles for a TPU topology on this CPU. It stays
out of the llmjax install (it makes CPU runs noisy): this test installs it into a directory of its own and
runs the compile with this interpreter and that directory on its path (tests/helpers/libtpu_dir.py).
"""

import json
import pathlib
import subprocess
import sys

import pytest

from helpers.libtpu_dir import tpu_env

HELPER = pathlib.Path(__file__).parent / "helpers" / "tpu_remat_memory.py"


@pytest.mark.slow
def test_remat_reduces_compiled_temporary_memory_on_tpu():
    out = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True, timeout=900,
                         cwd=pathlib.Path(__file__).parent.parent, env=tpu_env())
    assert out.returncode == 0, out.stderr[-3000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    none, full = (mem[p]["temp_bytes"] for p in ("none", "full"))
    assert full < 0.5 * none, mem
    assert mem["full"]["argument_bytes"] == mem["none"]["argument_bytes"]  # same sharded state either way
