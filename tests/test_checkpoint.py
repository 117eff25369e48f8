"""Checkpoints: resume after SIGKILL / SIGTERM continues bit-identically, restore onto other meshes, corrupt
checkpoints are skipped (and kept), shape-changing config changes are refused, export writes params only."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from helpers.cli_errors import user_error
from llmjax import checkpoint, cli
from llmjax.data.shards import TOKENIZER_FILE
from llmjax.models.config import ConfigError
from llmjax.params import key_name
from llmjax.metrics import read_metrics
from llmjax.train import check_resume_tokenizer

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "gpt_tiny.py"


DATA = ["--config.data.max_documents=300", "--config.data.vocab_size=1000", "--config.model.vocab_size=1000"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, worker_id):
    from conftest import prepared_data_dir

    # prepared once per session (conftest), shared by the runs below
    return pathlib.Path(prepared_data_dir(tmp_path_factory, worker_id, str(CONFIG), DATA))


def args(workdir, data_dir, steps=12, *extra):
    return ["train", f"--config={CONFIG}", f"--workdir={workdir}", *DATA, f"--config.data.data_dir={data_dir}",
            "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
            "--config.model.num_heads=4", "--config.train.num_samples=0", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.checkpoint_every=4",
            "--config.optim.warmup_steps=2", f"--config.train.steps={steps}", *extra]


def train(*a):
    assert cli.main(["llmjax", *a]) == 0


def env(devices=8):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def spawn(a, log, devices=8):
    return subprocess.Popen([sys.executable, "-m", "llmjax.cli", *a], stdout=log, stderr=subprocess.STDOUT,
                            env=env(devices), cwd=ROOT)


def run(a, tmp, devices=8):
    with open(tmp / "run.log", "a") as log:
        p = spawn(a, log, devices)
        assert p.wait(timeout=300) == 0, (tmp / "run.log").read_text()[-3000:]


def wait_for(path: pathlib.Path, proc, timeout=120):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before the checkpoint appeared"
        assert time.time() - t < timeout
        time.sleep(0.02)


def losses(workdir) -> dict:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def params_of(workdir):
    state, step, _ = checkpoint.load_latest(workdir)
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                  jax.tree_util.tree_flatten_with_path(state.params.to_pure_dict())[0]}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def hashes(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_identical(tmp_path, data_dir):
    steps = 24  # one device per run: the point here is the continuation, test_saved_on_fsdp8... covers meshes
    ref = tmp_path / "ref"
    run(args(ref, data_dir, steps), tmp_path, devices=1)
    ref_step, ref_params = params_of(ref)
    ref_losses = losses(ref)
    assert ref_step == steps and sorted(ref_losses) == list(range(1, steps + 1))

    # SIGKILL after the checkpoint of step 8: the steps after it are lost and run again.
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        p = spawn(args(killed, data_dir, steps), log, devices=1)
        wait_for(killed / "checkpoints" / "8", p)
        p.kill()
        p.wait()
    have = checkpoint.Checkpoints(killed).steps()
    assert steps not in have and 8 in have, have
    run(args(killed, data_dir, steps), tmp_path, devices=1)
    resumed_from = max(s for s in have)
    assert f"resuming from checkpoint {killed / 'checkpoints' / str(resumed_from)}" in (tmp_path / "run.log").read_text()
    got = losses(killed)
    assert sorted(got) == list(range(1, steps + 1))  # every step once: rows of the lost steps were dropped
    assert {s: got[s] for s in got if s > resumed_from} == {s: ref_losses[s] for s in ref_losses if s > resumed_from}
    assert_same_params(params_of(killed)[1], ref_params)

    # SIGTERM: the run finishes its step, saves, and exits with 0; the restart continues from there.
    termed = tmp_path / "termed"
    with open(tmp_path / "termed.log", "w") as log:
        p = spawn(args(termed, data_dir, steps), log, devices=1)
        wait_for(termed / "checkpoints" / "4", p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 0
    text = (tmp_path / "termed.log").read_text()
    assert "received SIGTERM" in text and "preempted" in text, text[-2000:]
    saved = max(checkpoint.Checkpoints(termed).steps())
    assert 4 <= saved < steps and max(losses(termed)) == saved  # saved exactly the last step it ran
    run(args(termed, data_dir, steps), tmp_path, devices=1)
    got = losses(termed)
    assert got == ref_losses
    assert_same_params(params_of(termed)[1], ref_params)


@pytest.mark.slow  # three runs of a tiny model: 30-45 s on 2 shared CPU cores, mostly process starts and compiles
def test_ul2_run_resumed_after_sigkill_has_the_losses_of_an_uninterrupted_one(tmp_path, data_dir):
    """A UL2 mixture draws each example's denoiser from the example's seeded rng, so a run killed after a
    checkpoint and resumed draws the same denoisers, rows and losses as one that was never interrupted."""
    steps, ul2 = 10, "--config.objective=ul2"
    ref = tmp_path / "ref"
    run(args(ref, data_dir, steps, ul2), tmp_path, devices=1)
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        p = spawn(args(killed, data_dir, steps, ul2), log, devices=1)
        wait_for(killed / "checkpoints" / "4", p)
        p.kill()
        p.wait()
    have = checkpoint.Checkpoints(killed).steps()
    assert steps not in have and 4 in have, have
    run(args(killed, data_dir, steps, ul2), tmp_path, devices=1)
    resumed = f"resuming from checkpoint {killed / 'checkpoints' / str(max(have))}"
    assert resumed in (tmp_path / "run.log").read_text()
    assert losses(killed) == losses(ref) and sorted(losses(ref)) == list(range(1, steps + 1))
    assert_same_params(params_of(killed)[1], params_of(ref)[1])


def test_a_resume_whose_data_has_another_tokenizer_is_refused(tmp_path):
    """The run keeps its tokenizer: data re-prepared with another one (e.g. by an llmjax reserving other ids)
    would give the trained ids other meanings, so the resume stops with an error naming both."""
    run, data = tmp_path / "run", tmp_path / "data"
    for d in (run, data):
        d.mkdir()
        (d / TOKENIZER_FILE).write_bytes(b"tokenizer v1")
    check_resume_tokenizer(run, data, run / "checkpoints" / "4")  # the same tokenizer: the resume goes on
    (data / TOKENIZER_FILE).write_bytes(b"tokenizer v2")
    with pytest.raises(ConfigError, match=r"cannot resume from .*4: the run was trained with the tokenizer .*run/"
                                          r"tokenizer.model but its data .*data has another one"):
        check_resume_tokenizer(run, data, run / "checkpoints" / "4")


DUMP = """
import sys, numpy as np, jax
from llmjax import checkpoint, sharding
state, step, _ = checkpoint.load_latest(sys.argv[1], sharding.mesh_config(data=1, fsdp=-1))
flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
        jax.tree_util.tree_flatten_with_path(state.params.to_pure_dict())[0]}
