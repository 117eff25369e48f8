"""Scanned against unrolled layer stacks (model.scan_layers) at several depths: the train step's compile time,
its program size and its median step time on this machine. JSON in benchmarks/results/scan_layers.json.

    python -m benchmarks.scan_layers --config configs/gpt_tiny.py --layers 4,32 [--steps 10] [--config.x=y ...]

The step is the one `llmjax train` runs (llmjax.compile.build_train_step) on a batch of random tokens with the
config's shapes; the depth and the layout are the only changes between the rows.
"""

from __future__ import annotations

import statistics
import sys
import time


def _define(fv):
    from absl import flags

    flags.DEFINE_list("layers", ["4", "32"], "depths to compare", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "timed steps (after one untimed step)", flag_values=fv)
    flags.DEFINE_string("name", "scan_layers", "result name", flag_values=fv)


def measure(cfg, steps: int) -> dict:
    """Compile time, StableHLO size and median step time of cfg's train step."""
    import jax

    from llmjax.compile import build_train_step, random_batch
    from llmjax.step import global_batch

    parts = build_train_step(cfg)
    state = parts.init_state(int(cfg.train.seed))
    batch = global_batch(random_batch(parts.batch_spec, parts.model_cfg.vocab_size), parts.mesh)
    t = time.perf_counter()
    lowered = parts.step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {"compile_s": round(compile_s, 2), "hlo_chars": len(lowered.as_text()),
            "step_ms": round(1000 * statistics.median(times), 1)}



def main(argv: list[str]) -> int:
    from llmjax import runtime
    from llmjax.cli.flags import parse_config_flags

    runtime.prepare_process(many_steps=True)  # as `llmjax train` does, before JAX starts
    fv = parse_config_flags(argv, define=_define)

    from benchmarks.common import machine_info, write_result

    rows = []
    for n in map(int, fv.layers):
        for scan in (False, True):
            cfg = fv.config.copy_and_resolve_references()
            cfg.unlock()
            cfg.model.update(num_layers=n, scan_layers=scan)
            row = {"num_layers": n, "scan_layers": scan, **measure(cfg, fv.steps)}
            print(f"{n:3d} layers {'scanned ' if scan else 'unrolled'}: compile {row['compile_s']:7.2f} s, "
                  f"StableHLO {row['hlo_chars'] / 1e3:8.0f} kchars, step {row['step_ms']:8.1f} ms", flush=True)
            rows.append(row)
    write_result(fv.name, {"command": " ".join(["python -m benchmarks.scan_layers", *argv[1:]]), "rows": rows,
                           "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main(["benchmarks.scan_layers", *sys.argv[1:]]))
