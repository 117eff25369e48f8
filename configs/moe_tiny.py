"""Mixture-of-experts decoder, CPU-sized: Llama-style blocks with 4 SwiGLU experts (top-2, dropless) in every
layer, load-balancing and router z-losses, trained with next-token prediction.

    llmjax train --config configs/moe_tiny.py --workdir runs/moe_tiny
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    # Dropless routing; e.g. --config.model.moe_capacity_factor=1.25 for capacity dispatch.
    cfg = base_config(objective="causal_lm",
                      **model_preset("mixtral", "tiny", moe_aux_loss_weight=0.01, moe_z_loss_weight=1e-3))
    cfg.train.update(steps=150, batch_size=16, seq_length=128, log_every=10, eval_every=50)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=20, schedule="cosine")
    return cfg
