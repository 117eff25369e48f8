"""Training FLOPs of one example, counted the same way for every family (matmuls + attention scores),
for MFU and for matching objective-comparison cells on compute."""

from __future__ import annotations

from llmjax.models.config import ModelConfig


def _attention_proj(cfg: ModelConfig) -> tuple[int, int]:
    """Weights applied per query token (q, o) and per key token (k, v)."""
    q_o = 2 * cfg.d_model * cfg.num_heads * cfg.head_size
    k_v = 2 * cfg.d_model * cfg.kv_heads * cfg.head_size
    return q_o, k_v


def _mlp(cfg: ModelConfig, dim: int | None = None) -> int:
    return (3 if cfg.gated else 2) * cfg.d_model * (dim or cfg.mlp_dim)


def _ffn(cfg: ModelConfig, num_layers: int) -> int:
    """Feed-forward weights applied per token, summed over a stack of `num_layers`: an MoE layer counts its
    active parameters only (router + the top-k experts + the shared expert)."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(num_layers))
    moe = cfg.d_model * cfg.num_experts + (cfg.experts_per_token + cfg.moe_shared_expert) * _mlp(cfg, cfg.expert_mlp_dim)
    return (num_layers - moe_layers) * _mlp(cfg) + moe_layers * moe


def _scores(cfg: ModelConfig, t: int, s: int) -> int:
    """Multiply-adds of q.k and p.v for t queries over s keys (the full rectangle, causal or not)."""
    return 2 * t * s * cfg.num_heads * cfg.head_size


def forward_macs(cfg: ModelConfig, length: int, decoder_length: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one example (embedding lookups are free)."""
    q_o, k_v = _attention_proj(cfg)
    per_layer = q_o + k_v
    head = cfg.d_model * cfg.vocab_size
    stack = lambda n, t: n * (t * per_layer + _scores(cfg, t, t)) + t * _ffn(cfg, n)  # self-attention + FFN
    if cfg.family == "decoder":
        return stack(cfg.num_layers, length) + length * head
    if cfg.family == "encoder":
        mlm_head = cfg.d_model * cfg.d_model + head  # transform + tied decoder, on every position
        pooler = (cfg.d_model * cfg.d_model + 2 * cfg.d_model) if cfg.pooler else 0
        return stack(cfg.num_layers, length) + length * mlm_head + pooler
    td = decoder_length if decoder_length is not None else length
    encoder = stack(cfg.num_layers, length)
    cross = td * q_o + length * k_v + _scores(cfg, td, length)
    return encoder + stack(cfg.decoder_layers, td) + cfg.decoder_layers * cross + td * head


def train_flops(cfg: ModelConfig, length: int, decoder_length: int | None = None) -> float:
    """FLOPs of one training example: 2 FLOPs per multiply-add, backward = 2 x forward."""
    return 3 * 2 * float(forward_macs(cfg, length, decoder_length))
