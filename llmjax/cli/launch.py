"""`llmjax launch {local,slurm,k8s,tpu-vm} [options] -- <llmjax command>`: run one llmjax command as a
multi-process JAX job (llmjax.launch)."""

from __future__ import annotations

import sys

from llmjax.launch import LaunchError, build_parser, k8s, slurm, tpu_vm
from llmjax.launch.local import run_local


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
            return run_local(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                             log_dir=args.log_dir, port=args.port, grace_seconds=args.grace_seconds,
                             echo=not args.quiet)
        if args.target == "slurm":
            return slurm.run(args, command)
        if args.target == "k8s":
            return k8s.run(args, command)
        return tpu_vm.run(args, command)
    except LaunchError as e:  # one line naming the option and the fix
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 0)
