"""Llama-3.2-1B shape (Meta 2024): 16 layers, d_model 2048, 32 query / 8 kv heads (GQA), SwiGLU 8192,
RoPE theta 500000, tied embeddings, 1.24B parameters. (Llama 3's long-context RoPE frequency scaling
is not applied: it matters only for importing Meta's weights beyond 8k tokens.)"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=128256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        norm_position="pre",
        use_bias=False,
        position="rope",
        rope_theta=500000.0,
        max_length=8192,
        tie_embeddings=True,
    )
    cfg.train.update(steps=100_000, batch_size=512, seq_length=2048, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots")
    cfg.mesh.update(data=1, fsdp=-1)
    return cfg
