"""Blocks, layer stacks and the three families: EncoderOnly (BERT), DecoderOnly (GPT-2 / Llama), EncoderDecoder (T5).

An encoder block is a decoder block without cross-attention and with a bidirectional mask; every
attention goes through llmjax.models.attention. Shape letters: B batch, T length, D d_model, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models.attention import Attention, KVCache, TokenLayout
from llmjax.models.config import ModelConfig
from llmjax.models.layers import MLP, Embed, Linear, Norm, RelativePositionBias, activation_fn, sinusoidal_embedding
from llmjax.models.moe import MoE, collect_stats, record


class Block(nnx.Module):
    """Self-attention (+ cross-attention) + MLP (or mixture of experts), each a residual branch; pre-norm or
    post-norm."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs, num_layers: int,
                 layer_index: int = 0):
        self.pre = cfg.norm_position == "pre"
        # GPT-2-style scaled init of the projections that write into the residual stream.
        out_std = cfg.init_std / math.sqrt(2 * num_layers)
        self.self_attn = Attention(cfg, causal=causal, rngs=rngs, out_init_std=out_std)
        self.self_attn_norm = Norm(cfg)
        if cross:
            self.cross_attn = Attention(cfg, cross=True, rngs=rngs, out_init_std=out_std)
            self.cross_attn_norm = Norm(cfg)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.moe = cfg.is_moe_layer(layer_index)
        self.mlp = (MoE if self.moe else MLP)(cfg, rngs=rngs, out_init_std=out_std)
        self.mlp_norm = Norm(cfg)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def _residual(self, x, norm, fn, deterministic):
        if self.pre:
            y, extra = fn(norm(x))
            return x + self.dropout(y, deterministic=deterministic), extra
        y, extra = fn(x)
        return norm(x + self.dropout(y, deterministic=deterministic)), extra

    def __call__(self, x, layout: TokenLayout, *, bias=None, context=None, cache=None, cross_cache=None,
                 deterministic=True):
        x, cache = self._residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(h, layout, bias=bias, cache=cache, deterministic=deterministic),
            deterministic,
        )
        if self.cross_attn is not None:
            x, _ = self._residual(
                x, self.cross_attn_norm,
                lambda h: self.cross_attn(h, layout, context=context, cache=cross_cache, deterministic=deterministic),
                deterministic,
            )
        if self.moe:  # padding tokens (segment 0) take no expert capacity and no part in the router losses
            ffn = lambda h: (self.mlp(h, layout.segment_ids > 0, deterministic=deterministic), None)
        else:
            ffn = lambda h: (self.mlp(h), None)
        x, _ = self._residual(x, self.mlp_norm, ffn, deterministic)
        return x, cache


def remat_policy(cfg: ModelConfig):
    return {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the same kind whose every Variable holds the given modules' values stacked along a new
    leading axis (logical axis 'layers'). Built from modules made one by one, so a scanned model starts from
    exactly the parameters (and dropout streams) of its unrolled twin."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.state(m) for m in modules]

    def stack(*vs):
        axes = vs[0].get_metadata().get("logical_axes")
        extra = {} if axes is None else {"logical_axes": ("layers", *axes)}
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **extra)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _bias_as_arrays(bias):
    """(graphdef, arrays) of the blockwise kernel's bias function (an nnx module: its table must enter a scan or
    checkpoint as arrays); (None, bias) for an array bias or None. `_bias_from_arrays` undoes it inside."""
    return nnx.split(bias) if isinstance(bias, nnx.Module) else (None, bias)


def _bias_from_arrays(bias_def, bias):
    return bias if bias_def is None else nnx.merge(bias_def, bias)


