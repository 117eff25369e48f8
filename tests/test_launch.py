"""`llmjax launch`: a real 2-process local training run, fail-fast when a rank dies, the distributed
environment contract, and the SLURM script, Kubernetes JobSet manifest and TPU VM commands it renders.

The JobSet manifest is checked against the Kubernetes JSON schemas shipped by kubernetes-validate (pod and
Job parts, strict: unknown fields fail) and JOBSET_SCHEMA below, a JSON schema of the JobSet v1alpha2 fields
written by hand from the JobSet API types (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go).
"""

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmjax.cli import launch as launch_command
from llmjax.launch import k8s, local
from llmjax.launch.tpu_vm import UV_VERSION, _jax_version
from llmjax.launch.distributed import (CHILD_MODULE, LaunchError, distributed_settings, first_slurm_host,
                                       slurm_tasks_on_node)

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--config.data.max_documents=200", "--config.data.vocab_size=1000", "--config.model.vocab_size=1000",
              "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
              "--config.train.eval_batches=1", "--config.train.num_samples=0", "--config.train.batch_size=8",
              "--config.train.seq_length=64"]


def _launch_cmd(workdir, *extra_train):
    return [sys.executable, "-m", "llmjax.cli", "launch", "local", "--num-processes", "2", "--devices-per-process", "2",
            "--grace-seconds", "5", "--", "train", "--config", str(REPO / "configs/gpt_tiny.py"),
            "--workdir", str(workdir), *TINY_TRAIN, *extra_train]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def test_local_killed_rank_stops_the_launch(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_launch_cmd(workdir, "--config.train.steps=100000"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pids = {}
        t0 = time.monotonic()
        while len(pids) < 2:  # "llmjax launch: rank i pid P, log ..."
            line = proc.stdout.readline()
            assert line, "launcher ended before starting both ranks"
            if line.startswith("llmjax launch: rank"):
                words = line.split()
                pids[int(words[3])] = int(words[5].rstrip(","))
        log1 = workdir / "logs" / "rank1.log"
        while "JAX cpu devices" not in (log1.read_text() if log1.exists() else ""):  # distributed runtime is up
            assert time.monotonic() - t0 < 120 and proc.poll() is None, "rank 1 never started"
            time.sleep(0.2)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher stops its ranks
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0
    assert "rank 1 failed (signal SIGKILL)" in err and str(log1) in err, err
    for pid in pids.values():  # nothing left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_child_env_sets_devices_and_contract():
    env = local.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}, rank=1,
                                 num_processes=3, coordinator="127.0.0.1:1234", devices_per_process=2)
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2" and env["JAX_PLATFORMS"] == "cpu"
    s = distributed_settings(env)
    assert (s.source, s.coordinator, s.num_processes, s.process_id) == ("env", "127.0.0.1:1234", 3, 1)


def test_distributed_settings_contract():
    assert distributed_settings({}) is None
    assert distributed_settings({"LLMJAX_DISTRIBUTED": "0", "LLMJAX_COORDINATOR": "h:1"}) is None
    assert distributed_settings({"LLMJAX_DISTRIBUTED": "auto"}).source == "auto"
    k8s_env = {"LLMJAX_COORDINATOR": "a-workers-0-0.a:8476", "LLMJAX_NUM_PROCESSES": "4", "JOB_COMPLETION_INDEX": "3"}
    assert distributed_settings(k8s_env).process_id == 3
    with pytest.raises(LaunchError, match="LLMJAX_NUM_PROCESSES"):
        distributed_settings({"LLMJAX_COORDINATOR": "h:1", "LLMJAX_PROCESS_ID": "0"})
    with pytest.raises(LaunchError, match="outside"):
        distributed_settings({"LLMJAX_COORDINATOR": "h:1", "LLMJAX_PROCESS_ID": "2", "LLMJAX_NUM_PROCESSES": "2"})
    srun = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_STEP_NODELIST": "gpu[003-006],cpu1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
            "SLURM_LOCALID": "1"}
    s = distributed_settings(srun)
    assert (s.source, s.coordinator, s.num_processes, s.process_id, s.local_device_ids) == (
        "slurm", "gpu003:32345", 8, 5, (1,))
    one_per_node = dict(srun, SLURM_STEP_TASKS_PER_NODE="1(x8)", LLMJAX_COORDINATOR_PORT="999")
    assert distributed_settings(one_per_node).local_device_ids is None  # the task owns all the node's GPUs
    assert distributed_settings(one_per_node).coordinator == "gpu003:999"
    assert distributed_settings(dict(srun, SLURM_STEP_NUM_TASKS="1")) is None  # one task: nothing to join
    assert distributed_settings({k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}) is None  # sbatch, no srun
    assert first_slurm_host("node7") == "node7" and first_slurm_host("a[1,5-7]") == "a1"
    assert slurm_tasks_on_node("2(x3),1", 3) == 1 and slurm_tasks_on_node("4", 0) == 4


