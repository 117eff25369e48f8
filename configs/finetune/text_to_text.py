"""Text-to-text on a pretrained encoder-decoder (t5_tiny); reports exact match of greedy decoding.
JSONL rows {"input": ..., "target": ...}:

    llmjax finetune --config configs/finetune/text_to_text.py --init-from runs/t5_tiny --workdir runs/t2t \
        --config.train_file=train.jsonl --config.validation_file=validation.jsonl
"""

from llmjax.finetune import default_finetune_config


def get_config():
    cfg = default_finetune_config()
    cfg.task = "text_to_text"
    cfg.max_length = 128
    cfg.target_length = 32
    cfg.model.dropout_rate = 0.0
    cfg.train.update(steps=300, batch_size=16, eval_every=100)
    cfg.optim.update(learning_rate=5e-4, warmup_steps=20)
    return cfg
