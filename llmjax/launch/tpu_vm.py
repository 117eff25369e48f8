"""`llmjax launch tpu-vm`: the gcloud commands that install llmjax on every worker of a Cloud TPU VM and train.

Each worker runs `LLMJAX_DISTRIBUTED=auto python3 -m llmjax.cli.child <command>`; JAX finds the pod's other
hosts itself. Use a gs:// (or otherwise shared) --workdir: every host takes part in checkpoint saves.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib import metadata

from llmjax.launch.distributed import CHILD_MODULE


def _jax_version() -> str:
    try:
        return metadata.version("jax")
    except metadata.PackageNotFoundError:
        return ""


def tpu_vm_commands(command: list[str], *, name: str, zone: str, project: str = "", package: str = "llmjax",
                    python: str = "python3", env: list[str] = (), setup: list[str] = (),
                    install: bool = True) -> list[list[str]]:
    """argv lists for `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command '...'`."""
    if not name or not zone:
        raise SystemExit("llmjax launch tpu-vm: --name and --zone are required")
    if not command:
        raise SystemExit("llmjax launch tpu-vm: give the command after --, e.g. -- train --config ... "
                         "--workdir gs://bucket/run")
    base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}"]
    if project:
        base.append(f"--project={project}")
    base.append("--worker=all")
    out = []
    if install:
        jax_spec = f"jax[tpu]=={_jax_version()}" if _jax_version() else "jax[tpu]"
        steps = [shlex.join([python, "-m", "pip", "install", "-U", jax_spec, package])]
        out.append(base + ["--command", " && ".join(list(setup) + steps)])
    exports = ["LLMJAX_DISTRIBUTED=auto", "PYTHONUNBUFFERED=1"]
    for kv in env:
        if "=" not in kv:
            raise SystemExit(f"llmjax launch tpu-vm: --env {kv!r} must look like NAME=VALUE")
        k, v = kv.split("=", 1)
        exports.append(f"{k}={shlex.quote(v)}")
    train = " ".join(exports) + " " + shlex.join([python, "-m", CHILD_MODULE, *command])
    out.append(base + ["--command", " && ".join(list(setup) + [train])])
    return out


def add_arguments(p) -> None:
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--package", default="llmjax",
                   help="pip requirement to install on the workers, e.g. 'git+https://github.com/ORG/llmjax@main'")
    p.add_argument("--no-install", action="store_true", help="skip the install command")
    p.add_argument("--setup", action="append", default=[], metavar="CMD", help="shell line run first on each worker")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--python", default="python3")
    p.add_argument("--execute", action="store_true", help="run the commands (needs gcloud) instead of printing")


def run(args, command: list[str]) -> int:
    cmds = tpu_vm_commands(command, name=args.name, zone=args.zone, project=args.project, package=args.package,
                           python=args.python, env=args.env, setup=args.setup, install=not args.no_install)
    if not args.execute:
        for c in cmds:
            print(shlex.join(c))
        return 0
    for c in cmds:
        print("+ " + shlex.join(c), flush=True)
        try:
            code = subprocess.call(c)
        except FileNotFoundError:
            print("llmjax launch tpu-vm: gcloud not found; install the Google Cloud CLI or drop --execute",
                  file=sys.stderr)
            return 127
        if code != 0:
            return code
    return 0
