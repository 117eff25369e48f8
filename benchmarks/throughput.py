"""Training throughput of a config's real sharded train step on this machine: median step time, tokens/s,
achieved FLOP/s, MFU, compile time and memory per device. JSON in benchmarks/results/<name>.json.

    python -m benchmarks.throughput --config configs/bench_gpt.py [--steps 20] [--config.x=y ...]

The step is the one `llmjax train` runs (llmjax.state.init_state + llmjax.step.make_train_step, state
donated), built by llmjax.compile.build_train_step, on a synthetic batch of random tokens with the config's
shapes; MFU is against --peak_flops or, by default, the FLOP/s of a large float32
matmul measured in the same run (llmjax.metrics).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path


def _define(fv):
    from absl import flags

    flags.DEFINE_integer("steps", 20, "timed steps (after the warmup steps)", flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "untimed steps after compilation", flag_values=fv)
    flags.DEFINE_float("peak_flops", 0.0, "peak FLOP/s per device for MFU; 0 = measure a float32 matmul", flag_values=fv)
    flags.DEFINE_string("name", None, "result name (default: the config file's stem)", flag_values=fv)
    flags.DEFINE_bool("save", True, "write benchmarks/results/<name>.json", flag_values=fv)


def main(argv: list[str]) -> int:
    from llmjax import runtime
    from llmjax.cli.flags import parse_config_flags

    runtime.prepare_process(many_steps=True)  # as `llmjax train` does, before JAX starts
    fv = parse_config_flags(argv, define=_define)
    cfg = fv.config

    import jax
    import numpy as np

    from benchmarks.common import machine_info, peak_rss_bytes, table, write_result
    from llmjax import metrics
    from llmjax.compile import build_train_step, random_batch, step_flops
    from llmjax.step import global_batch

    t0 = time.perf_counter()
    parts = build_train_step(cfg)
    state = parts.init_state(int(cfg.train.seed))
    local = random_batch(parts.batch_spec, parts.model_cfg.vocab_size)
    batch = global_batch(local, parts.mesh)
    t1 = time.perf_counter()
    compiled = parts.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    for _ in range(fv.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(fv.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    loss = float(m["loss"])
    step_s = statistics.median(times)
    tokens = int(np.sum(local.get("weights", local.get("decoder_weights"))))
    flops = step_flops(cfg, parts.model_cfg, parts.batch_spec)
    peak, peak_source = (fv.peak_flops, "--peak_flops") if fv.peak_flops else metrics.peak_flops_per_device()
    n_dev = jax.device_count()
    achieved = flops / step_s
    arg, out, alias, temp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                             mem.temp_size_in_bytes)
    temp = max(temp, int(getattr(mem, "peak_memory_in_bytes", 0) or 0) - (arg + out - alias))
    name = fv.name or Path(argv[argv.index("--config") + 1] if "--config" in argv else
                           [a for a in argv if a.startswith("--config=")][0].split("=", 1)[1]).stem
    result = {
        "name": name,
        "command": "python -m benchmarks.throughput " + " ".join(argv[1:]),
        "model": {"family": parts.model_cfg.family, "num_layers": parts.model_cfg.num_layers,
                  "d_model": parts.model_cfg.d_model, "num_heads": parts.model_cfg.num_heads,
                  "vocab_size": parts.model_cfg.vocab_size, "dtype": parts.model_cfg.dtype,
                  "attention_kernel": parts.model_cfg.attention_kernel, "remat": parts.model_cfg.remat,
                  "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))},
        "batch": {k: list(s.shape) for k, s in parts.batch_spec.items()},
        "mesh": dict(parts.mesh.shape),
        "steps_timed": fv.steps,
        "step_times_s": times,
        "median_step_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "mfu": achieved / (peak * n_dev),
        "compile_s": compile_s,
        "setup_s": t1 - t0,
        "memory_per_device_bytes": {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp,
                                    "peak_estimate": arg + out - alias + temp},
        "process_peak_rss_bytes": peak_rss_bytes(),
        "final_loss": loss,
        "machine": machine_info(),
    }
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    print(table([
        ("config", f"{name} ({result['model']['parameters'] / 1e6:.2f}M parameters, {parts.model_cfg.dtype}, "
                   f"kernel {parts.model_cfg.attention_kernel})"),
        ("batch", ", ".join(f"{k} {v}" for k, v in result["batch"].items() if k in ("inputs", "encoder_inputs", "decoder_inputs"))),
        ("median step", f"{step_s * 1e3:.1f} ms over {fv.steps} steps (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"),
        ("tokens/s", f"{tokens / step_s:,.0f}"),
        ("achieved FLOP/s", f"{achieved:.3g} ({flops:.3g} model FLOPs per step)"),
        ("MFU", f"{result['mfu']:.3f} of {peak:.3g} FLOP/s per device ({peak_source}) x {n_dev}"),
        ("compile", f"{compile_s:.1f} s"),
        ("memory / device", f"arguments {mib(arg)}, temporaries {mib(temp)}, peak ~{mib(arg + out - alias + temp)}"),
        ("process peak RSS", mib(result["process_peak_rss_bytes"])),
        ("load average", " ".join(f"{x:.2f}" for x in result["machine"]["load_average_1_5_15"])),
    ]))
    if fv.save:
        print(f"wrote {write_result(name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
