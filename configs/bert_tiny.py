"""BERT-style encoder, CPU-sized (~5M parameters), trained with masked-language modelling.

    llmjax train --config configs/bert_tiny.py --workdir runs/bert_tiny
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="mlm", **model_preset("bert", "tiny"))
    cfg.train.update(steps=300, batch_size=16, seq_length=128)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30, b2=0.98)
    return cfg
