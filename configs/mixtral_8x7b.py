"""Mixtral 8x7B shape (Mistral AI 2023): 32 layers, d_model 4096, 32 query / 8 kv heads (GQA), 8 SwiGLU experts of
14336 per layer with top-2 routing (renormalised gate weights, dropless), RoPE theta 1e6, RMSNorm, untied
embeddings, vocabulary 32000: 46.7B parameters, 12.9B active per token. (Its 32k sliding-window-free
attention matches llmjax's full causal attention.)"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="causal_lm",
        family="decoder",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        norm_position="pre",
        use_bias=False,
        position="rope",
        rope_theta=1e6,
        max_length=32768,
        tie_embeddings=False,
        num_experts=8,
        experts_per_token=2,
        moe_every=1,
        moe_capacity_factor=0.0,
        moe_renormalize=True,
        moe_aux_loss_weight=0.02,  # router_aux_loss_coef of the released model
        moe_z_loss_weight=0.0,
    )
    cfg.train.update(steps=100_000, batch_size=512, seq_length=4096, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots")
    # Experts over 8 devices, the rest FSDP.
    cfg.mesh.update(data=1, expert=8, fsdp=-1)
    return cfg
