"""Paths that are local directories or Google Cloud Storage URLs (gs://bucket/...), through `etils.epath`
(the path library Orbax uses; gcsfs serves gs:// under it).

    path(p)                 an epath.Path for a str / os.PathLike / epath.Path; "gs://..." is a bucket path
    is_remote(p)            True for gs:// (object storage), False for local paths
    check_reachable(p, what)
                            at start-up: the bucket of a gs:// path exists and the credentials reach it, else a
                            one-line ConfigError naming the option (`what`), the URL and the fix; bounded time
    move_aside(src, dst)    rename on a local disk; copy every object, then delete the source, on a bucket
    local_copy(p, cache)    a local read-through copy of a gs:// file or directory (prepared shards, to memory-map)
    is_finalized(step_dir)  whether an Orbax step directory is complete (local: atomic rename; GCS: commit file)
    refresh(p)              drop gcsfs's cached listings before looking at a gs:// tree others may have changed
    files_under(root)       every file under a directory, recursively (rglob locally, walk() on a bucket)
    BucketLock              the workdir lock of a gs:// workdir (create-if-absent with a heartbeat)

What differs on a bucket (gcsfs 2026.10, checked against fake-gcs-server): directories are implicit (a prefix
exists only while an object lies under it: `mkdir` creates nothing, so `exists()`/`is_dir()` of a new, empty
"directory" are False, and `iterdir()` of it raises FileNotFoundError); `rename` of a file is a copy + delete,
of a "directory" one per object (not atomic); `glob("**")` / `rglob` raise NotImplementedError and `walk()` yields
tops without the "gs://" (PosixGPath('bucket/x'), a relative LOCAL path: join names to the original path
instead); `absolute()` / `resolve()` turn gs://b/x into a local path (never
call them on a remote path). Orbax on GCS does not write into `<step>.orbax-checkpoint-tmp-*` and rename: it
writes `<step>/` in place and marks it complete with `<step>/commit_success.txt` (see is_finalized).

Importing this module imports no cloud library: gcsfs and google-cloud-storage are imported on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from etils import epath

from llmjax.models.config import ConfigError

GS = "gs://"
COMMIT_FILE = "commit_success.txt"  # Orbax's completion marker of a step saved to GCS (CommitFileTemporaryPath)
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's in-progress directories on local disks (AtomicRenameTemporaryPath)
CHECK_TIMEOUT_S = 5.0  # check_reachable: one request, no retries


def is_remote(p) -> bool:
    """True for an object-storage URL (gs://...), False for a local path."""
    return os.fspath(p).startswith(GS) if isinstance(p, (str, os.PathLike)) else False


def path(p) -> epath.Path:
    """An epath.Path for `p`: gs://bucket/key goes to GCS, anything else is a local path (made absolute, since
    the working directory of a later process may differ)."""
    s = os.fspath(p)
    if s.startswith(GS):
        return epath.Path(s)
    if "://" in s:
        raise ConfigError(f"{s}: only local paths and gs:// URLs are supported")
    return epath.Path(os.path.abspath(s))


def write_atomic(p, data: bytes | str) -> None:
    """Write a whole file so that readers see the old content or the new, never a part: on a local disk through
    a temporary file renamed into place; on a bucket one object write is already all-or-nothing."""
    target = path(p)
    raw = data.encode() if isinstance(data, str) else data
    if is_remote(target):
        target.write_bytes(raw)
        return
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, target)


def refresh(p) -> None:
    """Forget the directory listings gcsfs has cached (it caches every listing it made, and objects written by
    others, e.g. TensorStore under Orbax, do not update them): call before looking at a gs:// tree that may
    have changed. Local paths: nothing to do."""
    if not is_remote(p):
        return
    from etils.epath import backend  # the gcsfs instance epath uses for gs:// (created on first use)

    backend.fsspec_backend.fs(os.fspath(p)).invalidate_cache()
    gcs_filesystem().invalidate_cache()