def test_slurm_dry_run_script(capsys, tmp_path):
    out = tmp_path / "job.sbatch"
    code = launch_command.main(["slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time",
                                "12:00:00",
                                "--account", "proj", "--sbatch-line=--exclusive", "--setup", "source venv/bin/activate",
                                "--env", "WANDB_MODE=offline x", "--dry-run", f"--script-out={out}", "--",
                                "train", "--config", "configs/gpt_tiny.py", "--workdir", "/shared/run 1"])
    assert code == 0
    script = capsys.readouterr().out
    assert script == out.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "source venv/bin/activate", "export WANDB_MODE='offline x'"):
        assert line in script.splitlines(), line
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and shlex.split(srun[0])[-5:] == [
        "train", "--config", "configs/gpt_tiny.py", "--workdir", "/shared/run 1"]
    assert CHILD_MODULE in srun[0]
    r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_missing_command_is_a_clear_error(capsys):
    assert launch_command.main(["local", "-n", "2"]) == 2
    assert "after --" in capsys.readouterr().err


def test_tpu_vm_commands(capsys, tmp_path):
    """Pack the checkout here, scp it to every worker, unpack it into ~/llmjax, pip-install it with jax[tpu] of
    the pinned version, train from there (tests/test_launch_examples.py runs these commands)."""
    bundle = tmp_path / "src.tgz"
    assert launch_command.main(["tpu-vm", "--name", "pod", "--zone", "us-central2-b", "--project", "p", "--source",
                                str(REPO), "--bundle", str(bundle), "--setup", "source ~/venv/bin/activate", "--",
                                "train", "--config", "configs/gpt_tiny.py", "--workdir", "gs://b/run"]) == 0
    pack, scp, unpack, install, train = (shlex.split(line) for line in capsys.readouterr().out.splitlines())
    assert pack[:2] == ["bash", "-c"] and "ls-files" in pack[2] and str(bundle) in pack[2]
    where = ["--zone=us-central2-b", "--project=p", "--worker=all"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(bundle), "pod:llmjax-src.tgz", *where]
    for argv in (unpack, install, train):
        assert argv[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", *where, "--command"]
    assert unpack[10] == "rm -rf llmjax && mkdir -p llmjax && tar -xzf llmjax-src.tgz -C llmjax"
    # A Python 3.11 venv made by uv (TPU VM images have 3.10), the unpacked checkout installed into it.
    assert install[10].split(" && ") == [
        "source ~/venv/bin/activate", f"curl -LsSf https://astral.sh/uv/{UV_VERSION}/install.sh | sh",
        "~/.local/bin/uv venv --python 3.11 --clear ~/llmjax-venv",
        f"~/.local/bin/uv pip install --python ~/llmjax-venv/bin/python 'jax[tpu]=={_jax_version()}' ./llmjax"]
    steps = train[10].split(" && ")
    assert steps[:2] == ["source ~/venv/bin/activate", "cd llmjax"]
    remote = shlex.split(steps[2])
    assert remote[:3] == ["LLMJAX_DISTRIBUTED=auto", "PYTHONUNBUFFERED=1", "~/llmjax-venv/bin/python"]
    assert remote[-6:] == [CHILD_MODULE, "train", "--config", "configs/gpt_tiny.py", "--workdir", "gs://b/run"]
    # --python: an interpreter the workers already have, pip-installing into it.
    assert launch_command.main(["tpu-vm", "--name", "pod", "--zone", "z", "--source", str(REPO), "--python",
                                "python3.11", "--", "train", "--config", "configs/gpt_tiny.py"]) == 0
    install, train = (shlex.split(line)[-1] for line in capsys.readouterr().out.splitlines()[3:])
    assert install == f"python3.11 -m pip install 'jax[tpu]=={_jax_version()}' ./llmjax"
    assert "PYTHONUNBUFFERED=1 python3.11 -m llmjax.cli.child train" in train


@pytest.mark.parametrize("config, message", [
    ("/home/me/llmjax/configs/gpt_tiny.py", "absolute path of this machine; give it relative to the llmjax checkout"),
    ("configs/no_such.py", "is not a file of the checkout"),
])
def test_tpu_vm_config_must_be_in_the_checkout(capsys, config, message):
    assert launch_command.main(["tpu-vm", "--name", "pod", "--zone", "z", "--source", str(REPO), "--",
                                "train", "--config", config, "--workdir", "gs://b/run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_tpu_vm_source_must_be_a_checkout(capsys, tmp_path):
    assert launch_command.main(["tpu-vm", "--name", "pod", "--zone", "z", "--source", str(tmp_path), "--",
                                "train", "--config", "configs/gpt_tiny.py", "--workdir", "gs://b/run"]) == 2
    assert "is not an llmjax checkout (no pyproject.toml)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ Kubernetes
_STR_LIST = {"type": "array", "items": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
JOBSET_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["replicatedJobs"],
            "additionalProperties": False,
            "properties": {
                "replicatedJobs": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["name", "template"], "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "groupName": {"type": "string"},
                            "replicas": {**_INT32, "minimum": 0},
                            "template": {"type": "object", "required": ["spec"], "additionalProperties": False,
                                         "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}},
                            "dependsOn": {"type": "array", "maxItems": 5, "items": {
                                "type": "object", "required": ["name", "status"], "additionalProperties": False,
                                "properties": {"name": {"type": "string"},
                                               "status": {"enum": ["Ready", "Complete"]}}}},
                        },
                    },
                },
                "network": {"type": "object", "additionalProperties": False, "properties": {
                    "enableDNSHostnames": {"type": "boolean"}, "subdomain": {"type": "string"},
                    "publishNotReadyAddresses": {"type": "boolean"}}},
                "successPolicy": {"type": "object", "required": ["operator"], "additionalProperties": False,
                                  "properties": {"operator": {"enum": ["All", "Any"]},
                                                 "targetReplicatedJobs": _STR_LIST}},
                "failurePolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "maxRestarts": {**_INT32, "minimum": 0},
                    "restartStrategy": {"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["name", "action"], "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "action": {"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
                                                "RestartJob", "RestartJobAndIgnoreMaxRestarts"]},
                            "onJobFailureReasons": _STR_LIST, "onJobFailureMessagePatterns": _STR_LIST,
                            "targetReplicatedJobs": _STR_LIST}}}}},
                "startupPolicy": {"type": "object", "required": ["startupPolicyOrder"], "additionalProperties": False,
                                  "properties": {"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}}},
                "suspend": {"type": "boolean"},
                "coordinator": {"type": "object", "required": ["replicatedJob"], "additionalProperties": False,
                                "properties": {"replicatedJob": {"type": "string"}, "jobIndex": {"type": "integer"},
                                               "podIndex": {"type": "integer"}}},
                "managedBy": {"type": "string", "maxLength": 63},
                "ttlSecondsAfterFinished": {**_INT32, "minimum": 0},
            },
        },
    },
}
K8S_VERSION = "1.33.0"  # a GKE version; kubernetes-validate ships schemas for it


