"""`llmjax launch k8s`: a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) for GKE TPU slices or GPU node pools.

One replicated job with a replica per TPU slice (`--num-slices`, default 1), each of `--num-hosts` indexed pods
(one JAX process per host). Pods find each other through the JobSet headless service: the coordinator is pod 0
of slice 0, `<name>-<job>-0-0.<name>:<port>`; a pod's process id is slice index x hosts per slice + its job
completion index. Several slices also get the MEGASCALE_* variables with which the TPU runtime connects the
slices over the data-centre network. Apply with `kubectl apply -f FILE` (JobSet controller installed).

The image is the one launch/Dockerfile builds: llmjax installed, its checkout's configs/ at IMAGE_HOME
(/opt/llmjax), the container's working directory, so `--config configs/NAME.py` resolves in every pod.
"""

from __future__ import annotations

import json
import re
import shlex
import sys

from llmjax.launch.distributed import CHILD_MODULE, LaunchError, config_path

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "workers"
CONTAINER = "llmjax"
IMAGE_HOME = "/opt/llmjax"  # launch/Dockerfile: WORKDIR, holding configs/ (and the sources it installed)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def coordinator_host(name: str) -> str:
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def _annotation(key: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}


def jobset_manifest(command: list[str], *, name: str, image: str, num_hosts: int = 1, num_slices: int = 1,
                    namespace: str = "",
                    tpu_accelerator: str = "", tpu_topology: str = "", chips_per_host: int = 4,
                    gpus_per_host: int = 0, gpu_accelerator: str = "", port: int = 8476, env: list[str] = (),
                    cpu: str = "", memory: str = "", max_restarts: int = 0, service_account: str = "",
                    python: str = "python3", working_dir: str = IMAGE_HOME) -> dict:
    if not _DNS_LABEL.match(name) or len(name) > 40:
        raise SystemExit(f"llmjax launch k8s: --name {name!r} must be a DNS label (lowercase letters, digits, '-'), "
                         "at most 40 characters")
    if not image:
        raise SystemExit("llmjax launch k8s: --image is required (a container image with llmjax installed)")
    if num_hosts < 1:
        raise SystemExit("llmjax launch k8s: --num-hosts must be at least 1")
    if num_slices < 1:
        raise SystemExit("llmjax launch k8s: --num-slices must be at least 1")
    if num_slices > 1 and not tpu_accelerator:
        raise SystemExit("llmjax launch k8s: --num-slices is for TPU slices joined by the data-centre network; give "
                         "--tpu-accelerator and --tpu-topology too (GPU nodes: raise --num-hosts instead)")
    if bool(tpu_accelerator) != bool(tpu_topology):
        raise SystemExit("llmjax launch k8s: --tpu-accelerator and --tpu-topology go together, e.g. "
                         "--tpu-accelerator tpu-v5p-slice --tpu-topology 2x2x2")
    if tpu_accelerator and gpus_per_host:
        raise SystemExit("llmjax launch k8s: choose TPUs (--tpu-accelerator) or GPUs (--gpus-per-host), not both")
    if not command:
        raise SystemExit("llmjax launch k8s: give the command after --, e.g. -- train --config ... --workdir gs://...")
    config = config_path(command)
    if config and working_dir and config.startswith("/") and not config.startswith(working_dir.rstrip("/") + "/"):
        raise LaunchError(f"llmjax launch k8s: --config {config} is a path of this machine, not of the image; give it "
                          f"relative to {working_dir} (the image's checkout), e.g. configs/{config.rsplit('/', 1)[-1]}")

    env_list = [
        {"name": "LLMJAX_COORDINATOR", "value": f"{coordinator_host(name)}:{port}"},
        {"name": "LLMJAX_NUM_PROCESSES", "value": str(num_hosts * num_slices)},
        {"name": "LLMJAX_PROCESS_ID", **_annotation("batch.kubernetes.io/job-completion-index")},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if num_slices > 1:  # the process id counts the hosts of the slices before this one (llmjax.launch.distributed)
        env_list += [
            {"name": "LLMJAX_SLICE_ID", **_annotation("jobset.sigs.k8s.io/job-index")},
            {"name": "LLMJAX_HOSTS_PER_SLICE", "value": str(num_hosts)},
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator_host(name)},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {"name": "MEGASCALE_SLICE_ID", **_annotation("jobset.sigs.k8s.io/job-index")},
        ]
    for kv in env:
        if "=" not in kv:
            raise SystemExit(f"llmjax launch k8s: --env {kv!r} must look like NAME=VALUE")
        k, v = kv.split("=", 1)
        env_list.append({"name": k, "value": v})

    limits: dict[str, str] = {}
    node_selector: dict[str, str] = {}
    if tpu_accelerator:
        limits["google.com/tpu"] = str(chips_per_host)
        node_selector = {"cloud.google.com/gke-tpu-accelerator": tpu_accelerator,
                         "cloud.google.com/gke-tpu-topology": tpu_topology}
    if gpus_per_host:
        limits["nvidia.com/gpu"] = str(gpus_per_host)
        if gpu_accelerator:
            node_selector["cloud.google.com/gke-accelerator"] = gpu_accelerator
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    container = {
        "name": CONTAINER,
        "image": image,
        "command": [python, "-m", CHILD_MODULE, *command],
        "ports": [{"containerPort": port, "name": "coordinator"}],
        "env": env_list,
    }
    if working_dir:
        container["workingDir"] = working_dir
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    pod_spec: dict = {"restartPolicy": "Never", "containers": [container]}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if gpus_per_host:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    metadata: dict = {"name": name, "labels": {"app.kubernetes.io/name": "llmjax"}}
    if namespace:
        metadata["namespace"] = namespace
    if tpu_accelerator:  # one slice per node pool, never two jobs on one slice
        metadata["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": num_slices,
                "template": {"spec": {
                    "parallelism": num_hosts,
                    "completions": num_hosts,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": {"metadata": {"labels": {"app.kubernetes.io/name": "llmjax"}}, "spec": pod_spec},
                }},
            }],
        },
    }


