"""llmjax.storage and what etils.epath / gcsfs / Orbax / TensorStore do on gs:// paths, against a real GCS API
server (fake-gcs-server, started by each test on a free port; tests/helpers/gcs.py)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from etils import epath
from helpers.gcs import gcs_server

from llmjax import storage
from llmjax.models.config import ConfigError



def test_path_and_is_remote(tmp_path):
    assert storage.is_remote("gs://b/x") and storage.is_remote(epath.Path("gs://b/x"))
    assert not storage.is_remote(tmp_path) and not storage.is_remote("rel/dir")
    assert str(storage.path("gs://b/x/y")) == "gs://b/x/y"
    assert str(storage.path("rel")) == os.path.abspath("rel")
    assert str(storage.path(tmp_path / "a")) == str(tmp_path / "a")
    with pytest.raises(ConfigError, match="s3://"):
        storage.path("s3://b/x")


def test_epath_on_a_bucket(gcs):
    root = epath.Path(gcs.gs("run"))
    root.mkdir(parents=True, exist_ok=True)
    assert not root.exists() and not root.is_dir()  # directories are implicit: mkdir creates nothing
    with pytest.raises(FileNotFoundError):
        list(root.iterdir())
    (root / "a.txt").write_text("hello")
    (root / "sub" / "b.bin").write_bytes(b"\x01" * 2000)  # no mkdir needed
    assert (root / "a.txt").read_text() == "hello" and (root / "sub" / "b.bin").stat().length == 2000
    assert root.is_dir() and (root / "sub").is_dir() and (root / "a.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    assert [str(p) for p in root.glob("*.txt")] == [gcs.gs("run", "a.txt")]
    with pytest.raises(NotImplementedError):  # no recursive glob on GCS: use walk()
        list(root.glob("**/*.bin"))
    tops = [str(top) for top, _, files in root.walk()]
    assert tops == [f"{gcs.bucket}/run", f"{gcs.bucket}/run/sub"]  # walk() loses "gs://": tops are LOCAL paths
    with pytest.raises(FileExistsError):
        root.mkdir()
    (root / "a.txt").rename(root / "c.txt")  # copy + delete (the emulator has no objects.move)
    assert not (root / "a.txt").exists() and (root / "c.txt").read_text() == "hello"
    (root / "d.txt").write_text("old")
    (root / "c.txt").replace(root / "d.txt")
    assert (root / "d.txt").read_text() == "hello"
    (root / "sub").rename(root / "sub2")  # a "directory": object by object
    assert not (root / "sub").exists() and (root / "sub2" / "b.bin").stat().length == 2000
    (root / "d.txt").unlink()
    with pytest.raises(FileNotFoundError):
        (root / "d.txt").unlink()
    (root / "d.txt").unlink(missing_ok=True)
    assert str(root.absolute()) != gcs.gs("run")  # absolute()/resolve() make it a local path: never use them
    root.rmtree()
    assert not root.exists()
    with pytest.raises(FileNotFoundError):
        (root / "zz").read_text()
    assert not os.path.exists("gs:")


def test_check_reachable(gcs, tmp_path):
    storage.check_reachable(gcs.gs("run"), "--workdir")
    storage.check_reachable(tmp_path, "--workdir")  # local: nothing to check
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"--workdir gs://nobkt/run: bucket nobkt does not exist") as e:
        storage.check_reachable("gs://nobkt/run", "--workdir")
    assert "\n" not in str(e.value) and time.monotonic() - t < 3


def test_check_reachable_when_the_server_is_down():
    with gcs_server() as server:
        url = server.gs("run")
        server.process.kill()
        server.process.wait()
        t = time.monotonic()
        with pytest.raises(ConfigError, match=r"^data\.sources gs://bkt/run: cannot reach Cloud Storage") as e:
            storage.check_reachable(url, "data.sources")
        assert "\n" not in str(e.value) and time.monotonic() - t < storage.CHECK_TIMEOUT_S + 2


def test_move_aside_on_a_bucket_and_locally(gcs, tmp_path):
    src = epath.Path(gcs.gs("ck", "7"))
    for rel, data in {"state/a": b"x" * 100, "state/d/b": b"y", "commit_success.txt": b""}.items():
        (src / rel).write_bytes(data)
    dst = gcs.gs("corrupt", "7-1")
    storage.move_aside(src, dst)
    assert not src.exists()
    assert (epath.Path(dst) / "state" / "a").read_bytes() == b"x" * 100
    assert (epath.Path(dst) / "state" / "d" / "b").read_bytes() == b"y"
    assert (epath.Path(dst) / "commit_success.txt").exists()
    (tmp_path / "s" / "x").mkdir(parents=True)
    storage.move_aside(tmp_path / "s", tmp_path / "c" / "s-1")
    assert (tmp_path / "c" / "s-1" / "x").is_dir() and not (tmp_path / "s").exists()


def test_local_copy_is_reused_until_the_objects_change(gcs, tmp_path):
    data = epath.Path(gcs.gs("data"))
    tokens = np.arange(1000, dtype="<u2")
    (data / "train" / "tokens.bin").write_bytes(tokens.tobytes())
    (data / "manifest.json").write_text("{}")
    local = storage.local_copy(data, tmp_path / "cache")
    assert np.array_equal(np.memmap(local / "train" / "tokens.bin", "<u2", mode="r"), tokens)
    assert storage.local_copy(data, tmp_path / "cache") == local
    mtime = (local / "manifest.json").stat().st_mtime_ns
    assert (storage.local_copy(data, tmp_path / "cache") / "manifest.json").stat().st_mtime_ns == mtime  # reused
    (data / "manifest.json").write_text('{"v": 2}')  # new generation: copied again
    assert json.loads((storage.local_copy(data, tmp_path / "cache") / "manifest.json").read_text()) == {"v": 2}
    assert storage.local_copy(tmp_path, tmp_path / "cache") == tmp_path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [local.parent.name]  # no partial copies left


def test_bucket_lock(gcs):
    workdir = gcs.gs("run")
    with storage.BucketLock(workdir, ttl=2.0) as lock:
        assert lock.held
        holder = json.loads(epath.Path(workdir, ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=r"workdir gs://bkt/run is in use by another run \(host"):
            storage.BucketLock(workdir, ttl=2.0).acquire()
        time.sleep(2.5)  # heartbeats (every ttl/4) keep it fresh
        with pytest.raises(ConfigError, match="in use"):
            storage.BucketLock(workdir, ttl=2.0).acquire()
    assert not epath.Path(workdir, ".lock").exists()  # released: deleted
    # a holder that died: its heartbeat gets old, and the lock is taken over; the old holder notices
    dead = storage.BucketLock(workdir, ttl=1.0).acquire()
    dead._stop.set()
    dead._thread.join()
    time.sleep(1.2)
    with storage.BucketLock(workdir, ttl=1.0) as taker:
        assert taker.held
        with pytest.raises(Exception):  # the dead holder's next conditional write fails
            dead._write(dead._generation)
    dead.release()  # does not delete the new holder's lock (generation mismatch)


def test_orbax_checkpoint_manager_on_a_bucket_restores_in_a_new_process(gcs, tmp_path):
    """The three items llmjax saves (llmjax/checkpoint.py), async, on gs://; restored by another process.
    On GCS Orbax writes <step>/ in place with commit_success.txt files, no *.orbax-checkpoint-tmp-* dirs."""
    directory = gcs.gs("run", "checkpoints")
    script = textwrap.dedent(f"""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        import orbax.checkpoint as ocp
        from etils import epath
        from grain import checkpoint as grain_checkpoint

        class Snap:
            def get_state(self):
                return json.dumps({{"pos": 3}}).encode()

        def manager():
            options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=True,
                                                   cleanup_tmp_directories=False)
            handlers = {{"state": ocp.StandardCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler(),
                        "config": ocp.JsonCheckpointHandler()}}
            return ocp.CheckpointManager(epath.Path({directory!r}), options=options, item_handlers=handlers)

        def tree(step):
            return {{"w": jax.random.normal(jax.random.key(step), (64, 32)), "b": jnp.arange(5) + step,
                    "h": jnp.ones(3, jnp.bfloat16) * step}}

        m = manager()
        if sys.argv[1] == "save":
            for step in (1, 2, 3):
                m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(step)),
                       data=grain_checkpoint.CheckpointSave(Snap()), config=ocp.args.JsonSave({{"step": step}})))
            m.wait_until_finished()
            m.close()
        else:
            like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree(3))
            got = m.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))["state"]
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree(3))))
            print(json.dumps({{"steps": m.all_steps(), "same": bool(same)}}))
        """)
    (tmp_path / "ckpt.py").write_text(script)
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu"}
    for mode in ("save", "restore"):
        r = subprocess.run([sys.executable, str(tmp_path / "ckpt.py"), mode], env=env, capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"steps": [2, 3], "same": True}
    root = epath.Path(directory)
    assert sorted(p.name for p in root.iterdir()) == ["2", "3"]  # keep-2 deleted step 1; no tmp directories
    step = root / "3"
    assert all((step / item / "commit_success.txt").exists() for item in ("state", "data", "config"))
    assert storage.is_finalized(step)
    assert json.loads((step / "data" / "process_0-of-1.json").read_text()) == {"pos": 3}
    assert json.loads((step / "config" / "metadata").read_text()) == {"step": 3}
    # an interrupted save on GCS is a <step>/ without commit_success.txt (Orbax skips it; llmjax must too)
    (root / "4" / "state" / "_sharding").write_text("{}")
    assert not storage.is_finalized(root / "4") and (root / "4").is_dir()
    assert not os.path.exists(tmp_path / "gs:")