def _validate_jobset(manifest):
    jsonschema = importlib.import_module("jsonschema")
    kv = importlib.import_module("kubernetes_validate")
    jsonschema.validate(manifest, JOBSET_SCHEMA)  # JobSet's own fields
    for rj in manifest["spec"]["replicatedJobs"]:  # each job template is a batch/v1 Job spec
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{manifest['metadata']['name']}-x"},
               "spec": rj["template"]["spec"]}
        kv.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("accel", ["tpu", "gpu"])
def test_k8s_jobset_manifest_validates(accel, tmp_path):
    yaml = importlib.import_module("yaml")
    out = tmp_path / "jobset.yaml"
    opts = (["--tpu-accelerator", "tpu-v5p-slice", "--tpu-topology", "2x2x4", "--chips-per-host", "4"] if accel == "tpu"
            else ["--gpus-per-host", "8", "--gpu-accelerator", "nvidia-h100-80gb"])
    assert launch_command.main(["k8s", "--name", "gpt-run", "--image", "us-docker.pkg.dev/p/r/llmjax:1",
                                "--num-hosts", "4",
                                "--namespace", "ml", "--env", "A=1", *opts, "-o", str(out), "--",
                                "train", "--config", "configs/gpt_tiny.py", "--workdir", "gs://b/run"]) == 0
    manifest = yaml.safe_load(out.read_text())
    _validate_jobset(manifest)
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 4
    pod = job["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["LLMJAX_COORDINATOR"]["value"] == "gpt-run-workers-0-0.gpt-run:8476"  # job 0, pod 0, headless svc
    assert env["LLMJAX_NUM_PROCESSES"]["value"] == "4" and env["A"]["value"] == "1"
    assert "job-completion-index" in env["LLMJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert c["command"][1:3] == ["-m", CHILD_MODULE]
    assert c["workingDir"] == k8s.IMAGE_HOME == "/opt/llmjax"  # launch/Dockerfile's WORKDIR, holding configs/
    if accel == "tpu":
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                       "cloud.google.com/gke-tpu-topology": "2x2x4"}
        assert c["resources"]["limits"] == {"google.com/tpu": "4"}
    else:
        assert c["resources"]["limits"] == {"nvidia.com/gpu": "8"}


def test_k8s_multislice_jobset_has_a_job_per_slice_and_the_slice_variables():
    """Two v5p slices of 4 hosts: one indexed job per slice; process ids count slice by slice; the TPU runtime
    gets the MEGASCALE_* variables that join the slices."""
    m = k8s.jobset_manifest(["train", "--config", "configs/llama_7b.py", "--config.mesh.dcn_data=2"], name="a",
                            image="i", num_hosts=4, num_slices=2, tpu_accelerator="tpu-v5p-slice",
                            tpu_topology="2x2x4")
    _validate_jobset(m)
    rj = m["spec"]["replicatedJobs"][0]
    assert rj["replicas"] == 2 and rj["template"]["spec"]["parallelism"] == 4
    env = {e["name"]: e for e in rj["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLMJAX_NUM_PROCESSES"]["value"] == "8" and env["LLMJAX_HOSTS_PER_SLICE"]["value"] == "4"
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "a-workers-0-0.a"
    for name in ("LLMJAX_SLICE_ID", "MEGASCALE_SLICE_ID"):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    # Host 3 of slice 1 is process 7 of 8.
    pod = {"LLMJAX_COORDINATOR": "a-workers-0-0.a:8476", "LLMJAX_NUM_PROCESSES": "8", "LLMJAX_PROCESS_ID": "3",
           "LLMJAX_SLICE_ID": "1", "LLMJAX_HOSTS_PER_SLICE": "4"}
    assert distributed_settings(pod).process_id == 7
    with pytest.raises(SystemExit, match="--num-slices is for TPU slices"):
        k8s.jobset_manifest(["train"], name="a", image="i", num_slices=2)


def test_k8s_validation_catches_mistakes():
    """The validators are not rubber stamps: a misspelt pod field and a wrong JobSet field both fail."""
    jsonschema = importlib.import_module("jsonschema")
    kv = importlib.import_module("kubernetes_validate")
    m = k8s.jobset_manifest(["train"], name="a", image="i", num_hosts=2)
    _validate_jobset(m)
    bad_pod = json.loads(json.dumps(m))
    bad_pod["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["imag"] = "x"
    with pytest.raises(kv.ValidationError):
        _validate_jobset(bad_pod)
    bad_set = json.loads(json.dumps(m))
    bad_set["spec"]["replicatedJobs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        _validate_jobset(bad_set)
    with pytest.raises(SystemExit, match="DNS label"):
        k8s.jobset_manifest(["train"], name="Bad_Name", image="i")
    with pytest.raises(LaunchError, match="not of the image; give it relative to /opt/llmjax"):
        k8s.jobset_manifest(["train", "--config", "/home/me/configs/gpt_tiny.py"], name="a", image="i")
    k8s.jobset_manifest(["train", "--config=/opt/llmjax/configs/gpt_tiny.py"], name="a", image="i")  # in the image


SMALL_MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
               "--config.model.num_heads=4", "--config.train.eval_every=1000", "--config.optim.warmup_steps=2",
               "--config.optim.schedule=constant"]  # the runs below stop at different steps: same learning rates


def _metric_losses(workdir) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _single_process(workdir, data_dir, steps, devices=4):
    env = _env()
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "llmjax.cli", "train", "--config", str(REPO / "configs/gpt_tiny.py"),
                           "--workdir", str(workdir), *TINY_TRAIN, *SMALL_MODEL, f"--config.data.data_dir={data_dir}",
                           f"--config.train.steps={steps}", "--config.train.checkpoint_every=3"],
                          env=env, capture_output=True, text=True, timeout=400, cwd=REPO)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """A local launch of 2 processes x 2 devices prepares the data and trains 6 steps (one runtime of 4 devices;
    only process 0 writes metrics, plots and TensorBoard); 1 process x 4 devices resumes its checkpoint to step 9
    and matches an uninterrupted 1-process run of 9 steps (the data-iterator states of both ranks merge)."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    r = subprocess.run(_launch_cmd(multi, *SMALL_MODEL, "--config.train.steps=6", "--config.train.checkpoint_every=3"),
                       env=_env(), capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = [(multi / "logs" / f"rank{i}.log").read_text() for i in range(2)]
    for i, log in enumerate(logs):
        # One runtime of 2 processes x 2 devices: every rank sees all 4 devices (process 1's start at 2048).
        assert "CpuDevice(id=2049)" in log, log[-2000:]
        assert "validation loss:" in log
        assert f"[rank {i}] JAX cpu devices" in r.stdout
    assert "all 2 ranks finished" in r.stdout
    assert (multi / "loss.png").exists() and any((multi / "tensorboard").iterdir())
    assert sorted(p.name for p in (multi / "checkpoints" / "6" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    data_dir = multi / "data"  # prepared by the launch (data.data_dir '' = WORKDIR/data)
    resumed = _single_process(multi, data_dir, 9)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {multi / 'checkpoints' / '6'} at step 6" in resumed.stderr
    ref = _single_process(single, data_dir, 9)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _metric_losses(multi), _metric_losses(single)
    assert sorted(got) == sorted(want) == list(range(1, 10))
    for step in range(1, 10):  # steps 1-6 by 2 processes, 7-9 by the resumed single process
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_the_same_step_on_every_rank(tmp_path, tmp_path_factory, worker_id):
    """A preemption notice reaching only rank 1 (SIGTERM): JAX's preemption sync point makes both ranks
    stop after the same step, save it together and exit 0; the run then resumes from that step."""
    from conftest import prepared_data_dir

    # TINY_TRAIN's corpus, prepared once per session (test_two_process_checkpoint_resumes_in_one_process
    # prepares in a 2-process launch).
    data_dir = prepared_data_dir(tmp_path_factory, worker_id, str(REPO / "configs/gpt_tiny.py"), TINY_TRAIN[:3])
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_launch_cmd(workdir, *SMALL_MODEL, f"--config.data.data_dir={data_dir}",
                                        "--config.train.steps=100000", "--config.train.checkpoint_every=0"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pids = {}
        while len(pids) < 2:
            line = proc.stdout.readline()
            assert line, "launcher ended before starting both ranks"
            if line.startswith("llmjax launch: rank"):
                words = line.split()
                pids[int(words[3])] = int(words[5].rstrip(","))
        t0 = time.monotonic()
        metrics = workdir / "metrics.jsonl"
        while len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:  # training for real
            assert time.monotonic() - t0 < 300 and proc.poll() is None, "training never started"
            time.sleep(0.2)
        os.kill(pids[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    logs = [(workdir / "logs" / f"rank{i}.log").read_text() for i in range(2)]
    saved = []
    for log in logs:
        line = next((x for x in log.splitlines() if "preempted (SIGTERM) at step" in x), None)
        assert line is not None, log[-3000:]
        saved.append(int(line.split("at step ")[1].split(":")[0]))
    assert saved[0] == saved[1] > 0
    step = saved[0]
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == [step]
    assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    resumed = _single_process(workdir, data_dir, step + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr and max(_metric_losses(workdir)) == step + 2
