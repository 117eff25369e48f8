"""The Pallas TPU splash-attention kernel (block-sparse flash attention) on the model's [B, T, N, H] layout.

`splash_supported` says which attentions it computes exactly; llmjax.kernels.dispatch picks it on TPU for those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.kernels.native import per_shard

SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried for the splash kernel, largest first


def _splash_block(t: int, s: int) -> int | None:
    return next((blk for blk in SPLASH_BLOCKS if t % blk == 0 and s % blk == 0), None)


def splash_supported(q, k, mask, *, bias=None, dropout: bool = False) -> bool:
    """Whether the Pallas TPU splash kernel computes exactly this attention: self-attention (T == S, so
    every row sees at least itself) over whole tiles, causal or bidirectional by index within packed
    segments, with no bias, prefix or probability dropout. `mask` is a llmjax.models.attention.AttentionMask."""
    t, s = q.shape[1], k.shape[1]
    return (t == s and _splash_block(t, s) is not None and bias is None and not dropout
            and mask.kv_prefix is None)


def splash_attention(q, k, v, mask, *, scale: float, interpret: bool = False):
    """The Pallas TPU splash-attention kernel (block-sparse flash attention: fully masked tiles are
    skipped) on [B, T, N, H] / [B, S, K, H]; see `splash_supported` for what it covers.

    Mosaic kernels are not partitioned automatically: under a mesh context (jax.set_mesh) the kernel runs
    per shard in a shard_map over the batch axes and, when they divide the heads, the tensor axis."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only Pallas code: imported when used

    def local(q, k, v, q_seg, kv_seg):
        b, t, n, h = q.shape
        s = k.shape[1]
        blk = _splash_block(t, s)
        head = sa.CausalMask((t, s)) if mask.causal else sa.FullMask((t, s))
        sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                              block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
        kernel = sa.make_splash_mha(sa.MultiHeadMask([head] * n), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
        qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
        out = jax.vmap(lambda q1, k1, v1, a, c: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(a, c)))(
            qh, kh, vh, q_seg, kv_seg)
        out = out.transpose(0, 2, 1, 3)  # [B, T, N, H]
        return jnp.where((q_seg != 0)[:, :, None, None], out, 0.0).astype(q.dtype)  # padding rows output zeros

    return per_shard(local, q, k, v, mask.q_segment_ids.astype(jnp.int32), mask.kv_segment_ids.astype(jnp.int32))