shards = {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
print("devices", jax.device_count(), "step", step, "spread over", sorted(shards))
np.savez(sys.argv[2], **flat)
"""


@pytest.mark.slow
def test_saved_on_fsdp8_restores_on_4_and_1_devices_and_continues(tmp_path, data_dir):
    work = tmp_path / "w"
    train(*args(work, data_dir, 8, "--config.mesh.data=1", "--config.mesh.fsdp=8"))
    _, saved = params_of(work)
    for devices in (4, 1):
        out = tmp_path / f"p{devices}.npz"
        r = subprocess.run([sys.executable, "-c", DUMP, str(work), str(out)], env=env(devices), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"devices {devices} step 8" in r.stdout
        loaded = dict(np.load(out))
        assert_same_params(loaded, saved)
    # Training continues on 4 devices with another mesh (fsdp=2 x data=2).
    run(args(work, data_dir, 12, "--config.mesh.data=2", "--config.mesh.fsdp=2"), tmp_path, devices=4)
    assert "resuming from checkpoint" in (tmp_path / "run.log").read_text()
    assert max(checkpoint.Checkpoints(work).steps()) == 12 and np.isfinite(losses(work)[12])


def test_corrupt_newest_checkpoint_is_skipped_named_and_kept(tmp_path, data_dir, caplog):
    work = tmp_path / "w"
    train(*args(work, data_dir, 12))
    assert checkpoint.Checkpoints(work).steps() == [12, 8, 4]
    bad = work / "checkpoints" / "12"
    biggest = max((p for p in (bad / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    bad_hashes = hashes(bad)
    caplog.set_level("INFO", logger="llmjax")
    train(*args(work, data_dir, 16))
    text = caplog.text
    assert f"checkpoint {bad} is incomplete or corrupt" in text
    assert f"resuming from checkpoint {work / 'checkpoints' / '8'} at step 8" in text
    moved = list((work / checkpoint.CORRUPT).iterdir())
    assert len(moved) == 1 and hashes(moved[0]) == bad_hashes  # kept as it was, out of the way
    assert checkpoint.Checkpoints(work).steps() == [16, 12, 8]
    assert params_of(work)[0] == 16


def test_refused_resumes_change_nothing_and_a_finished_run_says_so(tmp_path, data_dir, capsys):
    work = tmp_path / "w"
    train(*args(work, data_dir, 8))
    before = hashes(work / "checkpoints")
    run_files = {name: (work / name).read_bytes() for name in ("config.json", "command.txt")}
    message = user_error(["llmjax", *args(work, data_dir, 12, "--config.model.num_layers=3")], capsys)
    assert "model.num_layers (checkpoint 2, now 3)" in message, message
    # A change the data position cannot follow is refused after the state was restored, and before
    # the run's files are rewritten.
    message = user_error(["llmjax", *args(work, data_dir, 12, "--config.train.seed=1")], capsys)
    assert message.startswith(f"llmjax train: cannot resume from {work / 'checkpoints' / '8'}"), message
    assert "train.seed" in message, message
    assert hashes(work / "checkpoints") == before
    assert {name: (work / name).read_bytes() for name in run_files} == run_files
    assert not (work / checkpoint.CORRUPT).exists()

    # Changing the length of the run (and so the schedule) or logging is allowed; the resumed run's summary
    # starts from the first run's validation at step 0 (not "nan").
    first_eval = next(r["eval/loss"] for r in read_metrics(work) if "eval/loss" in r)
    capsys.readouterr()
    train(*args(work, data_dir, 10, "--config.train.log_every=2"))
    assert checkpoint.Checkpoints(work).steps()[0] == 10
    last_eval = [r["eval/loss"] for r in read_metrics(work) if "eval/loss" in r][-1]
    assert f"validation loss: {first_eval:.4f} at step 0 -> {last_eval:.4f} at step 10" in capsys.readouterr().out

    # The same command again: the run is finished; said at once, nothing prepared, measured or written.
    def files_of(work):  # but the lock, which every run takes
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in work.rglob("*")
                if p.is_file() and p.name != ".lock"}

    files = files_of(work)
    t = time.perf_counter()
    train(*args(work, data_dir, 10, "--config.train.log_every=2"))
    took = time.perf_counter() - t
    out = capsys.readouterr()
    assert f"{work} is already trained to step 10 (train.steps=10); nothing to do" in out.out, out
    assert f"validation loss: {first_eval:.4f} at step 0 -> {last_eval:.4f} at step 10" in out.out
    assert "peak" not in out.err and "prepared" not in out.err, out.err
    assert files_of(work) == files
    assert took < 5, took


def test_a_scanned_run_goes_on_unrolled_from_its_weights_with_init_from(tmp_path, data_dir, capsys):
    """The layer layout is part of a checkpoint's state: resuming in the other layout is refused with the command
    that converts it, and that command starts a new run from exactly the saved weights."""
    scanned, unrolled = tmp_path / "scanned", tmp_path / "unrolled"
    train(*args(scanned, data_dir, 4, "--config.model.scan_layers=True"))
    assert "decoder/blocks/0/self_attn/q/kernel" in (scanned / "sharding.txt").read_text()
    message = user_error(["llmjax", *args(scanned, data_dir, 8)], capsys)
    assert "model.scan_layers (checkpoint True, now False)" in message, message
    assert f"--init-from {scanned} --config.model.scan_layers=False --workdir NEW" in message, message
    train(*args(unrolled, data_dir, 1, f"--init-from={scanned}"))
    end = [r for r in read_metrics(scanned) if "eval/loss" in r][-1]
    start = next(r for r in read_metrics(unrolled) if "eval/loss" in r)
    assert end["step"] == 4 and start["step"] == 0
    assert start["eval/loss"] == pytest.approx(end["eval/loss"], abs=1e-5)
    message = user_error(["llmjax", *args(tmp_path / "other", data_dir, 1, f"--init-from={scanned}",
                                          "--config.model.num_layers=3")], capsys)
    assert message.startswith(f"llmjax train: --init-from {scanned}: its parameters do not fit"), message
    assert not (tmp_path / "other").exists()


def test_export_writes_params_only_and_they_load_into_a_model(tmp_path, data_dir):
    work, out = tmp_path / "w", tmp_path / "export"
    train(*args(work, data_dir, 4))
    assert cli.main(["llmjax", "export", f"--workdir={work}", f"--out={out}"]) == 0
    cfg = json.loads((out / checkpoint.EXPORT_CONFIG).read_text())
    assert cfg["exported_step"] == 4 and cfg["model"]["num_layers"] == 2
    # The run's tokenizer travels with the workdir and the export (generate/fill need nothing else).
    assert (out / checkpoint.TOKENIZER_FILE).read_bytes() == (work / checkpoint.TOKENIZER_FILE).read_bytes()
    assert (work / checkpoint.TOKENIZER_FILE).read_bytes() == next(data_dir.rglob("tokenizer.model")).read_bytes()
    model, _ = checkpoint.load_exported(out)
    step, expected = params_of(work)
    got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]}
    assert_same_params(got, expected)
    # Only parameters: the exported tree has exactly the parameter arrays, nothing of the optimizer.
    meta = json.loads((out / checkpoint.EXPORT_PARAMS / "_METADATA").read_text())
    names = json.dumps(meta)
    assert "opt_state" not in names and "mu" not in json.dumps(list(meta.get("tree_metadata", {}).keys()))


def _leaves(tree) -> dict:
    """{path without a trailing 'value': array} of a nested dict restored by Orbax."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(key_name(k) for k in path)
        out[names[:-1] if names[-1] == "value" else names] = np.asarray(x)
    return out


def test_keep_best_keeps_the_lowest_validation_loss_across_resumes(tmp_path, data_dir):
    import orbax.checkpoint as ocp

    work = tmp_path / "w"
    best_args = ("--config.train.keep_best=True", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                 "--config.train.keep_checkpoints=10", "--config.optim.learning_rate=0.05")
    train(*args(work, data_dir, 8, *best_args))
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(work) if "eval/loss" in r and r["step"] > 0}
    assert sorted(evals) == [2, 4, 6, 8]  # (step 0, the untrained model, is evaluated but never kept)
    best_step = min(evals, key=evals.get)
    cfg = json.loads((work / checkpoint.BEST / checkpoint.EXPORT_CONFIG).read_text())
    assert cfg["exported_step"] == best_step and abs(cfg["validation_loss"] - evals[best_step]) < 1e-6
    assert checkpoint.read_best(work) == (best_step, cfg["validation_loss"])
    with ocp.StandardCheckpointer() as r:
        kept = _leaves(r.restore(work / checkpoint.BEST / checkpoint.EXPORT_PARAMS))
        saved = _leaves(r.restore(work / "checkpoints" / str(best_step) / "state")["params"])
    assert kept.keys() == saved.keys() and len(kept) > 5
    for k in kept:
        np.testing.assert_array_equal(kept[k], saved[k], err_msg=str(k))
    # A resumed run compares with the best so far: make it unbeatable, continue; WORKDIR/best is untouched.
    cfg["validation_loss"] = -1.0
    (work / checkpoint.BEST / checkpoint.EXPORT_CONFIG).write_text(json.dumps(cfg))
    before = hashes(work / checkpoint.BEST)
    train(*args(work, data_dir, 12, *best_args))
    assert max(r["step"] for r in read_metrics(work) if "eval/loss" in r) == 12
    assert hashes(work / checkpoint.BEST) == before
    model, _ = checkpoint.load_exported(work / checkpoint.BEST)  # the export layout: loads like `llmjax export`
    assert model.cfg.num_layers == 2


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path, data_dir):
    work, out = tmp_path / "w", tmp_path / "mine"
    train(*args(work, data_dir, 4))
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit, match="is not an llmjax export"):
        cli.main(["llmjax", "export", f"--workdir={work}", f"--out={out}"])
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    # Exporting again over an earlier export replaces it whole.
    again = tmp_path / "export"
    for _ in range(2):
        assert cli.main(["llmjax", "export", f"--workdir={work}", f"--out={again}"]) == 0
    assert sorted(p.name for p in again.iterdir()) == [checkpoint.EXPORT_CONFIG, checkpoint.EXPORT_PARAMS,
                                                       checkpoint.TOKENIZER_FILE]
    assert not again.with_name("export.tmp").exists() and not again.with_name("export.old").exists()


def test_data_workers_do_not_change_the_run(tmp_path, data_dir):
    """train.data_workers=2 (Grain worker processes) feeds exactly the batches of the in-process pipeline."""
    train(*args(tmp_path / "inline", data_dir, 4))
    train(*args(tmp_path / "workers", data_dir, 4, "--config.train.data_workers=2"))
    assert losses(tmp_path / "workers") == losses(tmp_path / "inline")