class Stack(nnx.Module):
    """N blocks with the stack-level pieces: T5 relative bias (computed once per forward, shared by all
    layers) and the final norm of pre-norm models.

    Unrolled (`layers`, one Block each) or scanned (`model.scan_layers`): `blocks` is one list of P blocks
    (P = model.moe_every with experts, else 1) whose parameters are stacked along a leading 'layers' axis of
    N / P, run by jax.lax.scan; layer i is slot i % P of step i // P. The compiled program then holds one
    step's blocks, whatever the depth."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, rngs: nnx.Rngs):
        self.cfg, self.causal = cfg, causal
        blocks = [Block(cfg, causal=causal, cross=cross, rngs=rngs, num_layers=num_layers, layer_index=i)
                  for i in range(num_layers)]
        self.scan_steps = num_layers // cfg.scan_period if cfg.scan_layers else 0
        if cfg.scan_layers:
            p = cfg.scan_period
            self.layers = None
            self.blocks = stack_modules([nnx.List(blocks[u:u + p]) for u in range(0, num_layers, p)])
        else:
            self.layers, self.blocks = nnx.List(blocks), None
        self.relative_bias = (
            RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs) if cfg.position == "relative" else None
        )
        self.final_norm = Norm(cfg) if cfg.norm_position == "pre" else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x, layout: TokenLayout, *, context=None, caches=None, cross_caches=None, deterministic=True):
        """x [B, T, D] laid out as `layout` -> [B, T, D] (and the updated caches when given: decoding).
        `context` [B, S, D] is the encoder output that cross-attention reads (laid out as layout.context).
        Caches are one KVCache per layer, or (scanned) one per slot of the scanned step, stacked over steps."""
        bias = None
        if self.relative_bias is not None:
            if self.cfg.attention_kernel == "blockwise":
                bias = self.relative_bias  # evaluated per tile, never [T, S] at once
            else:
                positions = layout.positions
                first = None if caches is None else caches[0].layer(0)
                kv_pos = positions if caches is None else first.positions
                if caches is not None:  # the keys are the cache slots: their positions after this write
                    kv_pos = jax.lax.dynamic_update_slice_in_dim(kv_pos, positions, first.index, axis=1)
                bias = self.relative_bias(positions, kv_pos)  # [B, N, T, S], once for all layers
        if self.blocks is not None:
            x, new_caches = self._scanned(x, layout, bias, context, caches, cross_caches, deterministic)
        else:
            new_caches = []
            for i, layer in enumerate(self.layers):
                if caches is None and self.cfg.remat != "none":
                    x = self._remat_layer(layer, x, layout, bias, context, deterministic)
                    continue
                x, c = layer(x, layout, bias=bias, context=context, cache=None if caches is None else caches[i],
                             cross_cache=None if cross_caches is None else cross_caches[i],
                             deterministic=deterministic)
                new_caches.append(c)
        if self.final_norm is not None:
            x = self.dropout(self.final_norm(x), deterministic=deterministic)
        return x, (new_caches if caches is not None else None)

    def _scanned(self, x, layout, bias, context, caches, cross_caches, deterministic):
        """The scanned stack: one jax.lax.scan step per P layers, under the remat policy when training."""
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        bias_def, bias = _bias_as_arrays(bias)

        def step(x, xs):
            unit_params, unit_rest, unit_caches, unit_cross = xs
            unit = nnx.merge(graphdef, unit_params, unit_rest)
            b = _bias_from_arrays(bias_def, bias)
            new = []
            with collect_stats() as stats:  # MoE statistics leave the scan as outputs, stacked over steps
                for j, block in enumerate(unit):
                    x, c = block(x, layout, bias=b, context=context,
                                 cache=None if unit_caches is None else unit_caches[j],
                                 cross_cache=None if unit_cross is None else unit_cross[j], deterministic=deterministic)
                    new.append(c)
            # Out go the dropout streams, advanced when training, as plain arrays (Variables must not leave the
            # trace); the parameters never change in a forward pass, so they are not copied out.
            streams = None if deterministic else jax.tree.leaves(nnx.state(unit, nnx.Not(nnx.Param)))
            return x, (streams, new if unit_caches is not None else None, stats)

        if caches is None and self.cfg.remat != "none":
            step = jax.checkpoint(step, policy=remat_policy(self.cfg), prevent_cse=False)
        x, (streams, new_caches, stats) = jax.lax.scan(step, x, (params, rest, caches, cross_caches))
        if streams is not None:
            nnx.update(self.blocks, jax.tree.unflatten(jax.tree.structure(rest), streams))
        for u in range(self.scan_steps if stats else 0):  # as the unrolled stack records them
            for s in stats:
                record(jax.tree.map(lambda a, u=u: a[u], s))
        return x, new_caches

    def cross_caches(self, encoded, context: TokenLayout) -> list[KVCache]:
        """Each decoder layer's cross-attention K/V of the encoder output (laid out as `context`), for decoding:
        one KVCache per layer, or (scanned) one per slot stacked over the scan steps."""
        if self.blocks is None:
            return [layer.cross_attn.cross_cache(encoded, context) for layer in self.layers]
        graphdef, state = nnx.split(self.blocks)
        unit_caches = lambda st: [block.cross_attn.cross_cache(encoded, context) for block in nnx.merge(graphdef, st)]
        return jax.vmap(unit_caches)(state)

    def init_caches(self, batch: int, length: int) -> list[KVCache]:
        """Empty self-attention caches: one per layer, or (scanned) one per slot stacked over the scan steps."""
        c = self.cfg
        empty = lambda: KVCache.empty(batch, length, c.kv_heads, c.head_size, jnp.dtype(c.dtype))
        if self.blocks is None:
            return [empty() for _ in self.layers]
        return [jax.tree.map(lambda a: jnp.broadcast_to(a, (self.scan_steps, *a.shape)), empty()) for _ in self.blocks]

    def _remat_layer(self, layer, x, layout, bias, context, deterministic):
        """One block under jax.checkpoint: its activations are recomputed in the backward pass.
        (Split/merge by hand: the layer's dropout RNG state must flow out of the checkpointed function.)"""
        graphdef, state = nnx.split(layer)
        bias_def, bias = _bias_as_arrays(bias)

        def body(state, x, layout, bias, context):
            block = nnx.merge(graphdef, state)
            with collect_stats() as stats:  # MoE statistics leave the checkpoint as outputs, not as tracers
                out, _ = block(x, layout, bias=_bias_from_arrays(bias_def, bias), context=context,
                               deterministic=deterministic)
            return out, jax.tree.leaves(nnx.state(block)), stats  # plain arrays: Variables must not leave the trace

        out, leaves, stats = jax.checkpoint(body, policy=remat_policy(self.cfg), prevent_cse=True)(
            state, x, layout, bias, context)
        nnx.update(layer, jax.tree.unflatten(jax.tree.structure(state), leaves))
        for s in stats:
            record(s)
        return out


class Embedder(nnx.Module):
    """Token (+ learned or sinusoidal position) (+ token-type) embeddings, with the embedding norm of
    post-norm models (BERT) and embedding dropout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.tokens = Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), **common)
        self.positions = (
            Embed(cfg.max_length, cfg.d_model, axes=(None, "embed"), **common) if cfg.position == "learned" else None
        )
        self.token_types = (
            Embed(cfg.type_vocab_size, cfg.d_model, axes=(None, "embed"), **common) if cfg.type_vocab_size else None
        )
        self.norm = Norm(cfg) if cfg.norm_position == "post" else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, tokens, positions, token_type_ids=None, deterministic=True):
        x = self.tokens(tokens)  # [B, T, D]
        if self.positions is not None:
            x = x + self.positions(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.cfg.d_model).astype(x.dtype)
        if self.token_types is not None:
            tt = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + self.token_types(tt)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x, deterministic=deterministic)


class LMHead(nnx.Module):
    """Logits over the vocabulary: tied to the token embedding, or a separate projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, use_bias: bool = False):
        self.scale = cfg.d_model ** -0.5 if cfg.scale_tied_logits else 1.0
        self.proj = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, init_std=cfg.init_std,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)), logical_axes=("vocab",)) \
            if use_bias else None

    def __call__(self, x, embedder: Embedder) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
        x = x * self.scale if self.scale != 1.0 else x
        logits = self.proj(x) if self.proj is not None else embedder.tokens.attend(x)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(logits.dtype)
        return logits.astype(jnp.float32)


