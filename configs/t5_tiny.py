"""T5 v1.1-style encoder-decoder, CPU-sized (9.5M parameters, of which 4.2M are the untied input and output
embeddings), trained with span corruption.

    llmjax train --config configs/t5_tiny.py --workdir runs/t5_tiny
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="span_corruption", **model_preset("t5_v1_1", "tiny"))
    cfg.train.update(steps=300, batch_size=16, seq_length=128)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30)
    return cfg
