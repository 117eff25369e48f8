"""Documentation vs source code: classify passages of the default corpus (sequence classification on a
pretrained encoder, e.g. bert_tiny). Build the data first:

    python -m llmjax.data.tasks doc_vs_code --out runs/data/doc_vs_code
    llmjax finetune --config configs/finetune/doc_vs_code.py --init-from runs/bert_tiny --workdir runs/doc_vs_code
    # LoRA instead of full fine-tuning: add --config.lora.rank=8
"""

from llmjax.finetune import default_finetune_config


def get_config():
    cfg = default_finetune_config()
    cfg.task = "classification"
    cfg.train_file = "runs/data/doc_vs_code/train.jsonl"
    cfg.validation_file = "runs/data/doc_vs_code/validation.jsonl"
    cfg.max_length = 128
    cfg.train.update(steps=150, batch_size=32, eval_every=50, log_every=10)
    cfg.optim.update(learning_rate=1e-4, warmup_steps=15)
    return cfg
