"""T5 v1.1-style encoder-decoder, CPU-sized (~6M parameters), trained with span corruption.

    llmjax train --config configs/t5_tiny.py --workdir runs/t5_tiny
"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="span_corruption",
        family="encoder_decoder",
        vocab_size=8192,
        d_model=256,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        head_dim=64,
        mlp_dim=640,
        activation="geglu_tanh",
        norm="rmsnorm",
        norm_eps=1e-6,
        norm_position="pre",
        use_bias=False,
        position="relative",
        relative_buckets=32,
        relative_max_distance=128,
        scale_attention=False,
        tie_embeddings=False,
    )
    cfg.train.update(steps=300, batch_size=16, seq_length=128)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30)
    return cfg
