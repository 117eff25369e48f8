"""T5-base (Raffel et al. 2020): 12+12 layers, d_model 768, 12 heads, ReLU MLP 3072, 223M parameters."""

from llmjax.config import base_config


def get_config():
    return base_config(
        objective="span_corruption",
        family="encoder_decoder",
        vocab_size=32128,
        d_model=768,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        head_dim=64,
        mlp_dim=3072,
        activation="relu",
        norm="rmsnorm",
        norm_eps=1e-6,
        norm_position="pre",
        use_bias=False,
        position="relative",
        relative_buckets=32,
        relative_max_distance=128,
        scale_attention=False,
        tie_embeddings=True,
        scale_tied_logits=True,
        dropout_rate=0.1,
    )
