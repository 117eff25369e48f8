"""BERT (transformers BertForPreTraining) <-> llmjax EncoderOnly: post-LayerNorm encoder with token-type
embeddings, the MLM head (transform + LayerNorm + tied decoder + bias), the pooler and the NSP head."""

from __future__ import annotations

import numpy as np

from llmjax.interop import hf
from llmjax.models.config import ModelConfig

MODEL_TYPE, HF_CLASS = "bert", "BertForPreTraining"
WHAT = "BERT"


def config_from_hf(c, *, tied: bool | None = None, **overrides) -> ModelConfig:
    """BertConfig -> ModelConfig. `tied` (MLM decoder shares the word embeddings) defaults to
    c.tie_word_embeddings."""
    hf.check(not c.is_decoder, WHAT, "is_decoder", True, "llmjax imports BERT as a bidirectional encoder")
    hf.check(not c.add_cross_attention, WHAT, "add_cross_attention", True, "the llmjax encoder has no cross-attention")
    fields = dict(
        family="encoder", vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
        activation=hf.activation_from_hf(WHAT, "hidden_act", c.hidden_act, gated=False),
        norm="layernorm", norm_eps=c.layer_norm_eps, norm_position="post", use_bias=True, norm_bias=True,
        position="learned", max_length=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        tie_embeddings=c.tie_word_embeddings if tied is None else tied, pooler=True,
        dropout_rate=float(c.hidden_dropout_prob), attention_dropout_rate=float(c.attention_probs_dropout_prob),
        init_std=c.initializer_range,
    )
    return hf.build_config(WHAT, **{**fields, **overrides})


def hf_config_from(cfg: ModelConfig, **kwargs):
    """ModelConfig -> BertConfig; raises InteropError for anything BertForPreTraining cannot express."""
    from transformers import BertConfig  # optional (the test extra)

    for ok, field, why in [
        (cfg.family == "encoder", "family", "BERT is an encoder"),
        (cfg.position == "learned", "position", "BERT has learned absolute positions"),
        (cfg.norm == "layernorm" and cfg.norm_bias, "norm", "BERT uses LayerNorm with a bias"),
        (cfg.norm_position == "post", "norm_position", "BERT is post-norm"),
        (cfg.use_bias, "use_bias", "BERT projections have biases"),
        (not cfg.gated and cfg.activation in hf.TO_HF_ACTIVATION, "activation", "BERT has an ungated MLP"),
        (cfg.kv_heads == cfg.num_heads, "num_kv_heads", "BERT has multi-head attention only"),
        (cfg.head_size * cfg.num_heads == cfg.d_model, "head_dim", "BERT needs head_dim = d_model / num_heads"),
        (cfg.type_vocab_size > 0, "type_vocab_size", "BERT always has token-type embeddings"),
        (cfg.pooler, "pooler", "BertForPreTraining has a pooler and an NSP head"),
        (not cfg.num_labels, "num_labels", "BertForPreTraining has no sequence-classification head"),
        (not cfg.num_tags, "num_tags", "BertForPreTraining has no token-classification head"),
    ]:
        hf.check(ok, f"{WHAT} export", field, getattr(cfg, field), why)
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
        hidden_act=hf.TO_HF_ACTIVATION[cfg.activation],
        hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=cfg.max_length, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
    )
    return BertConfig(**{**fields, **kwargs})


def new_hf_model(hf_config, cfg: ModelConfig):
    return hf.build_hf_model(HF_CLASS, hf_config)


def rules(cfg: ModelConfig) -> list[hf.Rule]:
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_size
    emb = "bert.embeddings"
    out = [
        hf.tied("embedder/tokens/embedding", f"{emb}.word_embeddings.weight",
                *(["cls.predictions.decoder.weight"] if cfg.tie_embeddings else [])),
        hf.same("embedder/positions/embedding", f"{emb}.position_embeddings.weight"),
        hf.same("embedder/token_types/embedding", f"{emb}.token_type_embeddings.weight"),
        *hf.norm("embedder/norm", f"{emb}.LayerNorm", bias=True),
        *hf.linear("pooler", "bert.pooler.dense", d, d, bias=True),
        *hf.linear("nsp", "cls.seq_relationship", d, 2, bias=True),
        *hf.linear("mlm_transform", "cls.predictions.transform.dense", d, d, bias=True),
        *hf.norm("mlm_norm", "cls.predictions.transform.LayerNorm", bias=True),
    ]
    if cfg.tie_embeddings:
        out.append(hf.tied("lm_head/bias", "cls.predictions.decoder.bias", "cls.predictions.bias"))
    else:
        # Untied, HF keeps cls.predictions.bias as a separate, unused parameter: the decoder's own bias counts.
        out.append(hf.Rule(("lm_head/bias",), ("cls.predictions.decoder.bias", "cls.predictions.bias"),
                           lambda used, unused: (used,), lambda b: (b, b)))
        out += hf.linear("lm_head/proj", "cls.predictions.decoder", d, cfg.vocab_size, bias=False)
    for i in range(cfg.num_layers):
        ours, theirs = f"encoder/layers/{i}", f"bert.encoder.layer.{i}"
        for p, name in zip("qkv", ("query", "key", "value")):
            out += hf.linear(f"{ours}/self_attn/{p}", f"{theirs}.attention.self.{name}", d, (n, h), bias=True)
        out += hf.linear(f"{ours}/self_attn/o", f"{theirs}.attention.output.dense", (n, h), d, bias=True)
        out += hf.norm(f"{ours}/self_attn_norm", f"{theirs}.attention.output.LayerNorm", bias=True)
        out += hf.linear(f"{ours}/mlp/wi", f"{theirs}.intermediate.dense", d, cfg.mlp_dim, bias=True)
        out += hf.linear(f"{ours}/mlp/wo", f"{theirs}.output.dense", cfg.mlp_dim, d, bias=True)
        out += hf.norm(f"{ours}/mlp_norm", f"{theirs}.output.LayerNorm", bias=True)
    return out


# Index buffers that older checkpoints saved; llmjax computes positions and token types itself.
IGNORED = (r"bert\.embeddings\.(position_ids|token_type_ids)",)


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """BertForPreTraining state dict (HF names, numpy) -> nested params matching nnx.state(model, nnx.Param)."""
    return hf.import_params(rules(cfg), state_dict, ignore=IGNORED, what=WHAT)


def params_to_hf(model_or_state, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """llmjax model / state -> BertForPreTraining state dict (numpy, HF names; LoRA merged)."""
    cfg = cfg or model_or_state.cfg
    return hf.export_params(rules(cfg), hf.model_params(model_or_state, cfg), what=WHAT)
