"""THE shared attention core: one module for encoder self-, decoder causal self-, prefix-LM self- and cross-attention.

Where each token sits (segment ids, positions, a prefix flag; for cross-attention also the encoder's tokens) is
`TokenLayout`, built once per forward pass and passed down to every layer; what a query may see is
`AttentionMask`, from the layouts of the queries and the keys; the [T, S] mask is built only where a kernel needs
it. The kernels give the same outputs: 'reference' (batched matmuls; causal self-attention skips the keys each
query block cannot see), 'dot_product' (jax.nn.dot_product_attention: cuDNN flash attention on GPUs),
'blockwise' (online softmax over key blocks, never materialising the [T, S] scores), and the kernels of
llmjax.kernels that take over through llmjax.kernels.dispatch where they cover an attention ('splash' on TPU,
'cpu_flash' on the CPU; 'auto' picks by platform).
Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llmjax import sharding as shd
from llmjax.kernels import dispatch
from llmjax.models.config import KERNELS, ModelConfig
from llmjax.models.layers import Linear, apply_rope, linear_group, matmul_side_by_side
# Still imported from here by llmjax.compile and tests/test_compile.py; their home is llmjax.kernels.

NEG_INF = -1e30  # finite, so fully masked rows never produce NaN
BiasFn = Callable[[jax.Array, jax.Array], jax.Array]  # ([B,T] q positions, [B,S] kv positions) -> [B|1, N, T, S]


@struct.dataclass
class TokenLayout:
    """Where each token of a batch sits: the per-token vectors every attention layer needs, built once per
    forward pass from the model's inputs (`of`) and passed down the layer stack.

    Packed documents have distinct segment ids, padding segment 0; positions restart per document. `context`
    is the layout of the encoder tokens that cross-attention reads (None without one, or while decoding from
    a cross-attention cache, which carries its own)."""

    segment_ids: jax.Array  # [B, T] int
    positions: jax.Array  # [B, T] int
    prefix: jax.Array | None = None  # [B, T] bool, True on the bidirectionally visible prefix (prefix LM)
    context: TokenLayout | None = None

    @classmethod
    def of(cls, tokens: jax.Array, segment_ids=None, positions=None, *, prefix=None, context=None) -> TokenLayout:
        """The layout of `tokens` (any [B, T] array: only its shape is read). No segment ids: one sequence per
        row, nothing padded. No positions: 0, 1, 2, ..."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return cls(segment_ids, positions, prefix, context)


