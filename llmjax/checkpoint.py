"""Checkpoints with Orbax: save/restore the train state, data-iterator state and config; preemption; export.

Layout (WORKDIR/checkpoints, one Orbax CheckpointManager):

    checkpoints/<step>/state/     params, optimizer state, step, RNG streams (PRNG keys as uint32 key data);
                                  Orbax array checkpoint, restorable onto any mesh / device count
    checkpoints/<step>/data/      process_<i>-of-<n>.json: each process's Grain BatchIterator.get_state()
    checkpoints/<step>/config/    the run config (JSON)
    checkpoints_corrupt/<step>-<time>/
                                  step directories that failed to restore, moved aside (never deleted)

A step directory appears only once complete (Orbax writes into a temporary directory and renames it at
finalize); interrupted saves leave `*.orbax-checkpoint-tmp-*` directories, which process 0 removes (logged)
before the first save of the next run. Once a save is finalized, process 0 writes
checkpoints/<step>/checksums.json (sha256 of every file under state/, data/ and config/) at the next save,
wait or close. Resume tries the newest step first; one that cannot be read (truncated file, missing item,
a file whose checksum differs from the manifest) is reported with a warning naming it and the next older
one is tried. A step without a manifest (killed between finalize and manifest) is still restored: its
directory was complete when renamed, and damage that makes it unreadable is still caught by the restore.
Once a good one is restored the bad newer ones are moved to checkpoints_corrupt/, so keep-K garbage
collection only ever counts good checkpoints and new saves never land on a bad directory. When every
checkpoint is bad the run refuses to start (NoGoodCheckpoint, a ConfigError naming them) rather than start
over at step 0 and later save over their step numbers; an error not shown to be corruption (permission
denied, other I/O errors) fails the run and moves nothing aside. Before anything is restored or moved,
the saved config is compared with the current one: a change to a field that changes the shapes or
structure of the state (model.num_layers, optim.optimizer, ...) is refused, naming the field, with the
checkpoints untouched.

WORKDIR may be a gs://bucket/path (llmjax.storage; every path here is an etils.epath.Path). What differs there:
Orbax writes <step>/ in place and marks it complete with commit_success.txt, so a step directory without it
is an interrupted save: steps() does not list it and remove_tmp() removes it (logged), as it removes the
`*.orbax-checkpoint-tmp-*` directories locally. The manifest is written as one object (all or nothing on
GCS). "Moved aside" is a copy of every object, checked, then the deletion of the originals
(storage.move_aside): a crash in between loses nothing. Errors of access (permission, credentials, network)
are never taken for corruption. Exports are written in place with config.json last (see write_params).

Preemption: SIGTERM or SIGINT sets a flag; the loop finishes the current step, saves and returns normally
(exit code 0). With several processes SIGTERM goes through JAX's preemption sync service
(multihost_utils.reached_preemption_sync_point) so all processes save the same step; SIGINT is turned into
SIGTERM to join the same protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from llmjax import sharding as shd
from llmjax import storage
from llmjax.data.shards import TOKENIZER_FILE
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.transformer import build_model
from llmjax.params import build_with_params, flatten, key_name
from llmjax.state import init_state_abstract, make_optimizer

log = logging.getLogger("llmjax")

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
MANIFEST = "checksums.json"  # in each step directory: {relative path: sha256} of its state/, data/, config/ files
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "config.json"
BEST = "best"  # WORKDIR/best: parameters of the step with the lowest validation loss (train.keep_best)


# -------------------------------------------------------------------------------------- state <-> tree
def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_tree(state) -> dict:
    """A TrainState (or any pytree) as nested dicts of arrays, keyed by path names; typed PRNG keys become
    their uint32 key data. Works on concrete arrays, ShapeDtypeStructs and shardings alike (`to_tree`
    of the shardings pytree gives the matching shardings)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = out
        names = [key_name(k) for k in path]
        for n in names[:-1]:
            node = node.setdefault(n, {})
        if _is_key(leaf):
            leaf = (jax.random.key_data(leaf) if isinstance(leaf, jax.Array)
                    else jax.ShapeDtypeStruct(leaf.shape + (2,), jnp.uint32, sharding=getattr(leaf, "sharding", None)))
        node[names[-1]] = leaf
    return out