def files_under(root) -> list[epath.Path]:
    """Every file under the directory `root`, recursively, sorted (none when it does not exist). On a bucket
    through walk() (no rglob there), its tops joined onto `root` (walk drops the "gs://")."""
    root = path(root)
    if not is_remote(root):  # (epath's rglob refuses `**` even on a local disk: pathlib's)
        return sorted(epath.Path(p) for p in Path(root).rglob("*") if p.is_file())
    base = object_name(root)
    out = []
    for top, _, names in root.walk():
        rel = os.path.relpath(os.fspath(top), base)
        where = root if rel == "." else root / rel
        out += [where / n for n in names]
    return sorted(out)


def _split(p) -> tuple[str, str]:
    """(bucket, key) of a gs:// URL."""
    bucket, _, key = object_name(p).partition("/")
    return bucket, key.strip("/")


def object_name(p) -> str:
    """'bucket/key' of a gs:// URL: how gcsfs names objects and prefixes."""
    return os.fspath(p)[len(GS):].rstrip("/")


def _gcs_client():
    from google.cloud import storage  # heavy (grpc, protobuf): loaded only when a bucket is used

    if os.environ.get("STORAGE_EMULATOR_HOST"):  # the emulator takes no credentials
        from google.auth.credentials import AnonymousCredentials  # with storage, only for the emulator

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def gcs_filesystem():
    """gcsfs's filesystem (fsspec caches one instance; epath keeps an instance of its own)."""
    import fsspec  # gcsfs (aiohttp) loads only when a bucket is used

    return fsspec.filesystem("gs")


def check_reachable(p, what: str) -> None:
    """Fail fast (ConfigError, one line) if gs:// path `p` (given as option `what`) cannot be reached: no
    credentials, no such bucket, no permission, or no answer within CHECK_TIMEOUT_S. Local paths pass."""
    if not is_remote(p):
        return
    url = os.fspath(p)
    bucket, _ = _split(url)
    if not bucket:
        raise ConfigError(f"{what} {url}: no bucket name; use gs://BUCKET/path")
    from google.api_core import exceptions as gexc  # Google libraries: loaded only for a gs:// path
    from google.auth import exceptions as auth_exc  # (idem)

    try:
        found = _gcs_client().lookup_bucket(bucket, timeout=CHECK_TIMEOUT_S, retry=None)
    except auth_exc.DefaultCredentialsError:
        raise ConfigError(f"{what} {url}: no Google Cloud credentials; run `gcloud auth application-default "
                          "login` or set GOOGLE_APPLICATION_CREDENTIALS (on GCE/TPU VMs: the VM's service "
                          "account needs storage access)") from None
    except gexc.Forbidden as e:
        raise ConfigError(f"{what} {url}: permission denied on bucket {bucket} ({e.message}); grant the "
                          "credentials' account roles/storage.objectAdmin on it") from None
    except (gexc.GoogleAPIError, auth_exc.GoogleAuthError, OSError) as e:  # OSError: requests' connection errors
        raise ConfigError(f"{what} {url}: cannot reach Cloud Storage ({type(e).__name__}: {str(e)[:200]}); "
                          "check the network, STORAGE_EMULATOR_HOST and the credentials") from None
    if found is None:
        raise ConfigError(f"{what} {url}: bucket {bucket} does not exist; create it (gcloud storage buckets "
                          f"create gs://{bucket}) or fix the URL")


