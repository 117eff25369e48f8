"""Hand-written kernels for what XLA compiles slowly on a platform: `cpu_attention`, causal attention
for XLA:CPU (C++ through jax.ffi, built on first use)."""
