"""BERT-base (Devlin et al. 2019): 12 layers, d_model 768, 12 heads, 110M parameters, MLM + NSP."""

from llmjax.config import base_config


def get_config():
    return base_config(
        objective="mlm",
        family="encoder",
        vocab_size=30522,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        activation="gelu",
        norm="layernorm",
        norm_eps=1e-12,
        norm_position="post",
        position="learned",
        max_length=512,
        type_vocab_size=2,
        tie_embeddings=True,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )
