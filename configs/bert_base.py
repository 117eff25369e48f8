"""BERT-base (Devlin et al. 2019): 12 layers, d_model 768, 12 heads, 110M parameters, MLM + NSP."""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="mlm",
                      **model_preset("bert", "base", dropout_rate=0.1, attention_dropout_rate=0.1))
    cfg.train.update(steps=1_000_000, batch_size=256, seq_length=512, eval_every=10_000)
    cfg.optim.update(learning_rate=1e-4, warmup_steps=10_000, schedule="linear", min_lr_ratio=0.0, b2=0.999,
                     weight_decay=0.01)
    cfg.objective_args = {"nsp": True}
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.model.scan_layers = True  # one layer in the compiled program, scanned over the stack
    return cfg