def move_aside(src, dst) -> None:
    """Move the file or directory `src` to `dst` (which must not exist), never losing data.

    Local: one rename (atomic; dst's parent is created). Object storage has no rename: every object under
    `src` is copied to the same relative key under `dst`, the copies are checked (each exists with the
    source's size), and only then are the source objects deleted. A crash before the deletions leaves `src`
    whole (and a partial or complete `dst`); a crash during them leaves `dst` whole and part of `src`, so
    every object exists somewhere complete at every moment. Running it again after a crash finishes the job:
    objects are copied again (a copy is idempotent) from what is left of `src`, and already-moved ones kept."""
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"move_aside: {src} and {dst} must both be local or both on object storage")
    if not is_remote(src):
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise FileExistsError(f"{dst} exists already; not moving {src} over it")
        os.rename(src, dst)
        return
    fs = gcs_filesystem()
    s, d = object_name(src), object_name(dst)
    if fs.isfile(s):
        objects = {s: fs.info(s)["size"]}
    else:
        objects = {o: info["size"] for o, info in fs.find(s, detail=True).items()}
    if not objects:
        raise FileNotFoundError(f"{src}: nothing to move")
    targets = {o: d + o[len(s):] for o in objects}
    for o, t in targets.items():
        fs.copy(o, t)
    fs.invalidate_cache(d)
    for o, t in targets.items():  # every copy complete before any source object goes
        if fs.info(t)["size"] != objects[o]:
            raise OSError(f"move_aside: copy {GS}{t} of {GS}{o} has the wrong size; {src} kept")
    fs.rm(list(objects))
    fs.invalidate_cache(s)


def is_finalized(step_dir) -> bool:
    """Whether an Orbax step directory is a complete checkpoint. Local disks: Orbax writes into
    <step>.orbax-checkpoint-tmp-* and renames, so a plain <step> directory is complete. GCS: Orbax writes
    <step>/ in place and writes <step>/commit_success.txt last, so a <step>/ without it is an interrupted
    save (which Orbax's own all_steps() skips, and cleanup_tmp_directories deletes)."""
    p = path(step_dir)
    if TMP_MARK in p.name:
        return False
    if is_remote(p):
        return (p / COMMIT_FILE).exists()
    return p.is_dir()


def local_copy(p, cache_dir) -> Path:
    """A local copy of `p` (a gs:// file or directory, e.g. a prepared-data directory) to memory-map; a local
    `p` is returned as it is. The copy lives in cache_dir/<sha256 of the URL>[:16]/ with a `.source.json`
    naming the URL and each object's size and generation; it is reused while they still match (any rewrite
    of an object gives it a new generation) and made again otherwise. A new copy is written next to the old
    one and renamed into place, so a crash mid-copy never leaves a partial cache that looks complete."""
    if not is_remote(p):
        return Path(p)
    url = os.fspath(p).rstrip("/")
    fs = gcs_filesystem()
    root = object_name(url)
    fs.invalidate_cache(root)
    if fs.isfile(root):
        listing = {"": fs.info(root)}
    else:
        listing = {o[len(root):].lstrip("/"): info for o, info in fs.find(root, detail=True).items()}
        if not listing:
            raise FileNotFoundError(f"{url}: no such file or directory")
    source = {"url": url, "objects": {rel: [int(info["size"]), str(info.get("generation", ""))]
                                      for rel, info in sorted(listing.items())}}
    cache = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache / (Path(root).name or "root")
    stamp = cache / ".source.json"

    def current() -> bool:
        try:
            return stamp.is_file() and target.exists() and json.loads(stamp.read_text()) == source
        except ValueError:
            return False

    if current():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # One copier per cache entry on this host (the processes of a multi-process run share the machine's cache):
    # the others wait, then find the copy made.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current():
            return target
        _copy_into(fs, root, source, cache, target, stamp)
    return target


