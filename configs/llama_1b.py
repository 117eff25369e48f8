"""Llama-3.2-1B shape (Meta 2024): 16 layers, d_model 2048, 32 query / 8 kv heads (GQA), SwiGLU 8192,
RoPE theta 500000, tied embeddings, 1.24B parameters. (Llama 3's long-context RoPE frequency scaling
is not applied: it matters only for importing Meta's weights beyond 8k tokens.)"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm", **model_preset("llama", "1b"))
    cfg.train.update(steps=100_000, batch_size=512, seq_length=2048, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots", scan_layers=True)  # one layer in the program, scanned
    cfg.mesh.update(data=1, fsdp=-1)
    return cfg
