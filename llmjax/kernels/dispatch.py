"""THE seam between the model and the kernels: llmjax.models and llmjax.objectives.losses spell out each
computation in XLA and ask here, once, whether a kernel takes it over. Every function returns the kernel's result
where a kernel runs that computation on this platform for these shapes, and None elsewhere (the caller then runs
its own XLA code); nothing outside llmjax.kernels names a kernel.

Where the kernels run:
- the C++ CPU kernels (cpu_matmul, cpu_attention, cpu_cross_entropy) on the CPU, in float32, once built and
  loaded (each one's `available`; never with LLMJAX_CPU_KERNELS=0), for the shapes each one's `usable` or
  `supported` accepts. XLA does not partition a custom call, so the matmul and cross-entropy kernels run only
  in a computation traced for one device, and attention runs per shard (native.per_shard);
- attention_kernel 'auto' resolves by platform (`resolve_kernel`): the splash kernel on TPU, cpu_flash on the
  CPU, XLA's dot_product_attention (cuDNN) on GPU. A named kernel steps aside for what it does not cover.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from llmjax.kernels import cpu_attention, cpu_cross_entropy, cpu_matmul, native
from llmjax.kernels.splash import splash_attention, splash_supported

ATTENTION_KERNELS = ("splash", "cpu_flash")  # the attention_kernel names `attention` serves; the rest are XLA code


def resolve_kernel(kernel: str, platform: str | None = None) -> str:
    """'auto' -> the attention kernel for the platform (given, else the platform of the mesh context's devices,
    else the default backend): splash on TPU, dot_product (cuDNN) on GPU, cpu_flash (the C++ kernel,
    llmjax.kernels.cpu_attention) on the CPU. Other names are returned unchanged."""
    if kernel != "auto":
        return kernel
    platform = platform or native.platform()
    return {"tpu": "splash", "gpu": "dot_product", "cuda": "dot_product", "rocm": "dot_product",
            "cpu": "cpu_flash"}.get(platform, "reference")


# --------------------------------------------------------------------------------------------- matmuls
def matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, transpose_w: bool = False
           ) -> jax.Array | None:
    """x [rows, K] @ w [K, N] (w [N, K] transposed with transpose_w) + bias [N] on the CPU kernel (OpenBLAS, faster
    there than XLA's dot) where it runs; else None."""
    if not cpu_matmul.usable(x, w):
        return None
    return cpu_matmul.matmul(x, w, bias, transpose_w=transpose_w)


def matmul_side_by_side(x: jax.Array, ws: Sequence[jax.Array], biases: Sequence[jax.Array] | None
                        ) -> jax.Array | None:
    """x [rows, K] @ [w_1 | w_2 | ...] + [b_1 | b_2 | ...] -> [rows, N_1 + N_2 + ...] as one matmul on the CPU
    kernel (one bigger GEMM and one bias pass instead of several) where it runs; else None. Not on XLA's dot:
    there splitting the output costs what the bigger matmul saves, and kernels sharded over a mesh axis would
    have to be resharded to sit side by side."""
    if not cpu_matmul.usable(x, jax.ShapeDtypeStruct((x.shape[1], sum(w.shape[1] for w in ws)), ws[0].dtype)):
        return None
    bias = None if biases is None else jnp.concatenate(biases)
    return cpu_matmul.matmul(x, jnp.concatenate(ws, axis=1), bias)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array, b2: jax.Array | None, activation: str
        ) -> jax.Array | None:
    """act(x [rows, D] @ w1 + b1) @ w2 + b2 on the CPU kernel, which applies the activation (and its gradient)
    inside its matmuls, where it runs and has the activation (exact GELU, ReLU); else None."""
    if activation not in cpu_matmul.ACTIVATIONS or not (cpu_matmul.usable(x, w1) and cpu_matmul.usable(x, w2)):
        return None
    return cpu_matmul.mlp(x, w1, b1, w2, b2, activation)


# ------------------------------------------------------------------------------------------- attention
def attention(q, k, v, mask, *, kernel: str, bias, scale: float, dropout: bool) -> jax.Array | None:
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] on the kernel `kernel` names (resolved, see
    `resolve_kernel`) where it computes exactly this attention; else None (also for the XLA kernels' names).
    `mask` is a llmjax.models.attention.AttentionMask; `bias` None, an array or a function of positions."""
    # Several devices without a mesh context (jax.set_mesh): custom kernels cannot be partitioned.
    partitionable = not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1
    if kernel == "splash":
        if partitionable and splash_supported(q, k, mask, bias=bias, dropout=dropout):
            return splash_attention(q, k, v, mask, scale=scale)
    elif kernel == "cpu_flash":
        covered = cpu_attention.supported(q, k, v, causal=mask.causal, prefix=mask.kv_prefix,
                                          same_keys=_same_keys(mask), bias=bias, dropout=dropout)
        if partitionable and covered and native.platform() == "cpu" and cpu_attention.available():
            local = lambda q, k, v, seg, pos: cpu_attention.attention(q, k, v, seg, pos, scale=scale)
            return native.per_shard(local, q, k, v, mask.q_segment_ids, mask.q_positions)
    return None


def packed_self_attention(project: Callable[[], jax.Array | None], mask, *, q: jax.ShapeDtypeStruct,
                          kv: jax.ShapeDtypeStruct, kernel: str, bias, scale: float, dropout: bool
                          ) -> jax.Array | None:
    """Self-attention [B, T, N, H] on the CPU attention kernel straight from one matmul on the q, k and v
    projections side by side: the kernel reads q, k and v in place and writes their gradient as one array, so no
    split or concat copies surround it. `q` and `kv` are the shapes and dtypes of q and of k and v (the same: the
    packed layout has no grouped-query heads); `project()` returns that matmul's output [B*T, 3*N*H], or None
    where it does not run on the kernel (`matmul_side_by_side`), and is called only once the attention kernel is
    known to cover this attention. None where either kernel steps aside; one device only (not run per shard)."""
    if (resolve_kernel(kernel) != "cpu_flash" or kv.shape != q.shape
            or not cpu_attention.supported(q, kv, kv, causal=mask.causal, prefix=mask.kv_prefix,
                                           same_keys=_same_keys(mask), bias=bias, dropout=dropout)
            or not (native.platform() == "cpu" and native.one_device() and cpu_attention.available())):
        return None
    qkv = project()
    if qkv is None:
        return None
    b, t, n, h = q.shape
    return cpu_attention.attention_packed(qkv.reshape(b, t, 3 * n, h), mask.q_segment_ids, mask.q_positions,
                                          scale=scale)


def _same_keys(mask) -> bool:
    """Whether the keys are the queries' own tokens (self-attention without a cache): the mask was built from one
    set of per-token vectors."""
    return mask.q_segment_ids is mask.kv_segment_ids and mask.q_positions is mask.kv_positions


# ---------------------------------------------------------------------------------------------- losses
def softmax_stats(logits: jax.Array, targets: jax.Array, with_mean: bool):
    """(logsumexp, target logit, mean logit or None, argmax == target) over the last axis of float32 logits
    [..., V], all from one read of the logits by the CPU kernel where it runs; else None."""
    if not cpu_cross_entropy.usable(logits):
        return None
    return cpu_cross_entropy.softmax_stats(logits, targets, with_mean)
