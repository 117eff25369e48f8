"""`llmjax launch local`: N JAX processes on this machine, gloo collectives, one log per rank, fail fast.

Each rank runs `python -m llmjax.cli.child <command>` with LLMJAX_COORDINATOR / LLMJAX_NUM_PROCESSES /
LLMJAX_PROCESS_ID set; its output goes to LOG_DIR/rank{i}.log and, prefixed with `[rank i]`, to the console.
When a rank exits non-zero the others get SIGTERM, then SIGKILL after --grace-seconds.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmjax.launch.distributed import CHILD_MODULE


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir_of(command: list[str]) -> str | None:
    """The --workdir value of an llmjax command line, if it has one."""
    for i, a in enumerate(command):
        if a == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
    return None


def child_env(base: dict, *, rank: int, num_processes: int, coordinator: str | None,
              devices_per_process: int | None) -> dict:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    env["LLMJAX_RANK_LABEL"] = str(rank)
    if coordinator is not None:
        env.update(LLMJAX_COORDINATOR=coordinator, LLMJAX_NUM_PROCESSES=str(num_processes),
                   LLMJAX_PROCESS_ID=str(rank))
    else:
        for k in ("LLMJAX_COORDINATOR", "LLMJAX_NUM_PROCESSES", "LLMJAX_PROCESS_ID"):
            env.pop(k, None)
    if devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL me if the launcher dies (Linux), so no rank outlives a killed launcher."""
    try:

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the launcher's own signal handling still stops the ranks
        pass


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Rank:
    def __init__(self, rank: int, proc: subprocess.Popen, log_path: Path, echo: bool):
        self.rank, self.proc, self.log_path = rank, proc, log_path
        self.thread = threading.Thread(target=self._pump, args=(echo,), daemon=True)
        self.thread.start()

    def _pump(self, echo: bool) -> None:
        with open(self.log_path, "w", buffering=1) as f:
            for line in iter(self.proc.stdout.readline, ""):
                f.write(line)
                if echo:
                    sys.stdout.write(f"[rank {self.rank}] {line if line.endswith(chr(10)) else line + chr(10)}")
                    sys.stdout.flush()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # its own session: reaches anything it started too
            except ProcessLookupError:
                pass


def run_local(command: list[str], *, num_processes: int, devices_per_process: int | None = None,
              log_dir: str | None = None, port: int | None = None, grace_seconds: float = 10.0,
              echo: bool = True, python: str | None = None) -> int:
    """Run `command` (an llmjax command line without the program name) in `num_processes` processes.
    Returns 0 when every rank succeeded, else the failed rank's exit code (1 for a signal)."""
    if num_processes < 1:
        raise SystemExit("llmjax launch local: --num-processes must be at least 1")
    if not command:
        raise SystemExit("llmjax launch local: give the command after --, e.g. -- train --config configs/gpt_tiny.py "
                         "--workdir runs/x")
    wd = workdir_of(command)
    logs = Path(log_dir or (Path(wd) / "logs" if wd else Path("llmjax-launch-logs")))
    logs.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{port or free_port()}" if num_processes > 1 else None
    argv = [python or sys.executable, "-m", CHILD_MODULE, *command]
    ranks: list[_Rank] = []
    for i in range(num_processes):
        env = child_env(os.environ, rank=i, num_processes=num_processes, coordinator=coordinator,
                        devices_per_process=devices_per_process)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, errors="replace",
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        ranks.append(_Rank(i, proc, logs / f"rank{i}.log", echo))
        print(f"llmjax launch: rank {i} pid {proc.pid}, log {logs / f'rank{i}.log'}", flush=True)

    stop = threading.Event()
    previous = {}

    def on_signal(signum, frame):
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
    failed: _Rank | None = None
    try:
        while not stop.is_set():
            codes = [r.proc.poll() for r in ranks]
            bad = [r for r, c in zip(ranks, codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        if failed is not None or stop.is_set():
            _stop_all(ranks, grace_seconds)
        for r in ranks:
            r.proc.wait()
            r.thread.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
    if stop.is_set() and failed is None:
        print("llmjax launch: interrupted; stopped every rank", file=sys.stderr, flush=True)
        return 130
    if failed is not None:
        code = failed.proc.returncode
        print(f"llmjax launch: rank {failed.rank} failed ({_signal_name(code)}); stopped the other ranks. "
              f"Its log: {failed.log_path}", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    print(f"llmjax launch: all {num_processes} ranks finished; logs in {logs}", flush=True)
    return 0


def _stop_all(ranks: list[_Rank], grace_seconds: float) -> None:
    for r in ranks:
        r.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(r.proc.poll() is None for r in ranks):
        time.sleep(0.1)
    for r in ranks:
        r.signal(signal.SIGKILL)