def from_tree(tree: dict, like):
    """Inverse of to_tree: the leaves of `tree` put back into the structure of `like` (keys re-wrapped)."""
    leaves = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    for path, ref in paths:
        node = tree
        for k in path:
            node = node[key_name(k)]
        if _is_key(ref):
            impl = jax.random.key_impl(ref) if isinstance(ref, jax.Array) else None
            node = jax.random.wrap_key_data(node, impl=impl) if impl is not None else jax.random.wrap_key_data(node)
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_tree(state, shardings) -> dict:
    """to_tree of ShapeDtypeStructs carrying the target shardings: what Orbax restores (and reshards) into."""
    def one(x, sh):
        if _is_key(x):
            return jax.ShapeDtypeStruct(x.shape + (2,), jnp.uint32, sharding=sh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    abstract = jax.tree.map(one, state, shardings)
    # keys are already converted above: flatten without touching them again
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        node = out
        names = [key_name(k) for k in path]
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = leaf
    return out


# ----------------------------------------------------------------------------------------- data state
class _DataSnapshot:
    """The data-iterator state captured at save time (the save itself may finish later, in the background)."""

    def __init__(self, state: dict):
        self._bytes = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._bytes


def read_data_state(step_dir: Path) -> dict:
    """All processes' iterator states of one checkpoint merged into one (positions of every row stream), so
    that any process count can take its share (BatchIterator.set_state picks its streams)."""
    files = sorted((step_dir / "data").glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"{step_dir / 'data'} has no process_*-of-*.json data-iterator state")
    counts = {int(f.stem.split("-of-")[1]) for f in files}
    if len(counts) != 1 or len(files) != counts.pop():
        raise FileNotFoundError(f"{step_dir / 'data'}: data-iterator states of some processes are missing")
    states = sorted((json.loads(f.read_text()) for f in files), key=lambda s: int(s["first_stream"]))
    merged = dict(states[0])
    merged["positions"] = [p for s in states for p in s["positions"]]
    return merged


# ---------------------------------------------------------------------------------------- config check
def _structure(cfg) -> dict:
    """{path: (shape, dtype)} of the train state this config builds (abstractly: no arrays allocated)."""
    model_cfg = ModelConfig.from_dict(cfg["model"])
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, 0))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    tx = make_optimizer(ml_collections.ConfigDict(cfg["optim"]), int(cfg["train"]["steps"]))
    opt = jax.eval_shape(tx.init, params)
    tree = {"params": params, "rest": rest, "opt_state": opt}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(key_name(k) for k in p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def check_compatible(saved: dict, current: dict, where: str) -> None:
    """Raise ConfigError naming the fields whose change alters the state's shapes or structure."""
    try:
        same = _structure(saved) == _structure(current)
    except Exception as e:  # a saved config this version cannot build: say so rather than guess
        raise ConfigError(f"cannot rebuild the model of the checkpoint config in {where}: {e}") from None
    if same:
        return
    culprits = []
    for section in ("model", "optim", "train"):
        for key in sorted(set(saved.get(section, {})) | set(current.get(section, {}))):
            a, b = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if a == b:
                continue
            trial = json.loads(json.dumps(saved))
            trial[section][key] = b
            try:
                changed = _structure(trial) != _structure(saved)
            except Exception:
                changed = True
            if changed:
                culprits.append(f"{section}.{key} (checkpoint {a!r}, now {b!r})")
    what = ", ".join(culprits) or "the model/optimizer configuration"
    convert = ""
    scan = current.get("model", {}).get("scan_layers", False)
    if scan != saved.get("model", {}).get("scan_layers", False):  # same model, other layout: its weights convert
        convert = (f"; or continue from its weights in the other layer layout with a new run, "
                   f"`llmjax train --config ... --init-from {where.rsplit('/checkpoints/', 1)[0]} "
                   f"--config.model.scan_layers={scan} --workdir NEW` (the parameters convert, the optimizer starts "
                   "afresh)")
    raise ConfigError(
        f"cannot resume from {where}: {what} changes the shapes of the saved parameters or optimizer state. "
        f"Set it back to the checkpoint's value, or use a new --workdir to train this model from scratch{convert}")


# ------------------------------------------------------------------------------------------ preemption
class Preemption:
    """SIGTERM / SIGINT -> finish the current step, save, exit cleanly. `reached(step)` is called after every
    step; all processes get the same answer (JAX's preemption sync point when distributed)."""

    def __init__(self):
        self.signal = None
        self._old = {}
        self._distributed = jax.process_count() > 1

    def __enter__(self):
        sigs = [signal.SIGINT] if self._distributed else [signal.SIGTERM, signal.SIGINT]
        for s in sigs:  # with a distributed runtime, JAX's preemption notifier owns SIGTERM
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handler(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name
        log.warning("received %s: finishing this step, saving a checkpoint and exiting", self.signal)
        if self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # join JAX's preemption sync protocol

    def reached(self, step: int) -> bool:
        if self._distributed:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                return False
        return self.signal is not None

    def __exit__(self, *a):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# -------------------------------------------------------------------------------------------- manager
class CorruptCheckpoint(ValueError):
    """A checkpoint whose files differ from its checksum manifest."""


class NoGoodCheckpoint(ConfigError):
    """Checkpoints exist but none can be restored: a user decision is needed, not a fresh start."""


class SaveFailed(ConfigError):
    """A checkpoint save failed (disk full, quota, permissions): the run stops, the checkpoints before it stay."""


# What a failed save's error text says about the cause, most specific first (TensorStore reports ENOSPC as
# RESOURCE_EXHAUSTED with the OS message inside a long line).
_SAVE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def _save_failure_reason(e: BaseException) -> str:
    text = str(e)
    for reason in _SAVE_FAILURES:
        if reason in text:
            return reason
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}"


class _BackgroundSaveErrors(logging.Filter):
    """Orbax's save threads log each failed write with a traceback (through absl), and asyncio logs every
    unretrieved write future: a full disk gave hundreds of lines. The failure is raised as one SaveFailed
    (chained to the original error, which --debug shows), so these records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "absl":
            return "orbax" not in record.pathname
        if record.name == "asyncio" and record.exc_info and record.exc_info[2] is not None:
            tb = record.exc_info[2]
            while tb is not None:
                if "orbax" in tb.tb_frame.f_code.co_filename:
                    return False
                tb = tb.tb_next
        return True


_QUIET = _BackgroundSaveErrors()


def _quiet_unraisable(hook):
    """sys.unraisablehook that drops the write callbacks of a failed save arriving after Orbax closed their
    event loop (RuntimeError 'Event loop is closed' in call_soon_threadsafe: dozens per failed save, racy) and
    passes everything else to `hook`."""
    def quiet(unraisable):
        e, tb = unraisable.exc_value, unraisable.exc_traceback
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and tb is not None:
            while tb.tb_next is not None:
                if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
                    return
                tb = tb.tb_next
            if tb.tb_frame.f_code.co_name in ("call_soon_threadsafe", "_check_closed"):
                return
        hook(unraisable)

    quiet.llmjax = True
    return quiet


def _sha256(path) -> str:
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(step_dir) -> dict[str, str]:
    """{path relative to step_dir: sha256} of every file under its state/, data/ and config/ items."""
    step_dir = storage.path(step_dir)
    storage.refresh(step_dir)
    base = os.fspath(step_dir).rstrip("/") + "/"
    return {os.fspath(p)[len(base):]: _sha256(p) for item in ("state", "data", "config")
            for p in storage.files_under(step_dir / item)}


def verify(step_dir) -> None:
    """Raise CorruptCheckpoint when a file listed in step_dir's manifest is missing or differs (no manifest:
    nothing to compare with, accepted)."""
    step_dir = storage.path(step_dir)
    storage.refresh(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return
    try:
        expected = json.loads(manifest.read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"unreadable {MANIFEST}: {e}") from None
    for rel, digest in expected.items():
        path = step_dir / rel
        if not path.is_file():
            raise CorruptCheckpoint(f"{rel} is missing")
        if _sha256(path) != digest:
            raise CorruptCheckpoint(f"{rel} differs from its checksum in {MANIFEST}")


# Error texts (of the error or any it was raised from) that show an environment problem, not a bad checkpoint:
# local permissions, and on Cloud Storage TensorStore's status codes and gcsfs's HTTP 401/403 messages.
_ENVIRONMENT_ERRORS = ("PERMISSION_DENIED", "Permission denied", "UNAUTHENTICATED", "UNAVAILABLE",
                       "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "Forbidden", "Unauthorized", "Invalid Credentials",
                       "Anonymous caller", "does not have storage.")
# Modules of the network / credential layers under gs:// paths (gcsfs.retry.HttpError: a 401, 429 or 5xx answer;
# aiohttp / requests: the connection; google.auth: credentials), whose errors are never corruption.
_ENVIRONMENT_MODULES = ("gcsfs", "aiohttp", "requests", "urllib3", "google.auth", "google.api_core")


def _is_corruption(e: Exception) -> bool:
    """Whether a restore error shows the checkpoint itself is bad (truncated/missing/garbled files), as opposed
    to an environment problem (permissions, I/O errors, a bucket that cannot be reached or refuses the
    credentials), which must fail the run and move nothing aside."""
    seen: BaseException | None = e
    for _ in range(16):  # the error and the ones it was raised from (Orbax wraps TensorStore's)
        if seen is None:
            break
        text = str(seen)
        if any(m in text for m in _ENVIRONMENT_ERRORS):
            return False
        module = type(seen).__module__
        if any(module == m or module.startswith(m + ".") for m in _ENVIRONMENT_MODULES):
            return False
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, OSError):
        return isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
    return True


class Checkpoints:
    """WORKDIR/checkpoints: asynchronous saves, keep the last `keep` (0 = all), restore the newest good one."""

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True):
        if keep < 0:
            raise ConfigError(f"train.keep_checkpoints={keep}: use 0 (keep all) or the number to keep")
        self.workdir = storage.path(workdir)  # a local directory or gs://bucket/...
        self.remote = storage.is_remote(self.workdir)
        self.directory = self.workdir / CHECKPOINTS
        self.keep = keep
        self.async_save = async_save
        self._manager = None
        self._pending: set[int] = set()  # saved by this run, manifest not written yet
        self._cleaned = False
        self._failed: SaveFailed | None = None
        absl_log = logging.getLogger("absl")  # Orbax logs every save phase at INFO through absl
        if absl_log.level == logging.NOTSET:
            absl_log.setLevel(logging.WARNING)
        for name in ("absl", "asyncio"):
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)
        if not getattr(sys.unraisablehook, "llmjax", False):
            sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)

    # Steps are listed from the directory itself (finalized step dirs are plain integers), so that looking
    # before a restore never writes anything. On a bucket a step directory exists while Orbax writes it: only
    # those with Orbax's commit file are complete.
    def steps(self) -> list[int]:
        storage.refresh(self.directory)
        if not self.directory.is_dir():
            return []
        if self.remote:
            return sorted((int(p.name) for p in self.directory.iterdir()
                           if p.name.isdigit() and storage.is_finalized(p)), reverse=True)
        return sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
                      reverse=True)

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            # max_to_keep=None is Orbax's "keep all"; 0 would delete even the newest checkpoint.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep or None, create=True, enable_async_checkpointing=self.async_save,
                cleanup_tmp_directories=False)
            handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler(),
                        "config": ocp.JsonCheckpointHandler()}
            # (never .absolute() on a gs:// path: it turns it into a local one; storage.path made local ones absolute)
            self._manager = ocp.CheckpointManager(self.directory if self.remote else self.directory.absolute(),
                                                  options=options, item_handlers=handlers)
        return self._manager

    def read_config(self, step: int) -> dict:
        return json.loads((self.directory / str(step) / "config" / "metadata").read_text())

    def remove_tmp(self) -> None:
        """Remove the temporary directories of interrupted saves (process 0; only called by a run that saves,
        never by export/load, which may look at a workdir whose training is still writing). On a bucket
        Orbax writes <step>/ in place: an interrupted save is a step directory without its commit file."""
        if jax.process_index() != 0:
            return
        storage.refresh(self.directory)
        if not self.directory.is_dir():
            return
        for p in sorted(self.directory.iterdir()):
            if self.remote:
                if (storage.TMP_MARK in p.name or p.name.isdigit()) and p.is_dir() and not storage.is_finalized(p):
                    p.rmtree()
                    storage.refresh(p)
                    log.info("removed %s, left by an interrupted save", p)
            elif storage.TMP_MARK in p.name and p.is_dir():
                shutil.rmtree(p)
                log.info("removed %s, left by an interrupted save", p)

    def _write_manifests(self, final: bool = False) -> None:
        """checksums.json for every step this run saved whose directory is finalized (process 0)."""
        storage.refresh(self.directory)
        for step in sorted(self._pending):
            step_dir = self.directory / str(step)
            if storage.is_finalized(step_dir):
                if jax.process_index() == 0:
                    try:
                        hashes = file_hashes(step_dir)
                    except FileNotFoundError:  # deleted by keep-K meanwhile: nothing to record
                        hashes = None
                    if hashes is not None:  # locally a tmp file renamed into place; one object write on GCS
                        storage.write_atomic(step_dir / MANIFEST, json.dumps(hashes, indent=1))
                self._pending.discard(step)
        if final:
            self._pending.clear()  # deleted by keep-K before it was finalized

    def save(self, step: int, state, data_state: dict, cfg_json: dict) -> None:
        if not self._cleaned:
            self.remove_tmp()
            self._cleaned = True
        self.check()
        try:
            self._write_manifests()
        except OSError as e:
            self._fail(e, step)
        if (self.directory / str(step)).exists():  # never write over a step directory (Orbax also refuses)
            raise FileExistsError(f"{self.directory / str(step)} exists already; not saving over it")
        self._pending.add(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_tree(state)),
                data=grain_checkpoint.CheckpointSave(_DataSnapshot(data_state)),
                config=ocp.args.JsonSave(cfg_json)), force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous part of the save failed (its files, a full disk)
            self._fail(e)

    # A failed asynchronous save is raised at the first check after it failed (the loop checks after every
    # step), naming the step directory it was writing; the older checkpoints are never touched by a save.
    def check(self) -> None:
        """Raise SaveFailed if a background save has failed (cheap: reads a flag of Orbax's save thread)."""
        if self._failed is not None:
            raise self._failed
        if self._manager is not None and self._pending:
            try:
                self._manager.check_for_errors()
            except Exception as e:  # noqa: BLE001 - whatever the save thread raised
                self._fail(e)

    def _fail(self, e: BaseException, step: int | None = None) -> None:
        if step is None:
            storage.refresh(self.directory)
            unfinished = [s for s in sorted(self._pending) if not storage.is_finalized(self.directory / str(s))]
            step = unfinished[0] if unfinished else max(self._pending, default=0)
        self._pending.clear()
        try:
            if self._manager is not None:
                self._manager.wait_until_finished()  # the save's other threads end before its files go
        except Exception:  # noqa: BLE001 - the same failure, raised again
            pass
        try:
            self.remove_tmp()  # the failed save's partial files: freeing the space they hold
        except OSError as cleanup:
            log.warning("could not remove the failed save's temporary files: %s", cleanup)
        good = [s for s in self.steps() if s != step]
        before = (f"The checkpoints saved before it are intact (newest: {self.directory / str(good[0])}): "
                  "free space and run the same command to resume from it" if good else
                  "No checkpoint was saved before it: free space and run the same command to start again")
        self._failed = SaveFailed(f"saving checkpoint {self.directory / str(step)} failed: "
                                  f"{_save_failure_reason(e)}; training stopped at this save. {before}")
        raise self._failed from e

    def restore_latest(self, target_state, target_shardings, cfg_json: dict, *, check=True):
        """(state, data_state, step) of the newest good checkpoint, or None if there is none. The state is
        restored directly into `target_shardings` (any mesh). Bad checkpoints are skipped with a warning and
        moved aside once a good one was found; an incompatible config raises ConfigError first. If every
        checkpoint is bad, ConfigError (nothing moved); an error that is not corruption is raised as is."""
        bad: list[tuple[int, str]] = []
        found = None
        checked = False
        for step in self.steps():
            where = self.directory / str(step)
            try:
                saved_cfg = self.read_config(step)
            except Exception as e:
                if not _is_corruption(e):
                    raise
                bad.append((step, f"config: {type(e).__name__}: {e}"))
                continue
            if check and not checked:
                check_compatible(saved_cfg, cfg_json, str(where))  # raises before anything is touched
                checked = True
            try:
                verify(where)
                data_state = read_data_state(where)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree(target_state, target_shardings))))
                state = from_tree(restored["state"], target_state)
                jax.block_until_ready(state)
                found = (state, data_state, step, saved_cfg)
                break
            except Exception as e:
                if not _is_corruption(e):
                    raise
                bad.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
        for step, why in bad:
            log.warning("checkpoint %s is incomplete or corrupt, skipping it: %s", self.directory / str(step), why)
        if bad and found is None:
            names = ", ".join(str(self.directory / str(s)) for s, _ in bad)
            raise NoGoodCheckpoint(
                f"no checkpoint in {self.directory} can be restored ({names}); refusing to start over at step 0 "
                f"and save over them. To start fresh, move them away (e.g. to {self.workdir / CORRUPT}) or use a "
                "new --workdir")
        if bad and found is not None:
            self._move_aside([s for s, _ in bad if s > found[2]])
        return found

    def _move_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            dest = self.workdir / CORRUPT
            for s in steps:
                target = dest / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
                storage.move_aside(self.directory / str(s), target)  # a bucket: copy all, check, then delete
                log.warning("moved the bad checkpoint %s to %s", self.directory / str(s), target)
            storage.refresh(self.directory)
        shd.sync("llmjax_checkpoint_move_aside")
        self.manager.reload()

    def wait(self) -> None:
        if self._manager is not None:
            self._finish()

    def _finish(self) -> None:
        """Wait for the background save; its failure becomes SaveFailed."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
            self._write_manifests(final=True)
        except Exception as e:  # noqa: BLE001 - whatever the save thread raised
            self._fail(e)

    def close(self) -> None:
        """Wait for the last save and close. After a failed save nothing more is raised here (the failure
        was raised where it was found); the manager is closed all the same."""
        if self._manager is None:
            return
        try:
            if self._failed is None:
                self._finish()
        finally:
            manager, self._manager = self._manager, None
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - the failure is already reported (SaveFailed)
                if self._failed is None:
                    raise


# --------------------------------------------------------------------------------------------- export
def load_latest(workdir, mesh_cfg=None):
    """(TrainState, step, config dict) of WORKDIR's newest good checkpoint, restored onto the mesh `mesh_cfg`
    (a `mesh` config section; default: all devices on the data axis) with the checkpoint's sharding rules."""
    ck = Checkpoints(workdir)
    cfg_json = None
    for s in ck.steps():
        try:
            cfg_json = ck.read_config(s)
            break
        except Exception:
            continue
    if cfg_json is None:
        raise FileNotFoundError(f"{ck.directory} has no readable checkpoint; train with --workdir {workdir} first")
    cfg = ml_collections.ConfigDict(cfg_json)
    mesh = shd.make_mesh(mesh_cfg if mesh_cfg is not None else shd.mesh_config())
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    _, abstract, state_sh = init_state_abstract(ModelConfig.from_dict(cfg.model), tx, mesh,
                                                shd.rules_dict(cfg.sharding.rules), 0)
    try:
        found = ck.restore_latest(abstract, state_sh, cfg_json, check=False)
    except NoGoodCheckpoint as e:  # export/generate report a missing checkpoint as FileNotFoundError
        raise FileNotFoundError(str(e)) from None
    finally:
        ck.close()
    if found is None:
        raise FileNotFoundError(f"no good checkpoint in {ck.directory}")
    state, _, step, saved_cfg = found
    return state, step, saved_cfg


