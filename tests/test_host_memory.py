"""llmjax.runtime.keep_freed_host_memory() (called by `llmjax train`, `finetune`, `compare` and the throughput benchmark)
makes glibc's malloc keep freed memory, so XLA:CPU's per-step temporary block is reused instead of mapped and
faulted in again on every step."""

import json
import os
import statistics
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, json
from llmjax import runtime
runtime.keep_freed_host_memory()  # a no-op with LLMJAX_KEEP_HOST_MEMORY=0
import jax, jax.numpy as jnp

@jax.jit
def step(x, w):  # ~130 MiB of temporaries: float32 [2048, 4096] matmul outputs, several live at once
    ys = [x @ (w * i) for i in range(8)]
    return sum(jnp.sum(ys[i] @ ys[7 - i].T[:, :8]) for i in range(4))

x, w = jnp.ones((2048, 64), jnp.float32), jnp.ones((64, 4096), jnp.float32)
for _ in range(12):  # the first steps grow the heap: on a busy machine a step may allocate its block
    # before XLA's thread freed the last one, so the heap settles at two blocks after a few steps
    step(x, w).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
temp = step.lower(x, w).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"faults": faults, "temp_bytes": temp}))
"""


def faults_per_step(keep: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", LLMJAX_KEEP_HOST_MEMORY=keep)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_steps_reuse_host_memory_instead_of_faulting_it_in_again():
    kept, plain = faults_per_step("1"), faults_per_step("0")
    temp_pages = plain["temp_bytes"] / os.sysconf("SC_PAGE_SIZE")
    assert plain["temp_bytes"] > 64 * 2**20, plain  # one block, larger than glibc ever takes from its heap
    # Without the setting every step maps that block afresh and faults it in; with it, (almost) nothing.
    assert statistics.median(plain["faults"]) > 0.5 * temp_pages, plain
    assert statistics.median(kept["faults"]) < 0.01 * temp_pages, kept
