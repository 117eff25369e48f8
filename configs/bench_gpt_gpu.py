"""The GPU benchmark shape: GPT-2 small (12 layers, d_model 768, 12 heads, 124M parameters), T=1024, batch 32,
bfloat16 compute with float32 master weights, cuDNN flash attention (`dot_product`), no dropout.

    python -m benchmarks.throughput --config configs/bench_gpt_gpu.py     # or: bash benchmarks/gpu_check.sh
"""

from llmjax.config import base_config
from llmjax.presets import model_preset


def get_config():
    cfg = base_config(objective="causal_lm",
                      **model_preset("gpt2", "small", dtype="bfloat16", param_dtype="float32",
                                     attention_kernel="dot_product", dropout_rate=0.0, attention_dropout_rate=0.0))
    cfg.train.update(steps=1000, batch_size=32, seq_length=1024)
    cfg.optim.update(learning_rate=6e-4, warmup_steps=10)
    return cfg
