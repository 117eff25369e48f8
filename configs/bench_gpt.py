"""The CPU benchmark shape: a GPT-2-style decoder, 6 layers, d_model 512, 8 heads, T=256, vocab 8192,
batch 8, float32, no dropout (23.2M parameters): the shape of the nanoGPT comparison in the README.

    python -m benchmarks.throughput --config configs/bench_gpt.py
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm",
                      **model_preset("gpt2", "tiny", d_model=512, num_layers=6, num_heads=8, mlp_dim=2048,
                                     activation="gelu"))  # exact GELU, as torch.nn.functional.gelu
    cfg.train.update(steps=1000, batch_size=8, seq_length=256)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=10)
    cfg.mesh.update(data=1)
    return cfg
