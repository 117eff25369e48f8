"""llmjax: pretrain BERT-, GPT- and T5-style transformers in JAX / Flax NNX.

Process settings for JAX on the CPU: this is the one place llmjax sets them. Importing llmjax before JAX starts
its backend (every llmjax entry point does), when JAX may run on the CPU:
- adds CPU_XLA_FLAGS to the environment when the user has not set XLA_FLAGS at all (set XLA_FLAGS yourself,
  even to an empty string, to opt out);
and the commands that run many steps (`llmjax train`, `finetune`, `compare`, benchmarks/throughput.py) call
`keep_freed_host_memory()` before JAX starts (LLMJAX_KEEP_HOST_MEMORY=0 opts out).
"""

import os
import sys

# Measured on the 2-core benchmark shape (benchmarks/throughput.py --config configs/bench_gpt.py):
# let XNNPACK run XLA's dot fusions (faster small and mid-sized matmuls than XLA's default Eigen path).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_xnn_fusion_type=dot",)


def _may_run_on_cpu() -> bool:
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return not platforms or "cpu" in platforms


def _set_cpu_xla_flags() -> None:
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
    import ctypes
    import platform

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


_set_cpu_xla_flags()
