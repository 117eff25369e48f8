"""Named model presets, so that a config file states only its own choices.

A preset is an architecture *style* (the switches that make a model GPT-2, BERT, T5, Llama or Mixtral: norm,
its position, activation, positions, biases, tied embeddings, attention scaling, ...) and a *size* of that style
(its shape: vocabulary, d_model, layers, heads, MLP width, context length, and for the published models the
few fields that differ between releases, e.g. Llama 3's tied embeddings and RoPE theta):

    base_config(objective="causal_lm", **model_preset("gpt2", "tiny"))
    base_config(objective="causal_lm", **model_preset("gpt2", "tiny", d_model=512, num_layers=6))

`model_preset` returns a new dict of ModelConfig fields: the style's, then the size's, then the overrides,
checked by ModelConfig. A field no preset names keeps ModelConfig's default (those are GPT-2's: biases,
norm_eps 1e-5, attention scaled by 1/sqrt(head_dim), no dropout).
"""

from __future__ import annotations

from typing import Any

from llmjax.models.config import ConfigError, ModelConfig

_T5 = dict(family="encoder_decoder", activation="relu", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
           use_bias=False, position="relative", relative_buckets=32, relative_max_distance=128,
           scale_attention=False, tie_embeddings=True, scale_tied_logits=True)
_LLAMA = dict(family="decoder", activation="swiglu", norm="rmsnorm", norm_eps=1e-5, norm_position="pre",
              use_bias=False, position="rope", tie_embeddings=False)

# style -> the ModelConfig fields that define it.
STYLES: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019): pre-norm LayerNorm, tanh-approximated GELU, learned positions, tied embeddings.
    "gpt2": dict(family="decoder", activation="gelu_tanh", norm="layernorm", norm_position="pre",
                 position="learned", tie_embeddings=True),
    # BERT (Devlin et al. 2019): post-norm LayerNorm (eps 1e-12), exact GELU, learned positions, segment A/B.
    "bert": dict(family="encoder", activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
                 position="learned", type_vocab_size=2, tie_embeddings=True),
    # T5 (Raffel et al. 2020): pre-norm RMSNorm, no biases, relative position buckets, unscaled attention
    # (the scale is folded into the init), ReLU MLP, tied embeddings with the logits scaled by d_model**-0.5.
    "t5": _T5,
    # T5 v1.1: T5 with a gated-GELU MLP and untied embeddings.
    "t5_v1_1": dict(_T5, activation="geglu_tanh", tie_embeddings=False, scale_tied_logits=False),
    # Llama (Touvron et al. 2023): pre-norm RMSNorm, SwiGLU, RoPE, no biases, untied embeddings.
    "llama": _LLAMA,
    # Mixtral (Mistral AI 2023): Llama blocks whose MLP is a top-2 mixture of SwiGLU experts in every layer,
    # gate weights renormalised, dropless; router_aux_loss_coef 0.02 of the released model.
    "mixtral": dict(_LLAMA, experts_per_token=2, moe_every=1, moe_capacity_factor=0.0, moe_renormalize=True,
                    moe_aux_loss_weight=0.02, moe_z_loss_weight=0.0),
}

# The CPU-sized shape of the tiny GPT-2 and BERT configs (~5M parameters with the 8,192-token vocabulary).
_TINY = dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, max_length=256)

# style -> size -> the ModelConfig fields of that shape.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "tiny": _TINY,
        "small": dict(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, max_length=1024),
    },
    "bert": {
        "tiny": _TINY,
        "base": dict(vocab_size=30522, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, max_length=512),
    },
    "t5": {
        "base": dict(vocab_size=32128, d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12,
                     head_dim=64, mlp_dim=3072),
    },
    "t5_v1_1": {
        "tiny": dict(vocab_size=8192, d_model=256, num_layers=3, num_decoder_layers=3, num_heads=4, head_dim=64,
                     mlp_dim=640),
    },
    "llama": {
        # Llama-3.2-1B: grouped-query attention, tied embeddings, RoPE theta 500000, Llama 3's vocabulary.
        "1b": dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                   mlp_dim=8192, rope_theta=500000.0, max_length=8192, tie_embeddings=True),
        # Llama-2-7B: multi-head attention, RoPE theta 10000, Llama 2's vocabulary.
        "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, head_dim=128, mlp_dim=11008,
                   rope_theta=10000.0, max_length=4096),
    },
    "mixtral": {
        "tiny": dict(vocab_size=8192, d_model=128, num_layers=4, num_heads=4, mlp_dim=256, max_length=256,
                     tie_embeddings=True, num_experts=4),
        # Mixtral 8x7B: 8 experts of 14336, grouped-query attention, RoPE theta 1e6, 32k context.
        "8x7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                     mlp_dim=14336, rope_theta=1e6, max_length=32768, num_experts=8),
    },
}


def model_preset(style: str, size: str, **overrides) -> dict[str, Any]:
    """The ModelConfig fields of `style` at `size`, with `overrides` applied (a new dict, checked by ModelConfig:
    an unknown field or a bad value raises ConfigError naming it)."""
    if style not in STYLES:
        raise ConfigError(f"model preset: unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if size not in SIZES[style]:
        raise ConfigError(f"model preset: unknown size {size!r} for style {style!r}; "
                          f"choose one of {', '.join(SIZES[style])}")
    fields = {**STYLES[style], **SIZES[style][size], **overrides}
    ModelConfig.from_dict(fields)
    return fields
