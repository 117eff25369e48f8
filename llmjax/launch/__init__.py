"""Launchers: run one llmjax command as many JAX processes (local, SLURM, Kubernetes JobSet, Cloud TPU VM).

Every launched process runs `python -m CHILD_MODULE <command>` (llmjax.cli.child), which calls
`maybe_initialize_distributed()` (environment contract in `llmjax.launch.distributed`) and then the usual command
line. `llmjax launch` (llmjax.cli.launch) parses the options with `build_parser()`.
"""

from __future__ import annotations

import argparse

from llmjax.launch import k8s, slurm, tpu_vm
from llmjax.launch.distributed import (  # noqa: F401  (public API)
    CHILD_MODULE,
    DistributedSettings,
    LaunchError,
    distributed_settings,
    maybe_initialize_distributed,
)

USAGE_EXAMPLES = """examples:
  llmjax launch local --num-processes 2 --devices-per-process 4 -- train --config configs/gpt_tiny.py --workdir runs/x
  llmjax launch slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 -- train --config ... --workdir ...
  llmjax launch k8s --name gpt --image IMAGE --num-hosts 2 --tpu-accelerator tpu-v5p-slice --tpu-topology 2x2x2 \\
      -o jobset.yaml -- train --config ... --workdir gs://bucket/run
  llmjax launch tpu-vm --name my-tpu --zone us-central2-b -- train --config ... --workdir gs://bucket/run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmjax launch", description="Run an llmjax command as a multi-process JAX job.",
        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True, metavar="{local,slurm,k8s,tpu-vm}")
    p = sub.add_parser("local", help="N processes on this machine (gloo CPU collectives), fail fast",
                       usage="llmjax launch local --num-processes N [options] -- COMMAND ...")
    p.add_argument("--num-processes", "-n", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="simulate D CPU devices per process (sets JAX_PLATFORMS=cpu and XLA_FLAGS)")
    p.add_argument("--log-dir", default=None, help="rank{i}.log files here (default: WORKDIR/logs)")
    p.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace-seconds", type=float, default=10.0,
                   help="after a failure: SIGTERM the other ranks, SIGKILL them after this long")
    p.add_argument("--quiet", action="store_true", help="only log files, no rank-prefixed console output")
    slurm.add_arguments(sub.add_parser("slurm", help="render and submit an sbatch script",
                                       usage="llmjax launch slurm [options] -- COMMAND ..."))
    k8s.add_arguments(sub.add_parser("k8s", help="write a Kubernetes JobSet manifest (GKE TPU / GPU)",
                                     usage="llmjax launch k8s --name N --image I [options] -- COMMAND ..."))
    tpu_vm.add_arguments(sub.add_parser("tpu-vm", help="print the gcloud commands for a Cloud TPU VM",
                                        usage="llmjax launch tpu-vm --name N --zone Z [options] -- COMMAND ..."))
    return parser
