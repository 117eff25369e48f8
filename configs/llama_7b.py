"""Llama-2-7B shape (Touvron et al. 2023): 32 layers, d_model 4096, 32 heads (MHA), SwiGLU 11008, RMSNorm,
RoPE theta 10000, untied embeddings, vocab 32000, 6.74B parameters. Sized for a TPU pod, e.g.

    llmjax compile --config configs/llama_7b.py --topology v5p-128
"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        head_dim=128,
        mlp_dim=11008,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        norm_position="pre",
        use_bias=False,
        position="rope",
        rope_theta=10000.0,
        max_length=4096,
        tie_embeddings=False,
    )
    # Llama 2's batch was 4M tokens; 256 x 4096 = 1M tokens per step here, bf16 compute, fp32 master weights.
    cfg.train.update(steps=250_000, batch_size=256, seq_length=4096, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1, min_lr_ratio=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots")
    cfg.mesh.update(data=1, fsdp=-1)
    return cfg
