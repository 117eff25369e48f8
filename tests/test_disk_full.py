"""A full disk: the save that fails is reported in one line naming its step directory, the run stops, the
checkpoints before it are intact and restorable. On a real (small)
tmpfs mounted by the test: CI runs as root."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from llmjax import checkpoint

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "gpt_tiny.py"
DATA = ["--config.data.max_documents=300", "--config.data.vocab_size=1000", "--config.model.vocab_size=1000"]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def train(workdir, data_dir, steps):
    args = ["train", f"--config={CONFIG}", f"--workdir={workdir}", *DATA, f"--config.data.data_dir={data_dir}",
            "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
            "--config.model.num_heads=4", "--config.train.num_samples=0", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.checkpoint_every=4",
            "--config.train.keep_checkpoints=0", "--config.optim.warmup_steps=2", f"--config.train.steps={steps}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_disk_full_at_a_save_is_one_line_and_the_checkpoints_before_it_stay(small_disk, tmp_path, tmp_path_factory,
                                                                    worker_id):
    from conftest import prepared_data_dir  # the session's prepared corpus (tests/conftest.py)

    data_dir = prepared_data_dir(tmp_path_factory, worker_id, str(CONFIG), DATA)  # off the small disk
    work = small_disk / "run"
    first = train(work, data_dir, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = work / "checkpoints"
    assert checkpoint.Checkpoints(work).steps() == [4]
    size = sum(p.stat().st_size for p in (ckpts / "4").rglob("*") if p.is_file())
    # Fill the disk so that less than half a checkpoint fits: the save of step 8 fails mid-write.
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * (free - size // 2))
    full = train(work, data_dir, 12)
    assert full.returncode == 2, full.stderr[-3000:]
    err = full.stderr
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err[-3000:]
    message = f"llmjax train: saving checkpoint {ckpts / '8'} failed: No space left on device"
    assert err.count(message) == 1, err[-3000:]
    assert f"newest: {ckpts / '4'}" in err
    # Nothing of the failed save is left; the checkpoint before it is whole (its checksums verify).
    assert sorted(p.name for p in ckpts.iterdir()) == ["4"]
    checkpoint.verify(ckpts / "4")
    assert (ckpts / "4" / checkpoint.MANIFEST).is_file()

    _, step, _ = checkpoint.load_latest(work)  # what the same command resumes from once there is space
    assert step == 4