@struct.dataclass
class AttentionMask:
    """Which keys each query may attend to, from per-token vectors.

    A query attends to a key iff both have the same non-zero segment id (0 = padding; packed documents
    have distinct ids) and, when `causal`, the key's position is <= the query's or the key lies in the
    bidirectional prefix (`kv_prefix`, prefix LM). Cross-attention uses causal=False and pairs decoder
    segment k with encoder segment k.
    """

    q_segment_ids: jax.Array  # [B, T] int
    kv_segment_ids: jax.Array  # [B, S] int
    q_positions: jax.Array  # [B, T] int
    kv_positions: jax.Array  # [B, S] int
    kv_prefix: jax.Array | None = None  # [B, S] bool
    causal: bool = struct.field(pytree_node=False, default=False)

    def block(self, q_sl=slice(None), kv_sl=slice(None)) -> jax.Array:
        """The boolean mask [B, t, s] for a block of queries and keys."""
        q_seg, kv_seg = self.q_segment_ids[:, q_sl], self.kv_segment_ids[:, kv_sl]
        allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
        if self.causal:
            visible = self.q_positions[:, q_sl, None] >= self.kv_positions[:, None, kv_sl]
            if self.kv_prefix is not None:
                visible = visible | self.kv_prefix[:, None, kv_sl]
            allowed = allowed & visible
        return allowed

    def dense(self) -> jax.Array:
        return self.block()

    @classmethod
    def between(cls, queries: TokenLayout, keys: TokenLayout, *, causal: bool) -> AttentionMask:
        """The mask of queries laid out as `queries` attending to keys laid out as `keys` (the prefix is the
        keys')."""
        return cls(queries.segment_ids, keys.segment_ids, queries.positions, keys.positions, keys.prefix,
                   causal=causal)


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding, with the per-token vectors the
    mask needs. Self-attention writes new tokens at `index`; cross-attention fills it once.

    Keys and values are stored heads first, [B, K, S, H], the layout the attention's batched matmuls read: a
    decode step reads the cache in place (`decode_attention`) where a tokens-first cache was transposed (copied
    whole) in every layer at every step."""

    k: jax.Array  # [B, K, S, H]
    v: jax.Array  # [B, K, S, H]
    segment_ids: jax.Array  # [B, S] int, 0 = empty slot
    positions: jax.Array  # [B, S] int
    prefix: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32, next slot to write

    @classmethod
    def empty(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        return cls(
            k=jnp.zeros((batch, kv_heads, length, head_dim), dtype),
            v=jnp.zeros((batch, kv_heads, length, head_dim), dtype),
            segment_ids=jnp.zeros((batch, length), jnp.int32),
            positions=jnp.zeros((batch, length), jnp.int32),
            prefix=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def of(cls, k, v, layout: TokenLayout) -> "KVCache":
        """A full cache of keys and values k/v [B, S, K, H] laid out as `layout` (cross-attention's)."""
        b, s = layout.segment_ids.shape
        prefix = jnp.zeros((b, s), bool) if layout.prefix is None else layout.prefix
        return cls(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), layout.segment_ids, layout.positions, prefix,
                   jnp.asarray(s, jnp.int32))

    def append(self, k, v, layout: TokenLayout) -> "KVCache":
        """Write t new tokens (k/v [B, t, K, H], laid out as `layout`) at `index`."""
        upd = lambda buf, new, axis=1: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), self.index,
                                                                           axis=axis)
        prefix = layout.prefix if layout.prefix is not None else jnp.zeros(layout.segment_ids.shape, bool)
        return KVCache(
            k=upd(self.k, k.transpose(0, 2, 1, 3), 2), v=upd(self.v, v.transpose(0, 2, 1, 3), 2),
            segment_ids=upd(self.segment_ids, layout.segment_ids),
            positions=upd(self.positions, layout.positions), prefix=upd(self.prefix, prefix),
            index=self.index + k.shape[1],
        )

    def layer(self, i: int) -> "KVCache":
        """This cache, or layer i of a cache stacked over the steps of a scanned stack (arrays [steps, B, ...])."""
        return self if self.index.ndim == 0 else jax.tree.map(lambda a: a[i], self)

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The batch rows `rows` (beam search follows each beam's parent); the write index is shared."""
        axis = self.index.ndim  # the batch axis: 0, or 1 behind the steps of a scanned stack
        return jax.tree.map(lambda a: a if a.ndim == axis else jnp.take(a, rows, axis=axis), self)

    def repeat_rows(self, k: int) -> "KVCache":
        """Each batch row repeated k times in place (row b becomes rows b*k .. b*k + k - 1)."""
        axis = self.index.ndim
        return jax.tree.map(lambda a: a if a.ndim == axis else jnp.repeat(a, k, axis=axis), self)

    @property
    def layout(self) -> TokenLayout:
        """The layout of the cached tokens (empty slots are segment 0)."""
        return TokenLayout(self.segment_ids, self.positions, self.prefix)


# ----------------------------------------------------------------------------------------------- kernels
def _bias_grouped(bias: jax.Array, kv_heads: int) -> jax.Array:
    b, n, t, s = bias.shape
    return bias.reshape(b, kv_heads, n // kv_heads, t, s)  # [B|1, K, G, T, S]


def _heads_first(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]: query head n uses kv head n // G."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _tokens_first(x: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    b, kvh, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, h)


def _bmm(a, b, contract: tuple[int, int], out_dtype=None):
    """Batched matmul over the two leading dims [B, K]: contract dim `contract[0]` of a with `contract[1]`
    of b (each 2 or 3)."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))),
                               preferred_element_type=out_dtype)


def _scores_to_probs(qh, kh, allowed, bias, keep, scale, rate):
    """(probabilities [B, K, G*T, S] in float32, the same after dropout with the `keep` mask (None: unchanged))."""
    b, kvh, g, t, h = qh.shape
    s = _bmm(qh.reshape(b, kvh, g * t, h), kh, (3, 3), jnp.float32).reshape(b, kvh, g, t, -1) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    s = jnp.where(allowed[:, None, None], s, NEG_INF)
    s = s - s.max(-1, keepdims=True)
    e = jnp.exp(s)
    p = (e / e.sum(-1, keepdims=True)).reshape(b, kvh, g * t, -1)
    return p, _dropout(p, keep, rate)


def _dropout(x, keep, rate):
    """Inverted dropout with a given keep mask (None = no dropout)."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _softmax_attention(scale: float, rate: float, qh, kh, vh, allowed, bias, keep):
    """softmax(q k^T * scale + bias, masked) v on heads-first arrays: qh [B, K, G, T, H], kh/vh [B, K, S, H],
    allowed [B, T, S] bool, bias None or [B|1, K, G, T, S], keep None or the dropout mask [B, K, G*T, S].

    The backward pass is written out (the flash-attention form: dS = P * (dP - rowsum(dO * O))) rather than
    left to autodiff, which spends several more passes over the [T, S] probabilities."""
    return _softmax_attention_fwd(scale, rate, qh, kh, vh, allowed, bias, keep)[0]


def _softmax_attention_fwd(scale, rate, qh, kh, vh, allowed, bias, keep):
    p, p_used = _scores_to_probs(qh, kh, allowed, bias, keep, scale, rate)
    b, kvh, g, t, h = qh.shape
    o = _bmm(p_used.astype(vh.dtype), vh, (3, 2))  # [B, K, G*T, H]
    return o.reshape(b, kvh, g, t, h), (qh, kh, vh, p, o, keep, bias)


def _softmax_attention_bwd(scale, rate, res, do):
    qh, kh, vh, p, o, keep, bias = res
    b, kvh, g, t, h = qh.shape
    do = do.reshape(b, kvh, g * t, h)
    dv = _bmm(_dropout(p, keep, rate).astype(do.dtype), do, (2, 2), jnp.float32)  # [B, K, S, H]
    dp = _dropout(_bmm(do, vh, (3, 3), jnp.float32), keep, rate)  # [B, K, G*T, S]
    # sum_s P dP = sum_s P_used dP_used = rowsum(dO * O): with or without dropout
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    ds = p * (dp - delta)  # d(scores), [B, K, G*T, S]; zero where masked since P is
    dq = _bmm(ds.astype(kh.dtype), kh, (3, 2), jnp.float32) * scale  # [B, K, G*T, H]
    dk = _bmm(ds.astype(qh.dtype), qh.reshape(b, kvh, g * t, h), (2, 2), jnp.float32) * scale  # [B, K, S, H]
    dbias = None
    if bias is not None:
        dbias = ds.reshape(b, kvh, g, t, -1)
        dbias = jnp.sum(dbias, axis=tuple(i for i in range(5) if bias.shape[i] == 1 and dbias.shape[i] > 1),
                        keepdims=True).astype(bias.dtype)
    return (dq.reshape(qh.shape).astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, dbias, None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def reference_attention(q, k, v, mask: AttentionMask, *, bias=None, scale: float, dropout_rate=0.0,
                        dropout_rng=None) -> jax.Array:
    """Plain attention; materialises the [B, N, T, S] scores. Softmax in float32.

    Heads first as batched matmuls, [B, K, G*T, H] x [B, K, S, H] (the G query heads sharing a kv head
    stacked along the rows): XLA:CPU runs these much faster than the equivalent 5-D einsums."""
    b, t, n, h = q.shape
    kvh = k.shape[2]
    out = _reference_heads_first(_heads_first(q, kvh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                                 bias=bias, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return _tokens_first(out).astype(q.dtype)


def _reference_heads_first(qh, kh, vh, mask: AttentionMask, *, bias, scale, dropout_rate=0.0, dropout_rng=None):
    """`reference_attention` on heads-first arrays (qh [B, K, G, T, H], kh/vh [B, K, S, H])."""
    b, kvh, g, t, h = qh.shape
    if callable(bias):
        bias = bias(mask.q_positions, mask.kv_positions)
    if bias is not None:
        bias = _bias_grouped(bias, kvh)
    keep = None
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (b, kvh, g * t, kh.shape[2]))
    allowed = mask.dense()  # [B, T, S]
    o = _softmax_attention(scale, dropout_rate if keep is not None else 0.0, qh, kh, vh, allowed, bias, keep)
    # A query that sees nothing (padding) outputs zeros (its uniform softmax row is dropped here).
    return jnp.where(allowed.any(-1)[:, None, None, :, None], o, 0.0)


def causal_query_blocks(t: int) -> int:
    """How many query blocks `causal_blocks_attention` splits T queries into (1 = not worth it)."""
    for nb in (8, 4, 2):
        if t % nb == 0 and t // nb >= 64:
            return nb
    return 1


def causal_blocks_attention(q, k, v, mask: AttentionMask, *, bias=None, scale: float, num_blocks: int) -> jax.Array:
    """Causal self-attention that skips the keys no query of a block can see: query block i (of
    `num_blocks`) attends only to keys [0, end of block i), as an exact softmax over those keys (the
    reference kernel on a narrower rectangle). With 4 blocks it computes 10/16 of the [T, T] scores.

    Exact when a query never sees a later key: causal, no bidirectional prefix, T == S, and positions
    increasing with the index within each segment (as packing and the default positions produce)."""
    t, kvh = q.shape[1], k.shape[2]
    bq = t // num_blocks
    qh, kh, vh = _heads_first(q, kvh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    outs = []
    for i in range(num_blocks):
        qs, end = slice(i * bq, (i + 1) * bq), (i + 1) * bq
        m = AttentionMask(mask.q_segment_ids[:, qs], mask.kv_segment_ids[:, :end], mask.q_positions[:, qs],
                          mask.kv_positions[:, :end], None, causal=True)
        blk_bias = bias if bias is None or callable(bias) else bias[:, :, qs, :end]
        outs.append(_reference_heads_first(qh[:, :, :, qs], kh[:, :, :end], vh[:, :, :end], m, bias=blk_bias,
                                           scale=scale))
    return _tokens_first(jnp.concatenate(outs, axis=3)).astype(q.dtype)


def dot_product_attention(q, k, v, mask: AttentionMask, *, bias=None, scale: float) -> jax.Array:
    """jax.nn.dot_product_attention (XLA here, cuDNN flash attention on GPUs when shapes allow)."""
    allowed = mask.dense()  # [B, T, S]
    if callable(bias):
        bias = bias(mask.q_positions, mask.kv_positions)
    if bias is not None:
        bias = bias.astype(q.dtype)
    o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed[:, None], scale=scale)
    return jnp.where(allowed.any(-1)[:, :, None, None], o, 0.0).astype(q.dtype)


def _pad_to(x: jax.Array, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q, k, v, mask: AttentionMask, *, bias=None, scale: float, block_size: int,
                        dropout_rate=0.0, dropout_rng=None, remat: bool = False) -> jax.Array:
    """Online-softmax attention over [block, block] tiles (Rabe & Staats; the flash-attention recurrence): the
    [T, S] scores never exist, forward or backward.

    Without a bias the backward pass is the flash-attention one (`_flash`): the forward keeps only the output and
    each query's log-sum-exp, and the backward recomputes every tile's probabilities from them, so training
    memory is linear in T + S and, under context parallelism, falls with the queries per device. With a bias
    (T5's relative bias: a function of positions, evaluated per tile, or a full array, sliced per tile), whose
    gradient reaches its parameters through autodiff, each query block's body is rematerialised instead, which
    keeps one query block's tiles against all S keys in the backward pass.

    `remat` (the model recomputes its blocks: model.remat) puts the flash kernel under jax.checkpoint, so that its
    residuals (q, and k/v gathered over the context axis) are saved or recomputed by the model's remat policy like
    any other input instead of being held per layer: for llama_1b at 32k tokens under save_dots 4.3 GiB less per
    chip (docs/scaling.md), for one recomputed forward pass of attention.
    """
    t, s_len = q.shape[1], k.shape[1]
    bq, bk = min(block_size, t), min(block_size, s_len)
    tp, sp = -(-t // bq) * bq, -(-s_len // bk) * bk
    # Padded keys get segment 0 (never visible); padded query rows are cut off at the end.
    q = _pad_to(q, 1, tp)
    k, v = _pad_to(k, 1, sp), _pad_to(v, 1, sp)
    m = AttentionMask(
        q_segment_ids=_pad_to(mask.q_segment_ids, 1, tp), kv_segment_ids=_pad_to(mask.kv_segment_ids, 1, sp),
        q_positions=_pad_to(mask.q_positions, 1, tp), kv_positions=_pad_to(mask.kv_positions, 1, sp),
        kv_prefix=None if mask.kv_prefix is None else _pad_to(mask.kv_prefix, 1, sp), causal=mask.causal,
    )
    rate = dropout_rate if dropout_rate > 0.0 and dropout_rng is not None else 0.0
    if bias is None:
        flash = functools.partial(_flash, scale, rate, bq, bk)
        out = (jax.checkpoint(flash) if remat else flash)(q, k, v, m, dropout_rng if rate else None)
    else:
        if not callable(bias):
            bias = _pad_to(_pad_to(bias, 2, tp), 3, sp)
        out = _blockwise_remat(q, k, v, m, bias, scale=scale, bq=bq, bk=bk, rate=rate, rng=dropout_rng)
    return out[:, :t].astype(q.dtype)


def _tile_scores(q_blk, k_blk, m: AttentionMask, qi, ki, bq: int, bk: int, scale: float, bias=None):
    """Scores [B, K, G, bq, bk] (float32, NEG_INF where masked) of query block qi ([B, bq, K, G, H]) against key
    block ki ([B, bk, K, H]), and the tile's mask [B, 1, 1, bq, bk]."""
    sl = lambda a, i, size: jax.lax.dynamic_slice_in_dim(a, i * size, size, axis=1)
    q_pos, kv_pos = sl(m.q_positions, qi, bq), sl(m.kv_positions, ki, bk)
    kv_pre = None if m.kv_prefix is None else sl(m.kv_prefix, ki, bk)
    allowed = AttentionMask(sl(m.q_segment_ids, qi, bq), sl(m.kv_segment_ids, ki, bk), q_pos, kv_pos, kv_pre,
                            causal=m.causal).dense()[:, None, None]
    s = jnp.einsum("btkgh,bskh->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        if callable(bias):
            tb = bias(q_pos, kv_pos)
        else:
            tb = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(bias, qi * bq, bq, 2), ki * bk, bk, 3)
        s = s + _bias_grouped(tb, k_blk.shape[2])
    return jnp.where(allowed, s, NEG_INF), allowed


def _tile_keep(rng, qi, ki, rate: float, shape):
    """The dropout keep mask of tile (qi, ki): drawn from (rng, qi, ki), so the backward pass redraws it."""
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, qi), ki), 1.0 - rate, shape)


def _online_softmax_rows(q_blk, kb, vb, m, qi, *, bq, bk, scale, rate, rng, bias=None):
    """One query block [B, bq, K, G, H] against all key blocks (kb/vb [B, nk, bk, K, H]): the flash recurrence.
    Returns the unnormalised output [B, K, G, bq, H], the normaliser and the running max ([B, K, G, bq])."""
    b, _, kvh, g, h = q_blk.shape

    def step(carry, ki):
        mx, l, acc = carry
        s, allowed = _tile_scores(q_blk, kb[:, ki], m, qi, ki, bq, bk, scale, bias)
        mx_new = jnp.maximum(mx, s.max(-1))
        p = jnp.exp(s - mx_new[..., None]) * allowed
        corr = jnp.exp(mx - mx_new)
        l = l * corr + p.sum(-1)
        if rate:
            p = _dropout(p, _tile_keep(rng, qi, ki, rate, p.shape), rate)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskh->bkgth", p.astype(vb.dtype), vb[:, ki],
                                                 preferred_element_type=jnp.float32)
        return (mx_new, l, acc), None

    init = (jnp.full((b, kvh, g, bq), NEG_INF, jnp.float32), jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, h), jnp.float32))
    (mx, l, acc), _ = jax.lax.scan(step, init, jnp.arange(kb.shape[1]))
    return acc, l, mx


