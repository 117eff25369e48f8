"""Process-wide settings for a process about to run JAX, applied by the command line (llmjax.cli) and the
benchmarks before JAX starts, never by `import llmjax`: a library imported into someone else's program must
leave their process alone.

- CPU XLA flags (XNNPACK dot fusions) when the user has not set XLA_FLAGS and JAX may run on the CPU;
- glibc malloc keeping XLA:CPU's per-step host memory (`keep_freed_host_memory`) for commands that run many steps;
- JAX's start-up probe for a TPU logged quietly, so CPU runs do not open with "Unable to initialize backend 'tpu'".
"""

import ctypes
import logging
import os
import platform
import sys

# Measured on the 2-core benchmark shape (benchmarks/throughput.py --config configs/bench_gpt.py):
# let XNNPACK run XLA's dot fusions (faster small and mid-sized matmuls than XLA's default Eigen path).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_xnn_fusion_type=dot",)


def _may_run_on_cpu() -> bool:
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return not platforms or "cpu" in platforms


def set_cpu_xla_flags() -> None:
    """Add CPU_XLA_FLAGS when the user has not set XLA_FLAGS at all (set it, even empty, to opt out)."""
    if "XLA_FLAGS" in os.environ or not _may_run_on_cpu():
        return
    os.environ["XLA_FLAGS"] = " ".join(CPU_XLA_FLAGS)


def keep_freed_host_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse, for a process about to run many steps on the CPU.

    XLA:CPU allocates a step's temporaries as one block (~590 MiB for configs/bench_gpt.py) from an executor
    thread and frees it at the end of the step. glibc maps a block that large afresh on every allocation (a
    thread arena always does, the main arena above 32 MiB) and unmaps it when freed, so every step faulted it
    in again page by page: 157,000 page faults, about 10% of the step's time. One malloc arena, blocks taken
    from the heap instead of mapped on their own, and no trimming below 2 GiB of free memory keep it mapped and
    reused (0 page faults per step). The process then keeps its peak host memory, as a training job reaches it
    again on every step anyway. The cost is in compiling: XLA's compiler threads then share one arena, and a
    compile takes ~30% longer (gpt_tiny: 6.8 s against 5.2 s), which is why only the commands that run many steps
    ask for it, and the test suite (compile-bound) turns it off. Call it before JAX runs anything: a thread
    that has already allocated keeps its own arena. glibc on Linux, JAX on the CPU only;
    LLMJAX_KEEP_HOST_MEMORY=0 leaves malloc alone."""
    if os.environ.get("LLMJAX_KEEP_HOST_MEMORY", "1") == "0" or not _may_run_on_cpu() or sys.platform != "linux":
        return
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def quiet_backend_probe() -> None:
    """JAX tries every platform it knows at start-up and logs each one that is absent (e.g. "Unable to
    initialize backend 'tpu'") at INFO, which the commands' INFO logging would print as if it were a problem."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def prepare_process(*, many_steps: bool) -> None:
    """What a command calls before JAX starts: CPU XLA flags, the quiet backend probe, and for commands that
    run many steps (train, finetune, compare, benchmarks) keep_freed_host_memory()."""
    set_cpu_xla_flags()
    quiet_backend_probe()
    if many_steps:
        keep_freed_host_memory()
