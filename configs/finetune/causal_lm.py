"""Continued causal-LM training of a pretrained decoder (gpt_tiny) on new text. JSONL rows {"text": ...}:

    llmjax finetune --config configs/finetune/causal_lm.py --init-from runs/gpt_tiny --workdir runs/gpt_more \
        --config.train_file=train.jsonl --config.validation_file=validation.jsonl
"""

from llmjax.finetune import default_finetune_config


def get_config():
    cfg = default_finetune_config()
    cfg.task = "causal_lm"
    cfg.max_length = 128
    cfg.model.dropout_rate = 0.0
    cfg.train.update(steps=200, batch_size=16, eval_every=100)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=20)
    return cfg
