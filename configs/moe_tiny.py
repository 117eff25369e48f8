"""Mixture-of-experts decoder, CPU-sized: Llama-style blocks with 4 SwiGLU experts (top-2, dropless) in every
layer, load-balancing and router z-losses, trained with next-token prediction.

    llmjax train --config configs/moe_tiny.py --workdir runs/moe_tiny
"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=8192,
        d_model=128,
        num_layers=4,
        num_heads=4,
        mlp_dim=256,
        activation="swiglu",
        norm="rmsnorm",
        norm_position="pre",
        use_bias=False,
        position="rope",
        max_length=256,
        tie_embeddings=True,
        num_experts=4,
        experts_per_token=2,
        moe_every=1,
        moe_capacity_factor=0.0,  # dropless; e.g. --config.model.moe_capacity_factor=1.25 for capacity dispatch
        moe_aux_loss_weight=0.01,
        moe_z_loss_weight=1e-3,
    )
    cfg.train.update(steps=150, batch_size=16, seq_length=128, log_every=10, eval_every=50)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=20, schedule="cosine")
    return cfg