def export(workdir, out) -> int:
    """Write the parameters of WORKDIR's newest good checkpoint to OUT/params (an Orbax checkpoint of the
    nested dict nnx.State.to_pure_dict()) and OUT/config.json (the run config). Returns the step exported."""
    state, step, cfg_json = load_latest(workdir)
    tokenizer = storage.path(workdir) / TOKENIZER_FILE
    write_params(out, state.params.to_pure_dict(), cfg_json, copy_files={TOKENIZER_FILE: tokenizer}
                 if tokenizer.is_file() else None, exported_step=step)
    return step


def _copy_file(src, dst) -> None:
    """Copy one file; either side may be on a bucket (epath's copy works only within one filesystem)."""
    if storage.is_remote(src) or storage.is_remote(dst):
        storage.path(dst).write_bytes(storage.path(src).read_bytes())  # one object write: all or nothing
    else:
        shutil.copyfile(src, dst)


def write_params(out, params, cfg_json: dict, *, copy_files: dict | None = None, **extra) -> None:
    """OUT/params + OUT/config.json (the export layout), plus `copy_files` ({name in OUT: source file}),
    written next to OUT and renamed into place, so that OUT is always either the previous complete export
    or the new one. All processes call this. On a bucket (no rename) see _write_params_remote."""
    if storage.is_remote(out):
        _write_params_remote(storage.path(out), params, cfg_json, copy_files or {}, extra)
        return
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_CONFIG).exists())):
        raise FileExistsError(f"{out} exists and is not an llmjax export (no {EXPORT_CONFIG}); choose a new "
                              "directory, the existing one is left as it is")
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a killed run
        tmp.mkdir(parents=True)
    shd.sync("llmjax_write_params_start")
    with ocp.StandardCheckpointer() as w:
        w.save(tmp / EXPORT_PARAMS, params, force=True)
    if jax.process_index() == 0:
        for name, src in (copy_files or {}).items():
            _copy_file(src, tmp / name)
        (tmp / EXPORT_CONFIG).write_text(json.dumps({**cfg_json, **extra}, indent=2) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    shd.sync("llmjax_write_params_done")


# An export on a bucket cannot be renamed into place (a "directory" rename is a copy + delete per object), so it
# is written where it stays, and config.json, one object written last (atomic on GCS), is its completion
# marker: loaders read config.json first, so an OUT without it is never taken for an export. OUT/.incomplete is
# written before anything else and deleted after config.json: it tells an interrupted export of ours (cleaned
# and written again) from a foreign directory (refused). Replacing a previous export removes its config.json
# first, so while the new one is written OUT is incomplete (unlike the local rename: a crash then leaves no
# export at OUT, to be written again, rather than the previous one).
INCOMPLETE = ".incomplete"


def _write_params_remote(out: epath.Path, params, cfg_json: dict, copy_files: dict, extra: dict) -> None:
    storage.refresh(out)
    marker, config = out / INCOMPLETE, out / EXPORT_CONFIG
    if out.exists() and (not out.is_dir() or (not config.exists() and not marker.exists())):
        raise FileExistsError(f"{out} exists and is not an llmjax export (no {EXPORT_CONFIG}); choose a new "
                              "directory, the existing one is left as it is")
    shd.sync("llmjax_write_params_checked")  # every process looked before process 0 changes anything
    if jax.process_index() == 0:
        marker.write_text(json.dumps({"writing": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        config.unlink(missing_ok=True)  # from here on OUT is not a complete export
        storage.refresh(out)
        for p in out.iterdir():  # the previous export's (or an interrupted one's) files
            if p.name != INCOMPLETE and p.is_dir():
                p.rmtree()
            elif p.name != INCOMPLETE:
                p.unlink()
        storage.refresh(out)
    shd.sync("llmjax_write_params_start")
    with ocp.StandardCheckpointer() as w:
        w.save(out / EXPORT_PARAMS, params, force=True)
    if jax.process_index() == 0:
        for name, src in copy_files.items():
            _copy_file(src, out / name)
        config.write_text(json.dumps({**cfg_json, **extra}, indent=2) + "\n")  # last: the export is complete
        marker.unlink(missing_ok=True)
        storage.refresh(out)
    shd.sync("llmjax_write_params_done")


def read_best(workdir) -> tuple[int, float] | None:
    """(step, validation loss) of WORKDIR/best, or None when there is none yet."""
    path = storage.path(workdir) / BEST / EXPORT_CONFIG
    storage.refresh(path)
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    return int(cfg["exported_step"]), float(cfg["validation_loss"])


def save_best(workdir, step: int, state, loss: float, cfg_json: dict) -> None:
    """Keep the parameters of `step` in WORKDIR/best (loadable with load_exported, like `llmjax export`)."""
    write_params(storage.path(workdir) / BEST, state.params.to_pure_dict(), cfg_json, exported_step=int(step),
                 validation_loss=float(loss))


def load_exported(directory):
    """(model, config dict) from an export directory: the model built from config.json with the parameters."""
    directory = storage.path(directory)
    storage.refresh(directory)
    cfg = json.loads((directory / EXPORT_CONFIG).read_text())
    model_cfg = ModelConfig.from_dict(cfg["model"])
    # Shapes only: nothing is initialised that the restore overwrites.
    params = nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, 0)), nnx.Param)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params.to_pure_dict())
    with ocp.StandardCheckpointer() as r:
        loaded = r.restore(directory / EXPORT_PARAMS, abstract)
    return build_with_params(model_cfg, flatten(loaded)), cfg


def stored_array_bytes(directory) -> int:
    """Bytes of the arrays an Orbax checkpoint directory holds, from its metadata (shape x dtype): what it
    stores, independent of how the files happened to be batched and compressed on disk."""
    absl_log = logging.getLogger("absl")  # Orbax warns that a plain state directory has no step metadata
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(storage.path(directory)).item_metadata
    finally:
        absl_log.setLevel(level)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
