"""Weighted softmax cross-entropy (float32, label smoothing, z-loss) returned as sums, so that callers can
average exactly over micro-batches and devices; plus the BERT MLM + NSP loss."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax.kernels import dispatch


class LossSums(NamedTuple):
    """Sums over the weighted tokens of a batch. Add them across micro-batches/devices, then divide."""

    loss: jax.Array  # sum of weight * (cross-entropy + z-loss)
    weight: jax.Array  # sum of weights
    correct: jax.Array  # sum of weights where argmax(logits) == target


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_stats(logits: jax.Array, targets: jax.Array, with_mean: bool):
    """(logsumexp, target logit, mean logit or None) over the last axis of float32 logits.

    The backward pass is one fused elementwise pass over the logits, d/dlogits = g_lse * softmax +
    g_target * onehot + g_mean / V, where autodiff of logsumexp and the target gather takes several
    (and a scatter): 26 ms less per step of configs/bench_gpt.py on a 2-core CPU."""
    mx = jnp.max(logits, axis=-1)
    lse = mx + jnp.log(jnp.sum(jnp.exp(logits - mx[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mean = jnp.mean(logits, axis=-1) if with_mean else None
    return lse, target_logit, mean


def _softmax_stats_fwd(logits, targets, with_mean):
    out = _softmax_stats(logits, targets, with_mean)
    return out, (logits, targets, out[0])


def _softmax_stats_bwd(with_mean, res, grads):
    logits, targets, lse = res
    g_lse, g_target, g_mean = grads
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    d = g_lse[..., None] * jnp.exp(logits - lse[..., None]) + jnp.where(onehot, g_target[..., None], 0.0)
    if with_mean:
        d = d + g_mean[..., None] / logits.shape[-1]
    return d, None


_softmax_stats.defvjp(_softmax_stats_fwd, _softmax_stats_bwd)


def argmax_matches(logits: jax.Array, targets: jax.Array, target_logit: jax.Array) -> jax.Array:
    """`argmax(logits, -1) == targets`, ties to the lowest index as argmax, without an arg-reduction
    (XLA:CPU runs a variadic argmax reduce ~15x slower than this one fused compare-and-reduce): the
    target wins iff no earlier logit reaches its value and no later one exceeds it."""
    logits = jax.lax.stop_gradient(logits)
    target_logit = jax.lax.stop_gradient(target_logit)[..., None]
    idx = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    t = targets[..., None]
    beaten = jnp.where(idx < t, logits >= target_logit, (idx > t) & (logits > target_logit))
    return ~jnp.any(beaten, axis=-1)


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token (loss [...], correct [...] bool) from logits [..., V] and integer targets [...].

    loss = -sum_v q_v log p_v + z_loss * logsumexp(logits)^2 with q = (1 - label_smoothing) * onehot(target)
    + label_smoothing / V (PyTorch's definition; no constant is subtracted, so a smoothed loss never reaches 0).
    The z-loss (PaLM) pulls the softmax normaliser towards 1 to keep bf16 logits from drifting.
    `correct` is argmax(logits) == target."""
    logits = logits.astype(jnp.float32)  # the softmax in the compute dtype loses too much in bf16
    targets = targets.astype(jnp.int32)
    stats = dispatch.softmax_stats(logits, targets, bool(label_smoothing))  # a kernel: all from one read
    if stats is None:
        lse, target_logit, mean_logit = _softmax_stats(logits, targets, bool(label_smoothing))
        stats = lse, target_logit, mean_logit, argmax_matches(logits, targets, target_logit)
    lse, target_logit, mean_logit, correct = stats
    loss = lse - target_logit  # -log p_target
    if label_smoothing:
        mean_log_p = mean_logit - lse  # (1/V) sum_v log p_v
        loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_p
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    return loss, correct


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> LossSums:
    """Weighted sums from logits [B, T, V] (any leading shape), targets [B, T] and weights [B, T] (None = 1)."""
    loss, correct = token_cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    weights = jnp.ones(loss.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return LossSums(
        loss=jnp.sum(loss * weights),
        weight=jnp.sum(weights),
        correct=jnp.sum(jnp.where(correct, weights, 0.0)),
    )


def mean(sums: LossSums) -> tuple[jax.Array, jax.Array]:
    """(mean loss, accuracy); 0 when the total weight is 0 (e.g. a batch of padding)."""
    denominator = jnp.maximum(sums.weight, 1e-8)
    return sums.loss / denominator, sums.correct / denominator


def mlm_nsp_loss(
    mlm_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    nsp_logits: jax.Array | None = None,
    nsp_labels: jax.Array | None = None,
    nsp_weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, LossSums]:
    """BERT pretraining sums: {"mlm": ..., "nsp": ...} ("nsp" only when nsp_logits are given).

    mlm_logits [B, T, V], targets/weights [B, T] (weights 1 at the selected tokens); nsp_logits [B, 2],
    nsp_labels [B] (mlm.NSP_IS_NEXT = 0, NSP_IS_RANDOM = 1), nsp_weights [B] (None = 1; give 0 for padding rows).
    Label smoothing and z-loss apply to the MLM part only. BERT's objective is the sum of the two means:
    mean(out["mlm"])[0] + mean(out["nsp"])[0]."""
    out = {"mlm": cross_entropy(mlm_logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)}
    if nsp_logits is not None:
        if nsp_labels is None:
            raise ValueError("mlm_nsp_loss: nsp_logits were given without nsp_labels")
        out["nsp"] = cross_entropy(nsp_logits, nsp_labels, nsp_weights)
    return out
