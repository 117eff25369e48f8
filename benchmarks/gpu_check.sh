#!/usr/bin/env bash
# Check a GPU machine end to end, from an llmjax checkout installed with `pip install -e '.[cuda]'`:
#   1. the devices JAX sees;
#   2. a short gpt_tiny training run (llmjax train --config configs/gpt_tiny.py);
#   3. the throughput benchmark on configs/bench_gpt_gpu.py (GPT-2 small, T=1024, bfloat16, cuDNN attention
#      `dot_product`): tokens/s and MFU against the GPU's dense bf16 peak (llmjax/metrics.py KNOWN_PEAKS:
#      A100 312, H100 SXM 989, H200 989 TFLOP/s), saved to benchmarks/results/bench_gpt_gpu.json.
# Without a GPU it says so after step 2 and exits 0.
#
#     bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default python3); GPU_CHECK_WORKDIR (default: a new temporary directory);
# GPU_CHECK_STEPS (training steps, default 300); GPU_CHECK_TRAIN_ARGS (more --config.x=y overrides for step 2);
# GPU_CHECK_BENCH_STEPS (timed benchmark steps, default 20); GPU_CHECK_PEAK_FLOPS (peak FLOP/s per device, for a
# GPU missing from KNOWN_PEAKS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
work=${GPU_CHECK_WORKDIR:-$(mktemp -d -t llmjax-gpu-check.XXXXXX)}
steps=${GPU_CHECK_STEPS:-300}
read -r -a train_args <<< "${GPU_CHECK_TRAIN_ARGS:-}"

echo "== 1/3 devices"
gpus=$("$py" - <<'PYEOF'
import sys

import jax

print(f"jax {jax.__version__}, default backend {jax.default_backend()}, {jax.device_count()} device(s):",
      file=sys.stderr)
for d in jax.devices():
    print(f"  {d} ({d.device_kind})", file=sys.stderr)
print(sum(d.platform == "gpu" for d in jax.devices()))
PYEOF
)

echo "== 2/3 gpt_tiny training, $steps steps, workdir $work/gpt_tiny"
"$py" -m llmjax.cli train --config configs/gpt_tiny.py --workdir "$work/gpt_tiny" \
    "--config.train.steps=$steps" "${train_args[@]}"
"$py" - "$work/gpt_tiny/metrics.jsonl" "$steps" <<'PYEOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
last = max(r["step"] for r in rows)
assert last == int(sys.argv[2]), f"training stopped at step {last}, not {sys.argv[2]}"
print(f"gpt_tiny trained to step {last}: {len(rows)} metric rows in {sys.argv[1]}")
PYEOF

echo "== 3/3 throughput, configs/bench_gpt_gpu.py (bfloat16, dot_product attention)"
if [ "$gpus" -eq 0 ]; then
    echo "no GPU found: JAX sees no GPU device, so the GPU throughput benchmark is skipped (CPU part passed)"
    exit 0
fi
peak=()
if [ -n "${GPU_CHECK_PEAK_FLOPS:-}" ]; then
    peak=("--peak_flops=$GPU_CHECK_PEAK_FLOPS")
fi
"$py" -m benchmarks.throughput --config configs/bench_gpt_gpu.py --steps "${GPU_CHECK_BENCH_STEPS:-20}" "${peak[@]}"
"$py" - benchmarks/results/bench_gpt_gpu.json <<'PYEOF'
import json
import sys

r = json.load(open(sys.argv[1]))
m = r["machine"]
print(f"{m['device_count']} x {m['device_kind']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f} "
      f"against {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device ({r['peak_source']})")
if "measured" in r["peak_source"]:
    print("warning: this GPU is not in llmjax.metrics.KNOWN_PEAKS, so MFU is against a measured float32 matmul; "
          "set GPU_CHECK_PEAK_FLOPS to its dense bf16 peak")
PYEOF
