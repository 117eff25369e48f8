"""GPT-2-style decoder, CPU-sized (~5M parameters), trained with next-token prediction.

    llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny
"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=8192,
        d_model=256,
        num_layers=4,
        num_heads=4,
        mlp_dim=1024,
        activation="gelu_tanh",
        norm="layernorm",
        norm_position="pre",
        position="learned",
        max_length=256,
        tie_embeddings=True,
    )
    cfg.train.update(steps=300, batch_size=16, seq_length=128, log_every=10, eval_every=50)
    cfg.optim.update(learning_rate=2e-3, warmup_steps=30, schedule="cosine")
    return cfg
