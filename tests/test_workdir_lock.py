"""One run per workdir (llmjax.workdir): a second run on a workdir whose lock is held is refused with a message
naming the holder, before it writes anything; a lock left by a killed process does not block."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import portpicker
import pytest

from llmjax.metrics import read_metrics
from llmjax.models.config import ConfigError
from llmjax.workdir import LOCK_FILE, WorkdirLock, lock_workdir

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "gpt_tiny.py"


def env(devices=2):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def holder_of(workdir: pathlib.Path) -> dict:
    try:
        return json.loads((workdir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def wait_for_holder(workdir: pathlib.Path, proc, timeout=120) -> dict:
    t = time.time()
    while holder_of(workdir).get("pid") != proc.pid:
        assert proc.poll() is None, "the process ended before it held the lock"
        assert time.time() - t < timeout, "the lock was not taken in time"
        time.sleep(0.02)
    return holder_of(workdir)


def test_held_lock_refuses_names_the_holder_and_a_killed_holders_lock_is_recovered(tmp_path):
    workdir = tmp_path / "run"  # does not exist yet: the lock creates it
    code = ("import sys, time; from llmjax.workdir import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(workdir)], env=env(1), cwd=ROOT)
    try:
        info = wait_for_holder(workdir, holder)
        assert info["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as e:
            WorkdirLock(workdir).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel released the dead holder's flock; its lock file (and stale content) is still there
    assert holder_of(workdir).get("pid") == holder.pid
    with WorkdirLock(workdir) as lock:
        assert lock.held and holder_of(workdir)["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):  # a second open file in this process too
            WorkdirLock(workdir).acquire()
    assert not lock.held
    with lock_workdir(workdir):  # released on exit: it can be taken again
        pass
    with lock_workdir(workdir, enabled=False) as other_rank:  # the other ranks of a multi-process run take none
        assert not other_rank.held


def test_second_train_on_a_running_workdir_is_refused_and_the_first_finishes(tmp_path, small_corpus_dir):
    from conftest import SMALL_CORPUS

    workdir = tmp_path / "run"
    steps = 6
    args = ["train", f"--config={CONFIG}", f"--workdir={workdir}", *SMALL_CORPUS,
            f"--config.data.data_dir={small_corpus_dir}", "--config.model.d_model=32", "--config.model.mlp_dim=64",
            "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.train.num_samples=0",
            "--config.train.log_every=1", "--config.train.eval_every=1000", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=3", "--config.optim.warmup_steps=2", f"--config.train.steps={steps}"]
    cmd = [sys.executable, "-m", "llmjax.cli", *args]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
    try:
        wait_for_holder(workdir, first)
        # Freeze the holder (it keeps its lock): the second run meets a held lock, and the workdir stands still.
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
        second = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
        first.send_signal(signal.SIGCONT)
        assert second.returncode != 0
        assert "Traceback" not in second.stderr + second.stdout
        refusal = [line for line in second.stderr.splitlines() if line.startswith("llmjax train:")]
        assert len(refusal) == 1, second.stderr[-3000:]
        assert "in use" in refusal[0] and f"pid {first.pid}" in refusal[0] and socket.gethostname() in refusal[0]
        assert after == before, "the refused run wrote into the workdir"
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    steps_logged = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps_logged == list(range(1, steps + 1)), steps_logged  # one history
    with WorkdirLock(workdir):  # the finished run released its lock
        pass


TWO_PROCESS_LOCK = """
import sys
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from llmjax.models.config import ConfigError
from llmjax.workdir import lock_workdir
try:
    with lock_workdir(sys.argv[3]):
        result = "ran"
except ConfigError as e:
    result = f"refused: {e}"
with open(sys.argv[4], "w") as f:  # not stdout: gloo's C++ logging can land in the middle of a printed line
    f.write(result)
"""


def test_a_refused_lock_stops_every_process_of_a_multi_process_run(tmp_path):
    workdir = tmp_path / "run"

    def run_two():
        port = portpicker.pick_unused_port()
        results = [tmp_path / f"result{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_LOCK, str(i), str(port), str(workdir),
                                   str(results[i])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        return [r.read_text() for r in results]

    with WorkdirLock(workdir):  # another run holds it: both processes are refused (not only process 0)
        first, second = run_two()
    assert first.startswith(f"refused: workdir {workdir} is in use by another run (host "), first
    assert second.startswith(f"refused: workdir {workdir} is in use by another run (refused on process 0"), second
    assert run_two() == ["ran", "ran"]  # free again: one lock for the run, both processes run