def to_yaml(manifest: dict) -> str:
    try:
        import yaml  # optional (PyYAML)
    except ImportError:  # JSON is YAML too; kubectl takes either
        return json.dumps(manifest, indent=2) + "\n"
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def add_arguments(p) -> None:
    p.add_argument("--name", required=True, help="JobSet name (DNS label)")
    p.add_argument("--image", required=True, help="container image built from launch/Dockerfile")
    p.add_argument("--num-hosts", type=int, default=1, help="pods = JAX processes per slice (TPU slice hosts / GPU "
                   "nodes)")
    p.add_argument("--num-slices", type=int, default=1, help="TPU slices (one job each), joined by the data-centre "
                   "network; the config's mesh.dcn_* axes must multiply to it")
    p.add_argument("--namespace", default="")
    p.add_argument("--tpu-accelerator", default="", help="e.g. tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice")
    p.add_argument("--tpu-topology", default="", help="e.g. 2x2x2 (v4/v5p) or 4x4 (v5e/v6e)")
    p.add_argument("--chips-per-host", type=int, default=4, help="google.com/tpu per pod")
    p.add_argument("--gpus-per-host", type=int, default=0, help="nvidia.com/gpu per pod")
    p.add_argument("--gpu-accelerator", default="", help="GKE node label, e.g. nvidia-h100-80gb")
    p.add_argument("--port", type=int, default=8476, help="coordinator port")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--cpu", default="")
    p.add_argument("--memory", default="")
    p.add_argument("--max-restarts", type=int, default=0, help="JobSet failurePolicy.maxRestarts")
    p.add_argument("--service-account", default="", help="e.g. one with GCS access for gs:// workdirs")
    p.add_argument("--python", default="python3")
    p.add_argument("--working-dir", default=IMAGE_HOME,
                   help="the container's working directory, where configs/ is (launch/Dockerfile: /opt/llmjax)")
    p.add_argument("--output", "-o", default="-", help="manifest file ('-' = stdout)")


def render(args, command: list[str]) -> str:
    """The manifest `llmjax launch k8s` writes, as YAML (JSON without PyYAML)."""
    return to_yaml(jobset_manifest(
        command, name=args.name, image=args.image, num_hosts=args.num_hosts, num_slices=args.num_slices,
        namespace=args.namespace,
        tpu_accelerator=args.tpu_accelerator, tpu_topology=args.tpu_topology, chips_per_host=args.chips_per_host,
        gpus_per_host=args.gpus_per_host, gpu_accelerator=args.gpu_accelerator, port=args.port, env=args.env,
        cpu=args.cpu, memory=args.memory, max_restarts=args.max_restarts, service_account=args.service_account,
        python=args.python, working_dir=args.working_dir))


def run(args, command: list[str]) -> int:
    text = render(args, command)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"llmjax launch k8s: wrote {args.output}; apply with: kubectl apply -f {shlex.quote(args.output)}")
    return 0
