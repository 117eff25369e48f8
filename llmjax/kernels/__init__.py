"""Hand-written kernels for what XLA compiles slowly on a platform, C++ called through jax.ffi and built on
first use (`native`): `cpu_attention`, causal attention for XLA:CPU, and `cpu_matmul`, float32 matmuls for
XLA:CPU on OpenBLAS."""