class DecoderOnly(nnx.Module):
    """GPT-2 / Llama style causal decoder; a prefix mask turns it into a non-causal (prefix LM) decoder."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "decoder":
            raise ValueError(f"DecoderOnly needs model.family='decoder', got {cfg.family!r}")
        self.cfg = cfg
        self.embedder = Embedder(cfg, rngs=rngs)
        self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross=False, rngs=rngs)
        self.lm_head = LMHead(cfg, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, positions=None, *, prefix_mask=None, cache=None,
                 deterministic=True):
        """tokens [B, T] -> logits [B, T, V] (and the updated cache when one is given).

        segment_ids: packed documents 1, 2, ..., padding 0; positions restart per document;
        prefix_mask: True on tokens of the bidirectionally visible prefix (prefix LM)."""
        x, cache = self.hidden(tokens, segment_ids, positions, prefix_mask=prefix_mask, cache=cache,
                               deterministic=deterministic)
        logits = self.lm_head(x, self.embedder)
        return (logits, cache) if cache is not None else logits

    def hidden(self, tokens, segment_ids=None, positions=None, *, prefix_mask=None, cache=None, deterministic=True):
        """The decoder stack's output [B, T, D] (before the logits) and the updated cache (None without one)."""
        layout = TokenLayout.of(tokens, segment_ids, positions, prefix=prefix_mask)
        x = self.embedder(tokens, layout.positions, deterministic=deterministic)
        return self.decoder(x, layout, caches=cache, deterministic=deterministic)

    def init_cache(self, batch: int, length: int) -> list[KVCache]:
        return self.decoder.init_caches(batch, length)