def _copy_into(fs, root: str, source: dict, cache: Path, target: Path, stamp: Path) -> None:
    tmp = cache / f".partial-{os.getpid()}-{time.time_ns()}"
    try:
        for rel in source["objects"]:
            dest = tmp / rel if rel else tmp
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}" if rel else root, str(dest))
        stamp.unlink(missing_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(tmp, target)
        stamp.write_text(json.dumps(source))  # written last: its presence says the copy is complete
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _dead_here(holder: dict) -> bool:
    """Whether the lock's holder was a process of this host that no longer runs (a killed run resumed on the
    same machine need not wait for the heartbeat to go stale)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class BucketLock:
    """The workdir lock of a gs:// workdir: WORKDIR/.lock created only if absent (GCS precondition
    ifGenerationMatch=0, atomic on the server), holding {"host", "pid", "since", "heartbeat"} as JSON.

    flock is impossible on a bucket and a killed holder cannot release anything, so the holder rewrites the
    heartbeat every `ttl/4` seconds from a background thread, each rewrite conditional on the generation it
    wrote last (a holder that was taken over notices: `lost` becomes True and it stops). A lock whose
    heartbeat is older than `ttl` seconds is stale: it is taken over with a rewrite conditional on the stale
    generation, so of two processes taking over at once exactly one wins. A fresh lock refuses the acquire
    (ConfigError naming the holder). Release deletes the object if it is still ours. Clocks of the hosts are
    compared (heartbeat times are the holder's wall clock), so `ttl` must exceed their skew by far."""

    def __init__(self, workdir, *, ttl: float = 600.0, name: str = ".lock"):
        self.workdir = os.fspath(workdir).rstrip("/")
        self.url = f"{self.workdir}/{name}"
        self.ttl = ttl
        self._bucket, self._key = _split(self.url)
        self._generation: int | None = None
        self._since = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _blob(self):
        return _gcs_client().bucket(self._bucket).blob(self._key)

    def _payload(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self._since,
                           "heartbeat": time.time()})

    def _write(self, generation: int) -> int:
        """Write our payload if the object's generation is `generation` (0: absent); the new generation."""
        blob = self._blob()
        blob.upload_from_string(self._payload(), content_type="application/json", if_generation_match=generation)
        return int(blob.generation)

    def acquire(self) -> "BucketLock":
        if self._generation is not None:
            return self
        from google.api_core import exceptions as gexc  # Google libraries: loaded only for a bucket workdir

        self._since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            self._generation = self._write(0)
        except gexc.PreconditionFailed:
            blob = self._blob()
            try:
                blob.reload()
                holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
                age = time.time() - float(holder.get("heartbeat", 0))
            except gexc.NotFound:  # released meanwhile: try once more
                holder, age = None, None
            except (ValueError, TypeError, AttributeError):  # unreadable content: a broken lock, treat as stale
                holder, age = {}, float("inf")
            try:
                if holder is None:
                    self._generation = self._write(0)
                elif age > self.ttl or _dead_here(holder):
                    self._generation = self._write(int(blob.generation))
                else:
                    raise ConfigError(self._busy(holder, age))
            except gexc.PreconditionFailed:  # another process won the race for it
                raise ConfigError(self._busy({}, None)) from None
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="llmjax-bucket-lock", daemon=True)
        self._thread.start()
        return self

    def _busy(self, holder: dict, age: float | None) -> str:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
               + (f", heartbeat {age:.0f} s ago" if age is not None else "")) if holder else "holder unknown"
        return (f"workdir {self.workdir} is in use by another run ({who}; lock object {self.url}); wait for it "
                f"to end or stop it (a lock without heartbeat for {self.ttl:.0f} s is taken over), or use "
                "another --workdir")

    def _beat(self) -> None:
        from google.api_core import exceptions as gexc  # Google libraries: loaded only for a bucket workdir

        while not self._stop.wait(self.ttl / 4):
            try:
                self._generation = self._write(self._generation)
            except gexc.PreconditionFailed:  # taken over (we were thought dead) or removed by hand
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - a transient error: the next beat tries again, well within ttl
                continue

    def release(self) -> None:
        if self._generation is None:
            return
        from google.api_core import exceptions as gexc  # Google libraries: loaded only for a bucket workdir

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        generation, self._generation = self._generation, None
        if not self.lost:
            try:
                self._blob().delete(if_generation_match=generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                pass

    @property
    def held(self) -> bool:
        return self._generation is not None and not self.lost

    def __enter__(self) -> "BucketLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
