"""GPT-2 (transformers GPT2LMHeadModel) <-> llmjax DecoderOnly: learned positions, pre-LayerNorm, tanh GELU.

GPT-2 stores its projections as Conv1D weights [in, out] and fuses q, k, v into one c_attn of width 3D.
"""

from __future__ import annotations

import numpy as np

from llmjax.interop import hf
from llmjax.models.config import ModelConfig

MODEL_TYPE, HF_CLASS = "gpt2", "GPT2LMHeadModel"
WHAT = "GPT-2"


def config_from_hf(c, *, tied: bool | None = None, **overrides) -> ModelConfig:
    """GPT2Config -> ModelConfig. `tied` (lm_head shares wte) defaults to c.tie_word_embeddings."""
    hf.check(not c.add_cross_attention, WHAT, "add_cross_attention", True, "llmjax decoders have no cross-attention")
    hf.check(not c.scale_attn_by_inverse_layer_idx, WHAT, "scale_attn_by_inverse_layer_idx", True,
             "llmjax scales every layer's attention alike")
    fields = dict(
        family="decoder", vocab_size=c.vocab_size, d_model=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
        mlp_dim=c.n_inner or 4 * c.n_embd,
        activation=hf.activation_from_hf(WHAT, "activation_function", c.activation_function, gated=False),
        norm="layernorm", norm_eps=c.layer_norm_epsilon, norm_position="pre", use_bias=True, norm_bias=True,
        position="learned", max_length=c.n_positions, scale_attention=c.scale_attn_weights,
        tie_embeddings=c.tie_word_embeddings if tied is None else tied,
        dropout_rate=float(c.resid_pdrop), attention_dropout_rate=float(c.attn_pdrop), init_std=c.initializer_range,
    )
    return hf.build_config(WHAT, **{**fields, **overrides})


def hf_config_from(cfg: ModelConfig, **kwargs):
    """ModelConfig -> GPT2Config; raises InteropError for anything GPT-2 cannot express."""
    from transformers import GPT2Config  # optional (the test extra)

    for ok, field, why in [
        (cfg.family == "decoder", "family", "GPT-2 is a decoder"),
        (cfg.position == "learned", "position", "GPT-2 has learned absolute positions"),
        (cfg.norm == "layernorm" and cfg.norm_bias, "norm", "GPT-2 uses LayerNorm with a bias"),
        (cfg.norm_position == "pre", "norm_position", "GPT-2 is pre-norm"),
        (cfg.use_bias, "use_bias", "GPT-2 projections have biases"),
        (not cfg.gated and cfg.activation in hf.TO_HF_ACTIVATION, "activation", "GPT-2 has an ungated MLP"),
        (cfg.kv_heads == cfg.num_heads, "num_kv_heads", "GPT-2 has multi-head attention only"),
        (cfg.head_size * cfg.num_heads == cfg.d_model, "head_dim", "GPT-2 needs head_dim = d_model / num_heads"),
    ]:
        hf.check(ok, f"{WHAT} export", field, getattr(cfg, field), why)
    fields = dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_length, n_embd=cfg.d_model, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.mlp_dim, activation_function=hf.TO_HF_ACTIVATION[cfg.activation],
        resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.attention_dropout_rate,
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std, scale_attn_weights=cfg.scale_attention,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if cfg.vocab_size <= 50256:  # GPT-2's default <|endoftext|> id would lie outside a smaller vocabulary
        fields.update(bos_token_id=None, eos_token_id=None)
    return GPT2Config(**{**fields, **kwargs})


def new_hf_model(hf_config, cfg: ModelConfig):
    return hf.build_hf_model(HF_CLASS, hf_config)


def _fused_qkv(layer: str, hf_layer: str, cfg: ModelConfig) -> list[hf.Rule]:
    """c_attn (Conv1D, output [q | k | v]) <-> q, k, v kernels [D, N, H] and biases [N, H]."""
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_size
    ours = tuple(f"{layer}/self_attn/{p}" for p in "qkv")
    return [
        hf.Rule(tuple(f"{o}/kernel" for o in ours), (f"{hf_layer}.attn.c_attn.weight",),
                lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
                lambda q, k, v: (np.concatenate([x.reshape(d, n * h) for x in (q, k, v)], axis=1),)),
        hf.Rule(tuple(f"{o}/bias" for o in ours), (f"{hf_layer}.attn.c_attn.bias",),
                lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
                lambda q, k, v: (np.concatenate([x.reshape(n * h) for x in (q, k, v)]),)),
    ]


def rules(cfg: ModelConfig) -> list[hf.Rule]:
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_size
    out = [
        hf.tied("embedder/tokens/embedding", "transformer.wte.weight",
                *(["lm_head.weight"] if cfg.tie_embeddings else [])),
        hf.same("embedder/positions/embedding", "transformer.wpe.weight"),
        *hf.norm("decoder/final_norm", "transformer.ln_f", bias=True),
    ]
    if not cfg.tie_embeddings:
        out += hf.linear("lm_head/proj", "lm_head", d, cfg.vocab_size, bias=False)
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder/layers/{i}", f"transformer.h.{i}"
        out += _fused_qkv(ours, theirs, cfg)
        out += hf.linear(f"{ours}/self_attn/o", f"{theirs}.attn.c_proj", (n, h), d, bias=True, conv1d=True)
        out += hf.linear(f"{ours}/mlp/wi", f"{theirs}.mlp.c_fc", d, cfg.mlp_dim, bias=True, conv1d=True)
        out += hf.linear(f"{ours}/mlp/wo", f"{theirs}.mlp.c_proj", cfg.mlp_dim, d, bias=True, conv1d=True)
        out += hf.norm(f"{ours}/self_attn_norm", f"{theirs}.ln_1", bias=True)
        out += hf.norm(f"{ours}/mlp_norm", f"{theirs}.ln_2", bias=True)
    return out


# Causal-mask buffers of older checkpoints; masks are built from positions in llmjax.
IGNORED = (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """GPT-2 state dict (HF names, numpy) -> nested params matching nnx.state(model, nnx.Param)."""
    return hf.import_params(rules(cfg), state_dict, ignore=IGNORED, what=WHAT)


def params_to_hf(model_or_state, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """llmjax model / state -> GPT2LMHeadModel state dict (numpy, HF names; LoRA merged)."""
    cfg = cfg or model_or_state.cfg
    return hf.export_params(rules(cfg), hf.model_params(model_or_state, cfg), what=WHAT)
