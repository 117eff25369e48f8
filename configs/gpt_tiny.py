"""GPT-2-style decoder, CPU-sized (~5M parameters), trained with next-token prediction.

    llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm", **model_preset("gpt2", "tiny"))
    cfg.train.update(steps=300, batch_size=16, seq_length=128, log_every=10, eval_every=50)
    cfg.optim.update(learning_rate=2e-3, warmup_steps=30, schedule="cosine")
    return cfg
