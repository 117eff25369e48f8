"""Real SLURM end to end: a one-node cluster on localhost (Debian's slurmctld + slurmd, auth/none, its own
slurm.conf in a temp dir) runs `llmjax launch slurm` as a 2-task job, each task a JAX process with 2 simulated
CPU devices joined over gloo; the job trains a tiny GPT for 3 steps and exits 0.

Needs root (the daemons run as root) and the slurm-wlm packages; they are apt-get installed when missing.
Skipped, with the reason, when neither is possible.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch import TINY_TRAIN

pytestmark = pytest.mark.slow

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
SLURM_CONF = """\
ClusterName=llmjaxtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_slurm():
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "sinfo")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM (slurmctld, slurmd, sbatch) is not installed and apt-get as root is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                           capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not apt-get install {' '.join(PACKAGES)}: {r.stderr[-500:]}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Start slurmctld + slurmd for one node; yields the environment (SLURM_CONF) for the client commands."""
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root")
    _ensure_slurm()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, d=d, ctld_port=_free_port(), d_port=_free_port(),
                                      cpus=max(2, os.cpu_count() or 2)))
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = [subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)]
    time.sleep(1)
    daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", host], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in daemons):
                break
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            state = r.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            time.sleep(1)
        else:
            state = f"timeout (node state {state!r})"
        if state not in ("idle", "mixed", "allocated"):
            logs = "\n".join(f"--- {n}\n{(d / n).read_text()[-2000:]}" for n in ("slurmctld.log", "slurmd.log")
                             if (d / n).exists())
            pytest.fail(f"the test SLURM cluster did not come up: {state}\n{logs}")
        yield env, d
    finally:
        for p in reversed(daemons):
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_slurm_two_task_training_job(slurm_cluster, tmp_path):
    env, d = slurm_cluster
    workdir = tmp_path / "run"
    out = tmp_path / "job-%j.out"
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "llmjax.cli", "launch", "slurm", "--nodes", "1", "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--devices-per-task", "2", "--time", "00:10:00", "--job-name", "llmjax-test",
           f"--output={out}", "--python", sys.executable, "--wait", f"--setup=cd {repo}",
           "--", "train", "--config", str(repo / "configs/gpt_tiny.py"), "--workdir", str(workdir), *TINY_TRAIN]
    # SLURM exports the submitting environment to the job: keep the test's own JAX settings out of it.
    job_env = {k: v for k, v in env.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    outs = sorted(tmp_path.glob("job-*.out"))
    job_log = outs[0].read_text() if outs else "(no job output file)"
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- job output\n{job_log[-4000:]}"
    assert "submitted job" in r.stdout
    # Two JAX processes of 2 devices each formed one 4-device runtime and trained to the end.
    assert job_log.count("validation loss:") == 2, job_log[-4000:]
    assert "CpuDevice(id=2049)" in job_log, job_log[-4000:]  # process 1's second device
    metrics = (workdir / "metrics.jsonl").read_text().splitlines()
    assert any('"step": 3' in line for line in metrics)
    print(f"SLURM job took {time.monotonic() - t0:.1f}s")
