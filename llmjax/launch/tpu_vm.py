"""`llmjax launch tpu-vm`: the commands that copy the user's llmjax checkout to every worker of a Cloud TPU VM,
install it there and train.

llmjax is not on PyPI: the workers get it from the checkout the launcher is run in (`--source`, default `.`).
The files git sees there (tracked plus untracked-but-not-ignored, so uncommitted edits and new configs come
along; venv/ and runs/ do not) are packed into a tarball, copied to every worker with `gcloud ... scp`, unpacked
into ~/llmjax (`--remote-dir`) and installed with `jax[tpu]` of the pinned jax version into a Python 3.11 venv,
~/llmjax-venv, made by uv (`--python` uses an interpreter the workers have instead). Training then runs
from that directory, so `--config configs/NAME.py` names the same file on every host as here.
Each worker runs `LLMJAX_DISTRIBUTED=auto ~/llmjax-venv/bin/python -m llmjax.cli.child <command>`; JAX finds
the pod's other hosts itself. Use a shared --workdir (see docs/cluster.md): every host takes part in checkpoint saves.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from llmjax.launch.distributed import CHILD_MODULE, LaunchError, config_path

REMOTE_DIR = "llmjax"  # on each worker, relative to the home directory
# The TPU VM images (Ubuntu 22.04) have Python 3.10 and llmjax needs 3.11: the workers get a Python 3.11 venv
# made by uv (its installer pinned here), unless --python names an interpreter they already have.
UV_VERSION = "0.13.9"
VENV = "~/llmjax-venv"
_SIMPLE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def _jax_version() -> str:
    try:
        return metadata.version("jax")
    except metadata.PackageNotFoundError:
        return ""


def check_config_in_checkout(command: list[str], source: str, where: str) -> None:
    """A --config the workers can open: a path relative to the checkout (they run from their copy of it)."""
    path = config_path(command)
    if path is None:
        return
    if Path(path).is_absolute():
        raise LaunchError(f"llmjax launch: --config {path} is an absolute path of this machine; give it relative to "
                          f"the llmjax checkout, e.g. configs/{Path(path).name}: {where}")
    if not (Path(source) / path).is_file():
        raise LaunchError(f"llmjax launch: --config {path} is not a file of the checkout {source}; {where}")


def bundle_command(source: str, bundle: str) -> list[str]:
    """Pack the checkout's files, as git lists them, into the tarball `bundle` (run here)."""
    q = shlex.quote
    script = (f"set -euo pipefail; git -C {q(source)} ls-files -z --cached --others --exclude-standard | "
              f"tar -czf {q(bundle)} -C {q(source)} --null --ignore-failed-read -T -")
    return ["bash", "-c", script]


