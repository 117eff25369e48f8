"""Llama-2-7B shape (Touvron et al. 2023): 32 layers, d_model 4096, 32 heads (MHA), SwiGLU 11008, RMSNorm,
RoPE theta 10000, untied embeddings, vocab 32000, 6.74B parameters. Sized for a TPU pod, e.g.

    llmjax compile --config configs/llama_7b.py --topology v5p-128
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm", **model_preset("llama", "7b"))
    # Llama 2's batch was 4M tokens; 256 x 4096 = 1M tokens per step here, bf16 compute, fp32 master weights.
    cfg.train.update(steps=250_000, batch_size=256, seq_length=4096, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1, min_lr_ratio=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots", scan_layers=True)  # one layer in the program, scanned
    cfg.mesh.update(data=1, fsdp=-1)
    return cfg
