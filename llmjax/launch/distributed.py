"""`maybe_initialize_distributed()`: join the multi-process JAX runtime when a launcher asked for it.

Call it before anything touches a JAX backend (the launchers' child entry point, CHILD_MODULE, does).
Which runtime to join is read from the environment, first match wins:

  LLMJAX_DISTRIBUTED=0            never initialize (single process, whatever else is set)
  LLMJAX_COORDINATOR=host:port    explicit: with LLMJAX_NUM_PROCESSES and LLMJAX_PROCESS_ID (or, on
                                  Kubernetes indexed jobs, JOB_COMPLETION_INDEX); set by `launch local`
                                  and `launch k8s`. With several slices the id is within the slice, plus
                                  LLMJAX_SLICE_ID x LLMJAX_HOSTS_PER_SLICE
  SLURM job step (srun), >1 task  coordinator = first node of SLURM_STEP_NODELIST, port
                                  LLMJAX_COORDINATOR_PORT or derived from SLURM_JOB_ID; process id =
                                  SLURM_PROCID; a task alone on its node sees all the node's GPUs, several
                                  tasks per node get one GPU each (SLURM_LOCALID)
  LLMJAX_DISTRIBUTED=auto         jax.distributed.initialize() with no arguments (Cloud TPU VM pods, which
                                  JAX detects itself); set by `launch tpu-vm`
  otherwise                       nothing: one process

On CPU the cross-process collectives are gloo (LLMJAX_CPU_COLLECTIVES=gloo, the default; 'none' leaves JAX's
setting alone). LLMJAX_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

# What every launched process runs: `python -m CHILD_MODULE <llmjax command>` (joins, then runs the command).
CHILD_MODULE = "llmjax.cli.child"


class LaunchError(ValueError):
    """A launcher or distributed-setup mistake; the message names the option or variable and the fix."""


def config_path(command: list[str]) -> str | None:
    """The FILE of `--config FILE` / `--config=FILE` in an llmjax command line, or None."""
    for i, a in enumerate(command):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(command):
            return command[i + 1]
    return None


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    source: str  # 'env' | 'slurm' | 'auto'
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: every local device


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise LaunchError(f"{name} is not set; LLMJAX_COORDINATOR needs LLMJAX_NUM_PROCESSES and "
                          "LLMJAX_PROCESS_ID too") from None
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed count list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse SLURM tasks-per-node list {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else counts[-1]


def distributed_settings(env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """What `maybe_initialize_distributed` would do for this environment (None = stay single-process)."""
    env = os.environ if env is None else env
    mode = env.get("LLMJAX_DISTRIBUTED", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return None
    if env.get("LLMJAX_COORDINATOR"):
        n = _int(env, "LLMJAX_NUM_PROCESSES")
        key = "LLMJAX_PROCESS_ID" if "LLMJAX_PROCESS_ID" in env else "JOB_COMPLETION_INDEX"
        if key not in env:
            raise LaunchError("LLMJAX_COORDINATOR is set but neither LLMJAX_PROCESS_ID nor JOB_COMPLETION_INDEX is")
        pid = _int(env, key)
        if "LLMJAX_SLICE_ID" in env:  # several slices (launch k8s --num-slices): the id above counts within a slice
            pid += _int(env, "LLMJAX_SLICE_ID") * _int(env, "LLMJAX_HOSTS_PER_SLICE")
        if not 0 <= pid < n:
            raise LaunchError(f"{key}={pid} is outside 0..LLMJAX_NUM_PROCESSES-1={n - 1}")
        return DistributedSettings("env", env["LLMJAX_COORDINATOR"], n, pid)
    if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        n = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        if n > 1:
            port = env.get("LLMJAX_COORDINATOR_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
            host = first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
            node_id = int(env.get("SLURM_NODEID", "0"))
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
            local = None
            if slurm_tasks_on_node(per_node, node_id) > 1:  # several tasks share the node: one GPU each
                local = (int(env.get("SLURM_LOCALID", "0")),)
            return DistributedSettings("slurm", f"{host}:{port}", n, int(env["SLURM_PROCID"]), local)
    if mode == "auto":
        return DistributedSettings("auto")
    return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Initialize jax.distributed if the environment asks for it (see the module docstring).
    Returns True when this process is now part of a multi-process runtime. Safe to call twice."""
    settings = distributed_settings(env)
    if settings is None:
        return False
    env = os.environ if env is None else env
    import jax  # here, not at the top: the launcher process itself never starts JAX

    if jax.distributed.is_initialized():
        return True
    collectives = env.get("LLMJAX_CPU_COLLECTIVES", "gloo")
    if collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    timeout = int(env.get("LLMJAX_INIT_TIMEOUT", "300"))
    if settings.source == "auto":
        jax.distributed.initialize(initialization_timeout=timeout)
    else:
        log.info("jax.distributed: process %d of %d, coordinator %s (%s)", settings.process_id,
                 settings.num_processes, settings.coordinator, settings.source)
        jax.distributed.initialize(
            coordinator_address=settings.coordinator, num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
            cluster_detection_method="deactivate", initialization_timeout=timeout)
    return True