def tpu_vm_commands(command: list[str], *, name: str, zone: str, project: str = "", source: str = ".",
                    bundle: str = "", remote_dir: str = REMOTE_DIR, python: str = "", env: list[str] = (),
                    setup: list[str] = (), install: bool = True) -> list[list[str]]:
    """argv lists: pack the checkout (here), `gcloud compute tpus tpu-vm scp` it to every worker, then
    `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command '...'` to unpack, install and train."""
    if not name or not zone:
        raise LaunchError("llmjax launch tpu-vm: --name and --zone are required")
    if not command:
        raise LaunchError("llmjax launch tpu-vm: give the command after --, e.g. -- train --config ... "
                          "--workdir gs://bucket/run")
    if not _SIMPLE_PATH.match(remote_dir) or ".." in remote_dir.split("/"):
        raise LaunchError(f"llmjax launch tpu-vm: --remote-dir {remote_dir!r} must be a plain path relative to the "
                          "workers' home directory, e.g. llmjax")
    if install and not (Path(source) / "pyproject.toml").is_file():
        raise LaunchError(f"llmjax launch tpu-vm: --source {source} is not an llmjax checkout (no pyproject.toml); "
                          "run this in your checkout or pass --source DIR")
    check_config_in_checkout(command, source, f"the workers run from their copy of it (~/{remote_dir})")
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={zone}"] + ([f"--project={project}"] if project else []) + ["--worker=all"]

    def ssh(steps: list[str]) -> list[str]:  # the remote shell starts in the home directory
        return gcloud + ["ssh", name, *where, "--command", " && ".join(list(setup) + steps)]

    out = []
    tarball = f"{remote_dir}-src.tgz"
    if install:
        bundle = bundle or f"/tmp/llmjax-src-{name}.tgz"
        jax_spec = shlex.quote(f"jax[tpu]=={_jax_version()}" if _jax_version() else "jax[tpu]")
        out.append(bundle_command(source, bundle))
        out.append(gcloud + ["scp", bundle, f"{name}:{tarball}", *where])
        out.append(gcloud + ["ssh", name, *where, "--command",
                             f"rm -rf {remote_dir} && mkdir -p {remote_dir} && tar -xzf {tarball} -C {remote_dir}"])
        if python:
            out.append(ssh([f"{shlex.quote(python)} -m pip install {jax_spec} ./{remote_dir}"]))
        else:
            uv = "~/.local/bin/uv"
            out.append(ssh([f"curl -LsSf https://astral.sh/uv/{UV_VERSION}/install.sh | sh",
                            f"{uv} venv --python 3.11 --clear {VENV}",
                            f"{uv} pip install --python {VENV}/bin/python {jax_spec} ./{remote_dir}"]))
    exports = ["LLMJAX_DISTRIBUTED=auto", "PYTHONUNBUFFERED=1"]
    for kv in env:
        if "=" not in kv:
            raise LaunchError(f"llmjax launch tpu-vm: --env {kv!r} must look like NAME=VALUE")
        k, v = kv.split("=", 1)
        exports.append(f"{k}={shlex.quote(v)}")
    interpreter = shlex.quote(python) if python else f"{VENV}/bin/python"  # unquoted: the worker's shell expands ~
    train = " ".join(exports) + f" {interpreter} " + shlex.join(["-m", CHILD_MODULE, *command])
    out.append(ssh([f"cd {remote_dir}", train]))
    return out


def add_arguments(p) -> None:
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--source", default=".", help="the llmjax checkout copied to the workers (default: .)")
    p.add_argument("--bundle", default="",
                   help="the checkout's tarball, written here (default /tmp/llmjax-src-NAME.tgz)")
    p.add_argument("--remote-dir", default=REMOTE_DIR, help="where the checkout goes on each worker, under ~")
    p.add_argument("--no-install", action="store_true",
                   help="skip packing, copying and installing (the workers already have ~/REMOTE_DIR)")
    p.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run first on each worker, e.g. 'source ~/venv/bin/activate'")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--python", default="",
                   help="a Python 3.11 the workers have (default: make ~/llmjax-venv with uv and use it)")
    p.add_argument("--execute", action="store_true", help="run the commands (needs gcloud) instead of printing")


def commands(args, command: list[str]) -> list[list[str]]:
    return tpu_vm_commands(command, name=args.name, zone=args.zone, project=args.project, source=args.source,
                           bundle=args.bundle, remote_dir=args.remote_dir, python=args.python, env=args.env,
                           setup=args.setup, install=not args.no_install)


def render(args, command: list[str]) -> str:
    """What `llmjax launch tpu-vm` prints: one shell command per line."""
    return "".join(shlex.join(c) + "\n" for c in commands(args, command))


def run(args, command: list[str]) -> int:
    if not args.execute:
        sys.stdout.write(render(args, command))
        return 0
    for c in commands(args, command):
        print("+ " + shlex.join(c), flush=True)
        try:
            code = subprocess.call(c)
        except FileNotFoundError:
            print(f"llmjax launch tpu-vm: {c[0]} not found; install the Google Cloud CLI or drop --execute",
                  file=sys.stderr)
            return 127
        if code != 0:
            return code
    return 0
