"""T5 (transformers T5ForConditionalGeneration) <-> llmjax EncoderDecoder: RMSNorm, no biases, unscaled
attention with relative position buckets, ReLU (original T5) or gated-GELU (T5 v1.1) MLPs.

HF keeps each stack's relative_attention_bias in its first layer; llmjax keeps it at stack level. Since
transformers 5 the T5 config always ties lm_head to the shared embedding and records the original T5's
logit rescaling as `scale_decoder_outputs` (set from the checkpoint's `tie_word_embeddings`); whether the
weights really are shared is read off the model itself (untied for T5 v1.1 checkpoints).
"""

from __future__ import annotations

import numpy as np

from llmjax.interop import hf
from llmjax.models.config import ModelConfig

MODEL_TYPE, HF_CLASS = "t5", "T5ForConditionalGeneration"
WHAT = "T5"

# llmjax activation -> T5 feed_forward_proj ("gated-gelu" means the tanh GELU, kept for old configs).
FEED_FORWARD = {
    "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu",
    "reglu": "gated-relu", "geglu": "gated-gelu_python", "geglu_tanh": "gated-gelu", "swiglu": "gated-silu",
}


def config_from_hf(c, *, tied: bool | None = None, **overrides) -> ModelConfig:
    """T5Config -> ModelConfig. `tied` (lm_head shares the embedding) defaults to c.scale_decoder_outputs,
    as in the checkpoints: the original T5 is tied and rescaled, v1.1 is untied and not rescaled."""
    hf.check(c.is_encoder_decoder, WHAT, "is_encoder_decoder", c.is_encoder_decoder,
             "llmjax imports T5ForConditionalGeneration as an encoder-decoder")
    scaled = bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings))
    tied = scaled if tied is None else tied
    hf.check(tied or not scaled, WHAT, "scale_decoder_outputs", scaled,
             "llmjax rescales decoder outputs by d_model**-0.5 only when lm_head is tied to the embedding")
    fields = dict(
        family="encoder_decoder", vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers,
        num_decoder_layers=None if c.num_decoder_layers == c.num_layers else c.num_decoder_layers,
        num_heads=c.num_heads, head_dim=None if c.d_kv * c.num_heads == c.d_model else c.d_kv, mlp_dim=c.d_ff,
        activation=hf.activation_from_hf(WHAT, "feed_forward_proj", c.dense_act_fn, gated=c.is_gated_act),
        norm="rmsnorm", norm_eps=c.layer_norm_epsilon, norm_position="pre", use_bias=False, norm_bias=False,
        position="relative", relative_buckets=c.relative_attention_num_buckets,
        relative_max_distance=c.relative_attention_max_distance, scale_attention=False,
        tie_embeddings=tied, scale_tied_logits=scaled,
        dropout_rate=float(c.dropout_rate), attention_dropout_rate=float(c.dropout_rate),
    )
    return hf.build_config(WHAT, **{**fields, **overrides})


def hf_config_from(cfg: ModelConfig, **kwargs):
    """ModelConfig -> T5Config; raises InteropError for anything T5 cannot express."""
    from transformers import T5Config  # optional (the test extra)

    for ok, field, why in [
        (cfg.family == "encoder_decoder", "family", "T5 is an encoder-decoder"),
        (cfg.position == "relative", "position", "T5 uses relative position buckets"),
        (cfg.norm == "rmsnorm", "norm", "T5 uses RMSNorm"),
        (cfg.norm_position == "pre", "norm_position", "T5 is pre-norm"),
        (not cfg.use_bias, "use_bias", "T5 projections have no biases"),
        (not cfg.scale_attention, "scale_attention", "T5 does not scale q.k by 1/sqrt(head_dim)"),
        (cfg.kv_heads == cfg.num_heads, "num_kv_heads", "T5 has multi-head attention only"),
        (cfg.activation in FEED_FORWARD, "activation", f"T5 supports {', '.join(FEED_FORWARD)}"),
    ]:
        hf.check(ok, f"{WHAT} export", field, getattr(cfg, field), why)
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=FEED_FORWARD[cfg.activation],
        # In transformers 5 this flag only decides the output rescaling (see the module docstring).
        tie_word_embeddings=cfg.scale_tied_logits,
    )
    return T5Config(**{**fields, **kwargs})


def new_hf_model(hf_config, cfg: ModelConfig):
    """T5ForConditionalGeneration; untied (own lm_head weight) when `cfg` is, as a v1.1 checkpoint loads."""
    import torch  # optional (the test extra)

    model = hf.build_hf_model(HF_CLASS, hf_config)
    if not cfg.tie_embeddings and hf.embeddings_tied(model):
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        model.all_tied_weights_keys.pop("lm_head.weight", None)  # so later tie_weights() keeps it apart
    return model


def _attention(ours: str, theirs: str, cfg: ModelConfig) -> list[hf.Rule]:
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_size
    out = []
    for p in "qkv":
        out += hf.linear(f"{ours}/{p}", f"{theirs}.{p}", d, (n, h), bias=False)
    return out + hf.linear(f"{ours}/o", f"{theirs}.o", (n, h), d, bias=False)


def _mlp(ours: str, theirs: str, cfg: ModelConfig) -> list[hf.Rule]:
    d, f = cfg.d_model, cfg.mlp_dim
    ins = ("wi_0", "wi_1") if cfg.gated else ("wi",)
    out = [r for w in ins for r in hf.linear(f"{ours}/{w}", f"{theirs}.{w}", d, f, bias=False)]
    return out + hf.linear(f"{ours}/wo", f"{theirs}.wo", f, d, bias=False)


def rules(cfg: ModelConfig) -> list[hf.Rule]:
    out = [
        hf.tied("embedder/tokens/embedding", "shared.weight", "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight", *(["lm_head.weight"] if cfg.tie_embeddings else [])),
    ]
    if not cfg.tie_embeddings:
        out += hf.linear("lm_head/proj", "lm_head", cfg.d_model, cfg.vocab_size, bias=False)
    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        out.append(hf.same(f"{stack}/relative_bias/embedding",
                           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        out += hf.norm(f"{stack}/final_norm", f"{stack}.final_layer_norm", bias=False)
        for i in range(layers):
            ours, theirs = f"{stack}/layers/{i}", f"{stack}.block.{i}.layer"
            out += _attention(f"{ours}/self_attn", f"{theirs}.0.SelfAttention", cfg)
            out += hf.norm(f"{ours}/self_attn_norm", f"{theirs}.0.layer_norm", bias=False)
            ff = 1
            if stack == "decoder":
                out += _attention(f"{ours}/cross_attn", f"{theirs}.1.EncDecAttention", cfg)
                out += hf.norm(f"{ours}/cross_attn_norm", f"{theirs}.1.layer_norm", bias=False)
                ff = 2
            out += _mlp(f"{ours}/mlp", f"{theirs}.{ff}.DenseReluDense", cfg)
            out += hf.norm(f"{ours}/mlp_norm", f"{theirs}.{ff}.layer_norm", bias=False)
    return out


# Cross-attention never has a relative bias; some old checkpoints carry an unused one.
IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """T5ForConditionalGeneration state dict (HF names, numpy) -> nested params matching
    nnx.state(model, nnx.Param)."""
    return hf.import_params(rules(cfg), state_dict, ignore=IGNORED, what=WHAT)


def params_to_hf(model_or_state, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """llmjax model / state -> T5ForConditionalGeneration state dict (numpy, HF names; LoRA merged)."""
    cfg = cfg or model_or_state.cfg
    return hf.export_params(rules(cfg), hf.model_params(model_or_state, cfg), what=WHAT)
