"""llmjax: pretrain BERT-, GPT- and T5-style transformers in JAX / Flax NNX.

XLA CPU flags: this is the one place llmjax sets them. Importing llmjax before JAX starts its backend
(every llmjax entry point does) adds CPU_XLA_FLAGS to the environment when the user has not set XLA_FLAGS
at all and JAX may run on the CPU. Set XLA_FLAGS yourself (even to an empty string) to opt out.
"""

import os

# Measured on the 2-core benchmark shape (benchmarks/throughput.py --config configs/bench_gpt.py):
# let XNNPACK run XLA's dot fusions (faster small and mid-sized matmuls than XLA's default Eigen path).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_xnn_fusion_type=dot",)


def _set_cpu_xla_flags() -> None:
    if "XLA_FLAGS" in os.environ:
        return
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and "cpu" not in platforms:
        return
    os.environ["XLA_FLAGS"] = " ".join(CPU_XLA_FLAGS)


_set_cpu_xla_flags()
