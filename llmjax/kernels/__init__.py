"""Kernels for what XLA compiles slowly on a platform: C++ called through jax.ffi and built on first use
(`native`) - `cpu_attention`, causal attention for XLA:CPU, `cpu_matmul`, float32 matmuls for XLA:CPU on
OpenBLAS, `cpu_cross_entropy`, the loss's softmax statistics - and `splash`, the Pallas TPU attention kernel.
The model reaches them only through `dispatch`, which picks by platform and shape."""
