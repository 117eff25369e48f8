"""Causal (packed) self-attention for XLA:CPU: a C++ kernel (cpu_attention.cc) called through jax.ffi.

XLA:CPU runs attention as many small batched matmuls plus copies (head transposes, key-prefix slices) and
computes the masked half of the causal scores; this kernel works per (batch row, head) on 64 x 64 tiles with
an AVX-512 microkernel, skips the tiles above the diagonal and those whose packed segments cannot meet, and
keeps nothing of size [T, T] (the backward pass recomputes the scores from the saved row logsumexp). On the
bench shape (configs/bench_gpt.py) its forward + backward pass is ~3x faster than the XLA version.

It is compiled on first use for this machine's CPU (-march=native) and cached (llmjax.kernels.native).
Where it cannot be used (no AVX-512, no compiler, a build error, or LLMJAX_CPU_KERNELS=0) `available()` is
False, the reason is logged once, and llmjax.kernels.dispatch leaves the attention to the model's XLA code.
"""

from __future__ import annotations

import functools
import logging
import platform

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import native

log = logging.getLogger("llmjax")

HEAD_DIM, BLOCK = 64, 64  # what the kernel is written for: head dim 64, T a multiple of 64
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-DATTN_MR=6")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (logs why not, once)."""
    if not native.enabled():
        return False
    if platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in native.cpu_flags()[1].split():
        log.info("llmjax CPU attention kernel: this CPU has no AVX-512; using XLA's attention")
        return False
    try:
        native.register("cpu_attention", FLAGS, {
            "llmjax_attention_fwd": "AttnFwd", "llmjax_attention_bwd": "AttnBwd",
            "llmjax_attention_fwd_packed": "AttnFwdPacked", "llmjax_attention_bwd_packed": "AttnBwdPacked"})
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("llmjax CPU attention kernel unavailable (%s); using XLA's attention", e)
        return False
    return True


def supported(q, k, v, *, causal: bool, prefix, same_keys: bool, bias, dropout: bool) -> bool:
    """Whether the kernel computes exactly this attention: causal self-attention (T == S, the keys are the
    queries' own tokens) in float32 with head dim 64, T a multiple of 64, kv heads dividing
    the query heads (grouped-query attention), no bias, no bidirectional prefix and no dropout."""
    b, t, n, h = q.shape
    return (causal and same_keys and prefix is None and bias is None and not dropout and k.shape[1] == t
            and t % BLOCK == 0 and h == HEAD_DIM and n % k.shape[2] == 0
            and all(x.dtype == jnp.float32 for x in (q, k, v)))


def _forward(q, k, v, seg, pos, scale):
    b, t, n, _ = q.shape
    return jax.ffi.ffi_call("llmjax_attention_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                     jax.ShapeDtypeStruct((b, n, t), jnp.float32)))(
        q, k, v, seg, pos, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, seg, pos, scale):
    return _forward(q, k, v, seg, pos, scale)[0]


def _attention_fwd(q, k, v, seg, pos, scale):
    o, lse = _forward(q, k, v, seg, pos, scale)
    return o, (q, k, v, seg, pos, o, lse)


def _attention_bwd(scale, res, do):
    q, k, v, seg, pos, o, lse = res
    grads = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    dq, dk, dv = jax.ffi.ffi_call("llmjax_attention_bwd", (grads, grads, grads))(
        q, k, v, seg, pos, o, lse, do.astype(jnp.float32), scale=np.float32(scale))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, segment_ids, positions, *, scale: float) -> jax.Array:
    """softmax(q k^T * scale, causal within packed segments) v for q [B, T, N, 64], k/v [B, T, K, 64] float32
    and segment_ids/positions [B, T] (see `supported`), on one device or shard (a custom call is not
    partitioned by XLA: llmjax.kernels.dispatch runs it in a shard_map under a mesh).

    A query attends to a key of the same non-zero segment at a position <= its own; padding rows (segment 0)
    output zeros. Like llmjax.models.attention.causal_blocks_attention it assumes positions increase with the
    index within a segment and each segment is one contiguous run (as packing produces)."""
    n, kvh = q.shape[2], k.shape[2]
    if kvh != n:  # grouped-query attention: each kv head serves n // kvh query heads
        k, v = jnp.repeat(k, n // kvh, axis=2), jnp.repeat(v, n // kvh, axis=2)
    return _attention(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), float(scale))


def _forward_packed(qkv, seg, pos, scale):
    b, t, n3, h = qkv.shape
    return jax.ffi.ffi_call("llmjax_attention_fwd_packed", (jax.ShapeDtypeStruct((b, t, n3 // 3, h), jnp.float32),
                                                            jax.ShapeDtypeStruct((b, n3 // 3, t), jnp.float32)))(
        qkv, seg, pos, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_packed(qkv, seg, pos, scale):
    return _forward_packed(qkv, seg, pos, scale)[0]


def _attention_packed_fwd(qkv, seg, pos, scale):
    o, lse = _forward_packed(qkv, seg, pos, scale)
    return o, (qkv, seg, pos, o, lse)


def _attention_packed_bwd(scale, res, do):
    qkv, seg, pos, o, lse = res
    dqkv = jax.ffi.ffi_call("llmjax_attention_bwd_packed", jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
        qkv, seg, pos, o, lse, do.astype(jnp.float32), scale=np.float32(scale))
    return dqkv, None, None


_attention_packed.defvjp(_attention_packed_fwd, _attention_packed_bwd)


def attention_packed(qkv, segment_ids, positions, *, scale: float) -> jax.Array:
    """`attention(q, k, v, ...)` for q, k and v side by side in one array qkv [B, T, 3N, 64] (as one matmul on the
    three projections' kernels outputs them; no grouped-query heads): the kernel reads them in place and writes
    their gradient as one [B, T, 3N, 64] array, so no split or concat copies surround it. One device only."""
    return _attention_packed(qkv, segment_ids.astype(jnp.int32), positions.astype(jnp.int32), float(scale))
