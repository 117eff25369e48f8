"""Token classification (a tag per word) on a pretrained encoder. JSONL rows {"tokens": [...], "tags": [...]}:

    llmjax finetune --config configs/finetune/tagging.py --init-from runs/bert_tiny --workdir runs/tagging \
        --config.train_file=train.jsonl --config.validation_file=validation.jsonl
"""

from llmjax.finetune import default_finetune_config


def get_config():
    cfg = default_finetune_config()
    cfg.task = "tagging"
    cfg.max_length = 128
    cfg.train.update(steps=200, batch_size=16, eval_every=100)
    cfg.optim.update(learning_rate=1e-4, warmup_steps=20)
    return cfg
