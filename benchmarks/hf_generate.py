"""The Hugging Face baseline of benchmarks/decoding.py: `generate` of a transformers model with random weights,
timed on its own, so anyone can rerun it without llmjax.

    python -m benchmarks.hf_generate [--model gpt2|llama] [--batch 1] [--method greedy|sample] [--rounds 3]

Models (random weights, float32, transformers' default attention, sdpa):
- gpt2: GPT-2 small (GPT2Config defaults: 12 layers, d 768, 12 heads, vocab 50257, tied output embedding), 124M;
- llama: a Llama-shaped model with grouped-query attention, 12 layers, d 768, 12 query heads sharing 4 kv heads,
  SwiGLU 2048, vocab 32000, untied output projection, 125M.
Prompts are random token ids [batch, prompt_len], all the same length (no padding); generation runs exactly
max_new_tokens steps (no EOS: eos_token_id unset). torch runs on `--threads` threads (default 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PROMPT_LEN, NEW_TOKENS = 16, 64
SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0)  # plain temperature sampling, the same on both sides


def hf_config(name: str):
    import transformers  # torch and transformers (test extras) are imported where used, as in llmjax.interop

    if name == "gpt2":
        return transformers.GPT2Config()
    if name == "llama":
        return transformers.LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    raise ValueError(f"--model: unknown {name!r}; choose gpt2 or llama")


def make_model(name: str, seed: int = 0):
    """The HF model `name` with random weights drawn from `seed`, in eval mode, with no EOS (every run decodes
    exactly max_new_tokens)."""
    import torch  # test extras, imported where used
    import transformers

    torch.manual_seed(seed)
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.LlamaForCausalLM
    model = cls(hf_config(name)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_prompts(vocab_size: int, batch: int, length: int = PROMPT_LEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab_size, (batch, length)).astype(np.int64)


def weight_bytes(model) -> int:
    """Bytes of the distinct parameter tensors (a tied embedding counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return int(sum(seen.values()))


def generate(model, prompts: np.ndarray, *, max_new_tokens: int = NEW_TOKENS, method: str = "greedy",
             seed: int = 0) -> tuple[np.ndarray, float]:
    """(new tokens [B, N], seconds) of one `model.generate` call."""
    import torch  # test extra, imported where used

    ids = torch.as_tensor(prompts)
    kwargs = dict(do_sample=False) if method == "greedy" else dict(do_sample=True, **SAMPLING)
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, **kwargs)
    seconds = time.perf_counter() - t
    return out[:, prompts.shape[1]:].numpy(), seconds


def main() -> int:
    import torch  # test extra, imported where used

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--method", default="greedy", choices=["greedy", "sample"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(args.model)
    prompts = random_prompts(model.config.vocab_size, args.batch)
    generate(model, prompts, max_new_tokens=4, method=args.method)  # warm up
    times = [generate(model, prompts, method=args.method)[1] for _ in range(args.rounds)]
    s = statistics.median(times)
    print(f"HF generate {args.model} batch {args.batch} {args.method}: {s:.3f} s for {NEW_TOKENS} new tokens, "
          f"{args.batch * NEW_TOKENS / s:.1f} tokens/s, {s / NEW_TOKENS * 1e3:.1f} ms per step "
          f"(rounds {', '.join(f'{t:.3f}' for t in times)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
