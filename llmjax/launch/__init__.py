"""`llmjax launch {local,slurm,k8s,tpu-vm} [options] -- <llmjax command>`: run one job as many JAX processes.

Every launched process runs `python -m llmjax.launch.child <command>`, which calls
`maybe_initialize_distributed()` (environment contract in `llmjax.launch.distributed`) and then the usual CLI.
"""

from __future__ import annotations

import argparse
import sys

from llmjax.launch.distributed import (  # noqa: F401  (public API)
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
    from llmjax.launch import k8s, slurm, tpu_vm

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


def main(argv: list[str]) -> int:
    """`argv` is what follows `llmjax launch` (a leading 'launch' is dropped too); returns the exit code."""
    argv = list(argv)
    if argv and argv[0] == "launch":
        argv = argv[1:]
    if "--" in argv:
        cut = argv.index("--")
        options, command = argv[:cut], argv[cut + 1:]
    else:
        options, command = argv, []
    parser = build_parser()
    try:
        args = parser.parse_args(options)
    except SystemExit as e:  # argparse already printed the message
        return int(e.code or 0)
    if not command:
        print(f"llmjax launch {args.target}: give the llmjax command to run after --, e.g. `llmjax launch "
              f"{args.target} ... -- train --config configs/gpt_tiny.py --workdir runs/x`", file=sys.stderr)
        return 2
    try:
        if args.target == "local":
            from llmjax.launch.local import run_local

            return run_local(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                             log_dir=args.log_dir, port=args.port, grace_seconds=args.grace_seconds,
                             echo=not args.quiet)
        if args.target == "slurm":
            from llmjax.launch import slurm

            return slurm.run(args, command)
        if args.target == "k8s":
            from llmjax.launch import k8s

            return k8s.run(args, command)
        from llmjax.launch import tpu_vm

        return tpu_vm.run(args, command)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 0)
