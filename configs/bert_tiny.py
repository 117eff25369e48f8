"""BERT-style encoder, CPU-sized (~5M parameters), trained with masked-language modelling.

    llmjax train --config configs/bert_tiny.py --workdir runs/bert_tiny
"""

from llmjax.config import base_config


def get_config():
    cfg = base_config(
        objective="mlm",
        family="encoder",
        vocab_size=8192,
        d_model=256,
        num_layers=4,
        num_heads=4,
        mlp_dim=1024,
        activation="gelu",
        norm="layernorm",
        norm_eps=1e-12,
        norm_position="post",
        position="learned",
        max_length=256,
        type_vocab_size=2,
        tie_embeddings=True,
    )
    cfg.train.update(steps=300, batch_size=16, seq_length=128)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30, b2=0.98)
    return cfg
