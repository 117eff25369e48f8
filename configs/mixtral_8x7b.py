"""Mixtral 8x7B shape (Mistral AI 2023): 32 layers, d_model 4096, 32 query / 8 kv heads (GQA), 8 SwiGLU experts of
14336 per layer with top-2 routing (renormalised gate weights, dropless), RoPE theta 1e6, RMSNorm, untied
embeddings, vocabulary 32000: 46.7B parameters, 12.9B active per token. (Its 32k sliding-window-free
attention matches llmjax's full causal attention.)"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm", **model_preset("mixtral", "8x7b"))
    cfg.train.update(steps=100_000, batch_size=512, seq_length=4096, eval_every=5000)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
    cfg.model.update(dtype="bfloat16", remat="save_dots", scan_layers=True)  # one layer in the program, scanned
    # Experts over 8 devices, the rest FSDP.
    cfg.mesh.update(data=1, expert=8, fsdp=-1)
    return cfg
