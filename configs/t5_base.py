"""T5-base (Raffel et al. 2020): 12+12 layers, d_model 768, 12 heads, ReLU MLP 3072, 223M parameters."""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="span_corruption", **model_preset("t5", "base", dropout_rate=0.1))
    # T5's recipe: Adafactor with the inverse-square-root schedule, 2^18 steps of 128 x 512 tokens.
    cfg.train.update(steps=262_144, batch_size=128, seq_length=512, eval_every=10_000)
    cfg.optim.update(optimizer="adafactor", learning_rate=0.01, schedule="rsqrt", warmup_steps=10_000,
                     weight_decay=0.0, clip_norm=0.0)
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.model.scan_layers = True  # one layer in the compiled program, scanned over the stack
    return cfg
