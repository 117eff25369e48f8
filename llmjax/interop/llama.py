"""Llama (transformers LlamaForCausalLM) <-> llmjax DecoderOnly: RMSNorm, rotary positions (default RoPE),
SwiGLU MLP (gate_proj -> wi_0, up_proj -> wi_1, down_proj -> wo), grouped-query attention."""

from __future__ import annotations

import numpy as np

from llmjax.interop import hf
from llmjax.models.config import ModelConfig

MODEL_TYPE, HF_CLASS = "llama", "LlamaForCausalLM"
WHAT = "Llama"


def _rope_theta(c) -> float:
    """rope_theta of a default-RoPE config; transformers 5 keeps it in `rope_parameters`."""
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    hf.check(not any(isinstance(v, dict) for v in rope.values()), WHAT, "rope_parameters", rope,
             "per-layer-type RoPE settings are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    hf.check(kind == "default", WHAT, "rope_parameters.rope_type", kind,
             "llmjax implements the default (unscaled) RoPE only; scaled variants (linear, dynamic, yarn, llama3, "
             "longrope, ...) are not supported")
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    hf.check(partial in (None, 1.0), WHAT, "partial_rotary_factor", partial, "llmjax rotates the whole head")
    return float(rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0))


def config_fields(c, what: str, *, use_bias: bool, tied: bool | None) -> dict:
    """The ModelConfig fields of a Llama-style HF config (Llama, Mixtral): a pre-RMSNorm rotary decoder with
    gated MLPs. `tied` (lm_head shares embed_tokens) defaults to c.tie_word_embeddings."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = c.num_key_value_heads or c.num_attention_heads
    return dict(
        family="decoder", vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=None if kv_heads == c.num_attention_heads else kv_heads,
        head_dim=None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
        mlp_dim=c.intermediate_size, activation=hf.activation_from_hf(what, "hidden_act", c.hidden_act, gated=True),
        norm="rmsnorm", norm_eps=c.rms_norm_eps, norm_position="pre", use_bias=use_bias, norm_bias=False,
        position="rope", rope_theta=_rope_theta(c), max_length=c.max_position_embeddings,
        tie_embeddings=c.tie_word_embeddings if tied is None else tied,
        dropout_rate=0.0, attention_dropout_rate=float(c.attention_dropout), init_std=c.initializer_range,
    )


def config_from_hf(c, *, tied: bool | None = None, **overrides) -> ModelConfig:
    """LlamaConfig -> ModelConfig. `tied` (lm_head shares embed_tokens) defaults to c.tie_word_embeddings."""
    hf.check(c.attention_bias == c.mlp_bias, WHAT, "attention_bias/mlp_bias", (c.attention_bias, c.mlp_bias),
             "llmjax has one use_bias switch for attention and MLP projections")
    fields = config_fields(c, WHAT, use_bias=c.attention_bias, tied=tied)
    return hf.build_config(WHAT, **{**fields, **overrides})


def check_exportable(cfg: ModelConfig, what: str, extra: tuple = ()) -> None:
    """Raise InteropError unless `cfg` is a Llama-style decoder (plus the `extra` (ok, field, why) checks)."""
    for ok, field, why in [
        (cfg.family == "decoder", "family", f"{what} is a decoder"),
        (cfg.position == "rope", "position", f"{what} uses rotary positions"),
        (cfg.norm == "rmsnorm", "norm", f"{what} uses RMSNorm"),
        (cfg.norm_position == "pre", "norm_position", f"{what} is pre-norm"),
        (cfg.gated, "activation", f"{what}'s MLPs are gated (swiglu, geglu, ...)"),
        (cfg.scale_attention, "scale_attention", f"{what} scales q.k by 1/sqrt(head_dim)"),
        *extra,
    ]:
        hf.check(ok, f"{what} export", field, getattr(cfg, field), why)


def hf_fields(cfg: ModelConfig) -> dict:
    """The HF config fields of a Llama-style decoder (Llama, Mixtral)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size, hidden_act=hf.TO_HF_ACTIVATION[hf.UNGATED[cfg.activation]],
        max_position_embeddings=cfg.max_length, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.attention_dropout_rate, initializer_range=cfg.init_std,
    )


def hf_config_from(cfg: ModelConfig, **kwargs):
    """ModelConfig -> LlamaConfig; raises InteropError for anything Llama cannot express."""
    from transformers import LlamaConfig  # optional (the test extra)

    check_exportable(cfg, WHAT)
    fields = dict(hf_fields(cfg), attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    return LlamaConfig(**{**fields, **kwargs})


def new_hf_model(hf_config, cfg: ModelConfig):
    return hf.build_hf_model(HF_CLASS, hf_config)


def rules(cfg: ModelConfig) -> list[hf.Rule]:
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim
    b = cfg.use_bias
    out = [
        hf.tied("embedder/tokens/embedding", "model.embed_tokens.weight",
                *(["lm_head.weight"] if cfg.tie_embeddings else [])),
        *hf.norm("decoder/final_norm", "model.norm", bias=False),
    ]
    if not cfg.tie_embeddings:
        out += hf.linear("lm_head/proj", "lm_head", d, cfg.vocab_size, bias=False)
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder/layers/{i}", f"model.layers.{i}"
        out += hf.linear(f"{ours}/self_attn/q", f"{theirs}.self_attn.q_proj", d, (n, h), bias=b)
        out += hf.linear(f"{ours}/self_attn/k", f"{theirs}.self_attn.k_proj", d, (k, h), bias=b)
        out += hf.linear(f"{ours}/self_attn/v", f"{theirs}.self_attn.v_proj", d, (k, h), bias=b)
        out += hf.linear(f"{ours}/self_attn/o", f"{theirs}.self_attn.o_proj", (n, h), d, bias=b)
        out += hf.linear(f"{ours}/mlp/wi_0", f"{theirs}.mlp.gate_proj", d, f, bias=b)
        out += hf.linear(f"{ours}/mlp/wi_1", f"{theirs}.mlp.up_proj", d, f, bias=b)
        out += hf.linear(f"{ours}/mlp/wo", f"{theirs}.mlp.down_proj", f, d, bias=b)
        out += hf.norm(f"{ours}/self_attn_norm", f"{theirs}.input_layernorm", bias=False)
        out += hf.norm(f"{ours}/mlp_norm", f"{theirs}.post_attention_layernorm", bias=False)
    return out


# Rotary frequency buffers of older checkpoints; llmjax computes them from rope_theta.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """LlamaForCausalLM state dict (HF names, numpy) -> nested params matching nnx.state(model, nnx.Param)."""
    return hf.import_params(rules(cfg), state_dict, ignore=IGNORED, what=WHAT)


def params_to_hf(model_or_state, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """llmjax model / state -> LlamaForCausalLM state dict (numpy, HF names; LoRA merged)."""
    cfg = cfg or model_or_state.cfg
    return hf.export_params(rules(cfg), hf.model_params(model_or_state, cfg), what=WHAT)