def _blocks(x, size):
    """[B, L, ...] -> [B, L / size, size, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])


def _blockwise_remat(q, k, v, m, bias, *, scale, bq, bk, rate, rng):
    """The blockwise kernel with a bias: autodiff through each query block's rematerialised scan."""
    b, tp, n, h = q.shape
    kvh = k.shape[2]
    qb, kb, vb = _blocks(q.reshape(b, tp, kvh, n // kvh, h), bq), _blocks(k, bk), _blocks(v, bk)

    @jax.checkpoint
    def one_query_block(qi):
        acc, l, _ = _online_softmax_rows(qb[:, qi], kb, vb, m, qi, bq=bq, bk=bk, scale=scale, rate=rate, rng=rng,
                                         bias=bias)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows that see nothing stay zero
        return out.transpose(0, 3, 1, 2, 4).reshape(b, bq, n, h)

    blocks = jax.lax.map(one_query_block, jnp.arange(tp // bq))  # [nq, B, bq, N, H]
    return blocks.transpose(1, 0, 2, 3, 4).reshape(b, tp, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash(scale: float, rate: float, bq: int, bk: int, q, k, v, m: AttentionMask, rng):
    """Blockwise attention without a bias on padded q [B, Tp, N, H], k/v [B, Sp, K, H] (block multiples), with
    the flash-attention backward pass (Dao et al. 2022): dS = P * (dP - rowsum(dO * O)), P recomputed per tile
    from the saved log-sum-exp, the dropout masks redrawn from `rng`."""
    return _flash_fwd(scale, rate, bq, bk, q, k, v, m, rng)[0]


def _flash_fwd(scale, rate, bq, bk, q, k, v, m, rng):
    b, tp, n, h = q.shape
    kvh = k.shape[2]
    qb, kb, vb = _blocks(q.reshape(b, tp, kvh, n // kvh, h), bq), _blocks(k, bk), _blocks(v, bk)

    def one_query_block(qi):
        acc, l, mx = _online_softmax_rows(qb[:, qi], kb, vb, m, qi, bq=bq, bk=bk, scale=scale, rate=rate, rng=rng)
        seen = l > 0  # rows that see nothing output zero and get no gradient (lse +inf: P = 0)
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, bq, n, h).astype(q.dtype), lse  # lse [B, K, G, bq]

    out, lse = jax.lax.map(one_query_block, jnp.arange(tp // bq))  # [nq, B, bq, N, H], [nq, B, K, G, bq]
    out = out.transpose(1, 0, 2, 3, 4).reshape(b, tp, n, h)
    return out, (q, k, v, m, rng, out, lse)


def _flash_bwd(scale, rate, bq, bk, res, do):
    q, k, v, m, rng, out, lse = res
    b, tp, n, h = q.shape
    kvh = k.shape[2]
    g = n // kvh
    heads = lambda x: _blocks(x.reshape(b, tp, kvh, g, h), bq)  # [B, nq, bq, K, G, H]
    qb, dob, kb, vb = heads(q), heads(do.astype(q.dtype)), _blocks(k, bk), _blocks(v, bk)
    # rowsum(dO * O) per query, [nq, B, K, G, bq] like lse (with dropout too: see _softmax_attention_bwd)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1).reshape(b, tp // bq, bq, kvh, g)
    delta = delta.transpose(1, 0, 3, 4, 2)

    def key_block(dq, ki):  # dK, dV of key block ki over all query blocks; dQ accumulated across key blocks
        k_blk, v_blk = kb[:, ki], vb[:, ki]

        def query_block(carry, qi):
            dq, dk, dv = carry
            q_blk, do_blk = qb[:, qi], dob[:, qi]
            s, allowed = _tile_scores(q_blk, k_blk, m, qi, ki, bq, bk, scale)
            p = jnp.exp(s - lse[qi][..., None]) * allowed  # [B, K, G, bq, bk], normalised
            dp = jnp.einsum("btkgh,bskh->bkgts", do_blk, v_blk, preferred_element_type=jnp.float32)
            p_used = p
            if rate:
                keep = _tile_keep(rng, qi, ki, rate, p.shape)
                p_used, dp = _dropout(p, keep, rate), _dropout(dp, keep, rate)
            dv = dv + jnp.einsum("bkgts,btkgh->bskh", p_used.astype(q.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[qi][..., None])).astype(q.dtype)
            dq = dq.at[:, qi].add(jnp.einsum("bkgts,bskh->btkgh", ds, k_blk, preferred_element_type=jnp.float32))
            dk = dk + jnp.einsum("bkgts,btkgh->bskh", ds, q_blk, preferred_element_type=jnp.float32)
            return (dq, dk, dv), None

        zeros = jnp.zeros((b, bk, kvh, h), jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(query_block, (dq, zeros, zeros), jnp.arange(tp // bq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(k.shape[1] // bk))
    dk, dv = (x.transpose(1, 0, 2, 3, 4).reshape(k.shape) for x in (dk, dv))  # [nk, B, bk, K, H] -> [B, Sp, K, H]
    return ((dq.reshape(q.shape) * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype),
            None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend(q, k, v, mask: AttentionMask, *, kernel: str, bias=None, scale: float, block_size: int = 512,
           dropout_rate: float = 0.0, dropout_rng=None, remat: bool = False) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] with the chosen kernel.

    `bias` is None, an array [B|1, N, T, S], or a function of (q positions, kv positions) returning one.
    Dropout on the attention probabilities is applied when `dropout_rng` is given (training).
    'auto' picks by platform (`dispatch.resolve_kernel`); the kernels of llmjax.kernels ('splash', 'cpu_flash')
    and 'dot_product' fall back to 'reference' for the attentions they do not cover (`dispatch.attention`;
    dot_product: dropout). `remat`: the model recomputes its blocks (see blockwise_attention).
    """
    kernel = dispatch.resolve_kernel(kernel)
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    out = dispatch.attention(q, k, v, mask, kernel=kernel, bias=bias, scale=scale, dropout=dropout)
    if out is not None:
        return out
    if kernel in dispatch.ATTENTION_KERNELS or (kernel == "dot_product" and dropout):
        kernel = "reference"
    if kernel == "reference":
        if (mask.causal and mask.kv_prefix is None and q.shape[1] == k.shape[1] and not dropout
                and causal_query_blocks(q.shape[1]) > 1):
            return causal_blocks_attention(q, k, v, mask, bias=bias, scale=scale,
                                           num_blocks=causal_query_blocks(q.shape[1]))
        return reference_attention(q, k, v, mask, bias=bias, scale=scale, dropout_rate=dropout_rate,
                                   dropout_rng=dropout_rng)
    if kernel == "dot_product":
        return dot_product_attention(q, k, v, mask, bias=bias, scale=scale)
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, mask, bias=bias, scale=scale, block_size=block_size,
                                   dropout_rate=dropout_rate, dropout_rng=dropout_rng, remat=remat)
    raise ValueError(f"model.attention_kernel: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def cached_attention(q, kh, vh, mask: AttentionMask, *, kernel: str, bias=None, scale: float, block_size: int = 512,
                     dropout_rate: float = 0.0, dropout_rng=None) -> jax.Array:
    """q [B, T, N, H] against the heads-first keys and values of a KVCache, kh/vh [B, K, S, H] -> [B, T, N, H].

    A decode step (one query per row) runs the reference kernel's batched matmuls on the cache where it lies (its
    scores [B, N, 1, S] are small): every other kernel takes tokens-first keys and values, which would copy the
    whole cache in every layer at every step. Longer queries (a prompt's prefill) take that copy once and run
    `kernel` through `attend`."""
    if q.shape[1] == 1:
        out = _reference_heads_first(_heads_first(q, kh.shape[1]), kh, vh, mask, bias=bias, scale=scale,
                                     dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        return _tokens_first(out).astype(q.dtype)
    tokens_first = lambda a: a.transpose(0, 2, 1, 3)  # [B, K, S, H] -> [B, S, K, H]
    return attend(q, tokens_first(kh), tokens_first(vh), mask, kernel=kernel, bias=bias, scale=scale,
                  block_size=block_size, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


# --------------------------------------------------------------------------------- context parallelism
def _context_parallel() -> bool:
    """Whether this step's mesh splits sequences (a `context` axis of size > 1)."""
    layout = shd.current_layout()
    return layout is not None and layout[0].shape.get("context", 1) > 1


def context_parallel_attention(q, k, v, mask: AttentionMask, *, bias, dropout_rng, attend_fn) -> jax.Array | None:
    """Attention with the sequence split over the `context` mesh axis (under a step's mesh; None elsewhere,
    or when a length does not divide): each device keeps its queries [B, T/c, N, H] and gathers the keys and
    values [B, S, K, H] of all c shards, then attends locally with `attend_fn(q, k, v, mask, bias, rng)`.

    All-gather rather than ring attention: with grouped-query attention K and V are a fraction of the queries'
    size, one gather per layer overlaps with compute as well as c ring steps, and any mask works unchanged —
    causal, prefix, packed segments and padding are decided by the gathered per-token vectors (positions and
    segment ids), never by offsets. The attention's temporaries (scores [B, N, T/c, S]) fall as 1/c."""
    layout = shd.current_layout()
    if layout is None:
        return None
    mesh, _ = layout
    c = mesh.shape.get("context", 1)
    batch = shd.batch_axes(mesh)
    if c == 1 or q.shape[1] % c or k.shape[1] % c or (batch and q.shape[0] % math.prod(mesh.shape[a] for a in batch)):
        return None
    rows = (batch if len(batch) > 1 else batch[0]) if batch else None
    P = jax.sharding.PartitionSpec
    seq, tok = P(rows, "context"), P(rows, "context", None, None)
    mask_spec = AttentionMask(seq, seq, seq, seq, None if mask.kv_prefix is None else seq, causal=mask.causal)
    bias_spec = None if bias is None else P(rows if bias.shape[0] > 1 else None, None, "context", None)

    def local(q, k, v, m, bias, rng):
        gather = lambda a: jax.lax.all_gather(a, "context", axis=1, tiled=True)
        m = AttentionMask(m.q_segment_ids, gather(m.kv_segment_ids), m.q_positions, gather(m.kv_positions),
                          None if m.kv_prefix is None else gather(m.kv_prefix), causal=m.causal)
        if rng is not None:  # every shard draws its own dropout mask
            for axis in (*batch, "context"):
                rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
        return attend_fn(q, gather(k), gather(v), m, bias, rng)

    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, mask_spec, bias_spec, P()), out_specs=tok,
                         check_vma=False)(q, k, v, mask, bias, dropout_rng)


# ------------------------------------------------------------------------------------------------ module
class Attention(nnx.Module):
    """Projections around `attend`: self-attention (causal or not, fixed per layer), or cross-attention to a
    context (the encoder output) with `cross`."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = False, cross: bool = False, rngs: nnx.Rngs,
                 out_init_std: float | None = None):
        self.cfg, self.cross = cfg, cross
        self.causal = causal and not cross
        n, kvh, h, d = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.d_model

        def proj(name, in_shape, out_shape, axes, std):
            return Linear(
                in_shape, out_shape, axes=axes, use_bias=cfg.use_bias, init_std=std, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, lora_rank=cfg.lora_rank if name in cfg.lora_targets else 0,
                lora_alpha=cfg.lora_alpha, rngs=rngs,
            )

        self.q = proj("q", d, (n, h), ("embed", "heads", "head_dim"), cfg.init_std)
        self.k = proj("k", d, (kvh, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.v = proj("v", d, (kvh, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.o = proj("o", (n, h), d, ("heads", "head_dim", "embed"), out_init_std or cfg.init_std)
        self.scale = 1.0 / math.sqrt(h) if cfg.scale_attention else 1.0
        self.rope = cfg.position == "rope" and not cross
        self.dropout_rate = cfg.attention_dropout_rate
        self.rngs = rngs.fork() if cfg.attention_dropout_rate > 0 else None

    def kv(self, context: jax.Array, positions: jax.Array):
        """Project (and rotate) keys and values: [B, S, D] -> 2 x [B, S, K, H]."""
        k, v = self.k(context), self.v(context)
        if self.rope:
            k = apply_rope(k, positions, self.cfg.rope_theta)
        return k, v

    def cross_cache(self, context: jax.Array, layout: TokenLayout) -> KVCache:
        """Cross-attention keys/values of the encoder output (laid out as `layout`), computed once for decoding."""
        return KVCache.of(*self.kv(context, layout.positions), layout.replace(prefix=None))

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        layout: TokenLayout,  # of x's tokens (cross-attention: layout.context, of the context's tokens)
        *,
        context: jax.Array | None = None,  # [B, S, D] encoder output (cross-attention)
        bias: jax.Array | BiasFn | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        if self.cross:
            q = self.q(x)  # [B, T, N, H]
            if cache is not None:  # encoder K/V computed once by cross_cache
                k, v, keys = cache.k, cache.v, cache.layout
            else:
                k, v = self.kv(context, layout.context.positions)
                keys = layout.context
            mask = AttentionMask.between(layout, keys, causal=False)
        else:
            dropout = not deterministic and self.dropout_rate > 0
            if cache is None and not self.rope and not _context_parallel():  # q, k and v straight from their
                # projection: a kernel may take over
                heads = lambda n: jax.ShapeDtypeStruct((*x.shape[:2], n, self.cfg.head_size), self.q.dtype)
                out = dispatch.packed_self_attention(
                    lambda: matmul_side_by_side(x, (self.q, self.k, self.v)),
                    AttentionMask.between(layout, layout, causal=self.causal), q=heads(self.cfg.num_heads),
                    kv=heads(self.cfg.kv_heads), kernel=self.cfg.attention_kernel, bias=bias, scale=self.scale,
                    dropout=dropout)
                if out is not None:
                    return self.o(out), cache
            q, k, v = linear_group(x, (self.q, self.k, self.v))  # [B, T, N|K, H]
            if self.rope:
                q = apply_rope(q, layout.positions, self.cfg.rope_theta)
                k = apply_rope(k, layout.positions, self.cfg.rope_theta)
            keys = layout
            if cache is not None:
                cache = cache.append(k, v, layout)
                k, v, keys = cache.k, cache.v, cache.layout
            mask = AttentionMask.between(layout, keys, causal=self.causal)
        dropout_rng = None
        if not deterministic and self.dropout_rate > 0:
            dropout_rng = self.rngs.dropout()
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cache is not None:  # k, v [B, K, S, H]: the cache's, heads first
            out = cached_attention(q, k, v, mask, kernel=self.cfg.attention_kernel, bias=bias, scale=self.scale,
                                   block_size=self.cfg.attention_block_size, dropout_rate=self.dropout_rate,
                                   dropout_rng=dropout_rng)
            return self.o(out), cache
        remat = self.cfg.remat != "none"  # the stack recomputes this block in the backward pass
        out = None
        if _context_parallel():
            if bias is not None and not isinstance(bias, jax.Array):  # T5's bias function: as an array [B, N, T, S]
                bias = bias(mask.q_positions, mask.kv_positions)
            # Per shard the memory-efficient blockwise kernel (the platform kernels assume queries and keys that
            # start together), or the reference one when the config asks for it.
            kernel = "reference" if self.cfg.attention_kernel == "reference" else "blockwise"
            out = context_parallel_attention(q, k, v, mask, bias=bias, dropout_rng=dropout_rng, attend_fn=(
                lambda q, k, v, m, b, rng: attend(q, k, v, m, kernel=kernel, bias=b, scale=self.scale,
                                                  block_size=self.cfg.attention_block_size, remat=remat,
                                                  dropout_rate=self.dropout_rate, dropout_rng=rng)))
        if out is None:
            out = attend(q, k, v, mask, kernel=self.cfg.attention_kernel, bias=bias, scale=self.scale,
                         block_size=self.cfg.attention_block_size, dropout_rate=self.dropout_rate,
                         dropout_rng=dropout_rng, remat=remat)
        return self.o(out), cache