class EncoderOnly(nnx.Module):
    """BERT: bidirectional encoder with the MLM head (transform + norm + tied decoder + bias), a pooler
    for NSP / sequence classification, and an optional token-classification head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "encoder":
            raise ValueError(f"EncoderOnly needs model.family='encoder', got {cfg.family!r}")
        self.cfg = cfg
        lin = dict(use_bias=True, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.embedder = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
        self.mlm_transform = Linear(cfg.d_model, cfg.d_model, axes=("embed", "mlp"), **lin)
        self.mlm_norm = Norm(cfg)
        self.mlm_act = activation_fn(cfg.activation)
        self.lm_head = LMHead(cfg, rngs=rngs, use_bias=True)
        self.pooler = Linear(cfg.d_model, cfg.d_model, axes=("embed", "mlp"), **lin) if cfg.pooler else None
        self.nsp = Linear(cfg.d_model, 2, axes=("embed", None), **lin) if cfg.pooler else None
        self.classifier = Linear(cfg.d_model, cfg.num_labels, axes=("embed", None), **lin) if cfg.num_labels else None
        self.tagger = Linear(cfg.d_model, cfg.num_tags, axes=("embed", None), **lin) if cfg.num_tags else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def encode(self, tokens, segment_ids=None, positions=None, token_type_ids=None, deterministic=True):
        layout = TokenLayout.of(tokens, segment_ids, positions)
        x = self.embedder(tokens, layout.positions, token_type_ids, deterministic=deterministic)
        x, _ = self.encoder(x, layout, deterministic=deterministic)
        return x  # [B, T, D]

    def mlm_logits(self, hidden) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return self.lm_head(self.mlm_norm(self.mlm_act(self.mlm_transform(hidden))), self.embedder)

    def pooled(self, hidden, segment_ids=None) -> jax.Array:
        """tanh(W h) of the first token of each row ([CLS]) -> [B, D]."""
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def __call__(self, tokens, segment_ids=None, positions=None, token_type_ids=None, deterministic=True):
        """-> dict with hidden [B,T,D], mlm_logits [B,T,V], and when present pooled [B,D], nsp_logits [B,2],
        class_logits [B,num_labels], tag_logits [B,T,num_tags]."""
        hidden = self.encode(tokens, segment_ids, positions, token_type_ids, deterministic)
        out = {"hidden": hidden, "mlm_logits": self.mlm_logits(hidden)}
        if self.pooler is not None:
            pooled = self.pooled(hidden)
            out["pooled"] = pooled
            out["nsp_logits"] = self.nsp(pooled).astype(jnp.float32)
            if self.classifier is not None:
                out["class_logits"] = self.classifier(self.dropout(pooled, deterministic=deterministic)).astype(jnp.float32)
        if self.tagger is not None:
            out["tag_logits"] = self.tagger(self.dropout(hidden, deterministic=deterministic)).astype(jnp.float32)
        return out


class EncoderDecoder(nnx.Module):
    """T5: encoder and causal decoder with cross-attention, sharing one token embedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs model.family='encoder_decoder', got {cfg.family!r}")
        self.cfg = cfg
        self.embedder = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, rngs=rngs)
        self.lm_head = LMHead(cfg, rngs=rngs)

    def encode(self, tokens, segment_ids=None, positions=None, deterministic=True):
        layout = TokenLayout.of(tokens, segment_ids, positions)
        x = self.embedder(tokens, layout.positions, deterministic=deterministic)
        x, _ = self.encoder(x, layout, deterministic=deterministic)
        return x

    def decode(self, tokens, encoded, encoder_segment_ids=None, encoder_positions=None, segment_ids=None,
               positions=None, *, cache=None, cross_cache=None, deterministic=True):
        """Decoder logits [B, T, V] given the encoder output [B, S, D] (or its cross_cache)."""
        context = None if encoded is None else TokenLayout.of(encoded[..., 0], encoder_segment_ids, encoder_positions)
        layout = TokenLayout.of(tokens, segment_ids, positions, context=context)
        x = self.embedder(tokens, layout.positions, deterministic=deterministic)
        x, cache = self.decoder(x, layout, context=encoded, caches=cache, cross_caches=cross_cache,
                                deterministic=deterministic)
        logits = self.lm_head(x, self.embedder)
        return (logits, cache) if cache is not None else logits

    def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None, decoder_segment_ids=None,
                 encoder_positions=None, decoder_positions=None, deterministic=True):
        enc = TokenLayout.of(encoder_tokens, encoder_segment_ids, encoder_positions)
        encoded = self.encode(encoder_tokens, enc.segment_ids, enc.positions, deterministic)
        return self.decode(decoder_tokens, encoded, enc.segment_ids, enc.positions, decoder_segment_ids,
                           decoder_positions, deterministic=deterministic)

    def init_cache(self, batch: int, length: int, encoded, encoder_segment_ids=None, encoder_positions=None):
        """Empty self-attention caches and the cross-attention K/V of `encoded`, computed once."""
        context = TokenLayout.of(encoded[..., 0], encoder_segment_ids, encoder_positions)
        return self.decoder.init_caches(batch, length), self.decoder.cross_caches(encoded, context)


FAMILY_CLASSES = {"decoder": DecoderOnly, "encoder": EncoderOnly, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs | int = 0):
    """The family module for `cfg`, initialised from `rngs` (an int seeds both params and dropout)."""
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
    return FAMILY_CLASSES[cfg.family](cfg, rngs=rngs)
