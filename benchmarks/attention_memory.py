"""Compiled temporary memory of attention forward + backward against sequence length, per kernel: the
blockwise kernel (online softmax over key blocks, rematerialised per query block) grows about linearly,
the reference kernel (materialises the [T, S] scores) about quadratically. Compiles only; nothing runs.

    python -m benchmarks.attention_memory [--lengths 1024,2048,4096,8192]
"""

from __future__ import annotations

import argparse
import sys
import time

from llmjax import runtime

runtime.prepare_process(many_steps=False)  # llmjax's XLA CPU flags, before JAX starts


def temp_bytes(kernel: str, length: int, *, batch: int, heads: int, head_dim: int, block: int) -> int:
    import jax
    import jax.numpy as jnp

    from llmjax.models.attention import AttentionMask, attend

    qkv = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(q, k, v, seg, pos):
        mask = AttentionMask(seg, seg, pos, pos, None, causal=True)
        out = attend(q, k, v, mask, kernel=kernel, scale=head_dim ** -0.5, block_size=block)
        return jnp.sum(out * out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(qkv, qkv, qkv, ids, ids).compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--kernels", default="blockwise,reference")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--name", default="attention_memory")
    a = p.parse_args(argv[1:])
    from benchmarks.common import machine_info, write_result

    lengths = [int(x) for x in a.lengths.split(",")]
    kernels = a.kernels.split(",")
    rows = {k: {} for k in kernels}
    t0 = time.perf_counter()
    for k in kernels:
        for t in lengths:
            rows[k][t] = temp_bytes(k, t, batch=a.batch, heads=a.heads, head_dim=a.head_dim, block=a.block)
    print(f"compiled temporary memory of causal attention forward + backward (float32, batch {a.batch}, "
          f"{a.heads} heads x {a.head_dim}, block {a.block}):")
    print(f"{'length':>8} " + " ".join(f"{k:>14}" for k in kernels))
    for t in lengths:
        print(f"{t:>8} " + " ".join(f"{rows[k][t] / 2**20:>10.1f} MiB" for k in kernels))
    growth = {k: rows[k][lengths[-1]] / rows[k][lengths[0]] for k in kernels}
    print(f"growth {lengths[0]} -> {lengths[-1]} ({lengths[-1] // lengths[0]}x longer): "
          + ", ".join(f"{k} {g:.1f}x" for k, g in growth.items()))
    result = {"name": a.name, "command": "python -m benchmarks.attention_memory " + " ".join(argv[1:]),
              "shape": {"batch": a.batch, "heads": a.heads, "head_dim": a.head_dim, "block": a.block,
                        "dtype": "float32", "mask": "causal"},
              "temp_bytes": {k: {str(t): v for t, v in r.items()} for k, r in rows.items()},
              "growth": growth, "seconds": time.perf_counter() - t0, "machine": machine_info()}
    print(f"wrote {write_result(a.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
