"""Per-device temporary memory of one causal self-attention layer (forward + backward, RoPE) at long sequence
lengths, with the chosen kernel (--kernel: blockwise, the default under context parallelism, or reference,
whose [B, N, T/c, S] scores show the quadratic term), with the sequence split over c devices of the
`context` mesh axis (context parallelism). Nothing runs: the numbers are XLA's compiled memory analysis on
this machine's CPU devices. JSON in benchmarks/results/context_memory.json.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.context_memory \
        [--lengths 8192,16384,32768] [--contexts 1,2,4,8] [--kernel blockwise|reference] [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import sys


def attention_temp_bytes(length: int, context: int, *, kernel: str = "blockwise", d_model: int = 512, heads: int = 8,
                         kv_heads: int = 2) -> int:
    """Compiled temporary bytes per device of grad(sum(attention(x))) for x [1, length, d_model]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llmjax import sharding as shd
    from llmjax.models.attention import Attention, TokenLayout
    from llmjax.models.config import ModelConfig

    cfg = ModelConfig(d_model=d_model, num_heads=heads, num_kv_heads=kv_heads, position="rope", use_bias=False,
                      attention_kernel=kernel, max_length=length)
    layer = Attention(cfg, causal=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    mesh = shd.make_mesh(shd.mesh_config(data=1, context=context), jax.devices()[:context])
    rules = shd.rules_dict(shd.DEFAULT_RULES)
    x_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))

    def loss(params, x):
        out, _ = nnx.merge(graphdef, params)(x, TokenLayout.of(x[..., 0].astype(jnp.int32)))
        return jnp.sum(out.astype(jnp.float32))

    def step(params, x):
        with shd.activation_layout(mesh, rules):
            return jax.grad(loss, argnums=(0, 1))(params, x)

    x = jax.ShapeDtypeStruct((1, length, d_model), jnp.float32, sharding=x_sh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(params, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--contexts", default="1,2,4,8")
    p.add_argument("--kernel", default="blockwise", choices=["blockwise", "reference"])
    p.add_argument("--name", default="context_memory")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from benchmarks.common import machine_info, write_result

    rows = []
    for length in map(int, args.lengths.split(",")):
        for c in map(int, args.contexts.split(",")):
            temp = attention_temp_bytes(length, c, kernel=args.kernel)
            rows.append({"length": length, "context": c, "kernel": args.kernel, "temp_bytes_per_device": temp})
            print(f"T={length:6d} context={c}: {temp / 2**30:7.2f} GiB per device", flush=True)
    write_result(args.name, {"command": "python -m benchmarks.context_memory " + " ".join(argv), "rows": rows,
                             "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
