"""The softmax statistics of the cross-entropy loss for XLA:CPU: a C++ kernel (cpu_cross_entropy.cc) called
through jax.ffi.

For a [rows, V] float32 logits array XLA:CPU runs one pass over the logits per statistic: the max, the sum of
exponentials, the accuracy's compare-and-reduce; the kernel reads each row once for all of them, and writes
the gradient in one more pass. The loss (llmjax.objectives.losses) gets `softmax_stats` through
llmjax.kernels.dispatch on one CPU device for float32 logits (`usable`), XLA everywhere else and with
LLMJAX_CPU_KERNELS=0.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from llmjax.kernels import native

log = logging.getLogger("llmjax")

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (logs why not, once)."""
    if not native.enabled():
        return False
    try:
        native.register("cpu_cross_entropy", FLAGS, {"llmjax_softmax_stats": "SoftmaxStats",
                                                     "llmjax_softmax_stats_bwd": "SoftmaxStatsBwd"})
    except (AttributeError, OSError, RuntimeError) as e:
        log.warning("llmjax CPU cross-entropy kernel unavailable (%s); using XLA's", e)
        return False
    return True


def usable(logits: jax.Array) -> bool:
    """Whether `softmax_stats` should run on the kernel: float32 logits with a non-empty vocabulary, traced for one
    CPU device (the kernel is not partitioned), and the kernel available."""
    return (logits.ndim >= 1 and logits.dtype == jnp.float32 and logits.shape[-1] > 0
            and native.platform() == "cpu" and native.one_device() and available())


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _stats(logits, targets, with_mean):
    return _stats_fwd(logits, targets, with_mean)[0]


def _stats_fwd(logits, targets, with_mean):
    rows = logits.shape[0]
    lse, target_logit, correct, mean = jax.ffi.ffi_call(
        "llmjax_softmax_stats",
        (_f32(rows), _f32(rows), jax.ShapeDtypeStruct((rows,), jnp.bool_), _f32(rows if with_mean else 0)),
    )(logits, targets)
    return (lse, target_logit, mean if with_mean else None, correct), (logits, targets, lse)


def _stats_bwd(with_mean, res, grads):
    logits, targets, lse = res
    g_lse, g_target, g_mean, _ = grads
    d = jax.ffi.ffi_call("llmjax_softmax_stats_bwd", _f32(*logits.shape))(
        logits, targets, lse, g_lse, g_target, g_mean if with_mean else jnp.zeros((0,), jnp.float32))
    return d, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def softmax_stats(logits: jax.Array, targets: jax.Array, with_mean: bool):
    """(logsumexp, target logit, mean logit or None, argmax == target) over the last axis of float32 logits
    [..., V] with integer targets [...]; differentiable in the logits."""
    native.require(available(), "cross-entropy")
    lead = logits.shape[:-1]
    out = _stats(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).astype(jnp.int32), with_mean)
    return tuple(None if a is None else a.reshape(lead) for a in out)
