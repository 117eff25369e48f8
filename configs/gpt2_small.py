"""GPT-2 small (Radford et al. 2019): 12 layers, d_model 768, 12 heads, 124M parameters."""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm",
                      **model_preset("gpt2", "small", dropout_rate=0.1, attention_dropout_rate=0.1))
    cfg.train.update(steps=600_000, batch_size=480, seq_length=1024, micro_batches=1, eval_every=2000)
    cfg.optim.update(learning_rate=6e-4, warmup_steps=2000, min_lr_ratio=0.1, b2=0.95, weight_decay=0.1)
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.model.scan_layers = True  # one layer in the compiled program, scanned over the stack
    return cfg
