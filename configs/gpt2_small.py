"""GPT-2 small (Radford et al. 2019): 12 layers, d_model 768, 12 heads, 124M parameters."""

from llmjax.config import base_config


def get_config():
    return base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=50257,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        activation="gelu_tanh",
        norm="layernorm",
        norm_eps=1e-5,
        norm_position="pre",
        position="learned",
        max_length=1024,
        tie_embeddings=True,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )
