"""A run whose workdir and prepared data are in a bucket (gs://), against a real GCS API server started by the
test (fake-gcs-server): trained, SIGKILLed after a checkpoint, resumed with bit-identical losses and parameters,
exported to the bucket and decoded from the export; nothing is written to a local `gs:` directory."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from llmjax import checkpoint
from llmjax.metrics import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "gpt_tiny.py"
STEPS = 12


def args(workdir, data_dir):
    return ["train", f"--config={CONFIG}", f"--workdir={workdir}", "--config.data.max_documents=200",
            "--config.data.vocab_size=500", "--config.model.vocab_size=500", f"--config.data.data_dir={data_dir}",
            "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
            "--config.model.num_heads=4", "--config.train.num_samples=0", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.checkpoint_every=4",
            "--config.optim.warmup_steps=2", f"--config.train.steps={STEPS}"]


def spawn(a, log, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               LLMJAX_CACHE_DIR=str(cache))  # the local copies of the bucket's prepared data
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "llmjax.cli", *map(str, a)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)


def run(a, log_path):
    with open(log_path, "a") as log:
        p = spawn(a, log, log_path.parent / "cache")
        assert p.wait(timeout=600) == 0, log_path.read_text()[-4000:]
    return log_path.read_text()


def losses(workdir) -> dict:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def params(workdir):
    state, step, _ = checkpoint.load_latest(workdir)
    leaves = {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree_util.tree_flatten_with_path(state.params.to_pure_dict())[0]}
    return step, leaves


@pytest.mark.slow
def test_bucket_workdir_trains_survives_sigkill_exports_and_decodes(gcs, tmp_path):
    data_dir = f"gs://{gcs.bucket}/data"
    ref = tmp_path / "ref"  # the uninterrupted run: a local workdir, the same prepared data from the bucket
    run(args(ref, data_dir), tmp_path / "ref.log")
    ref_losses = losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    work = f"gs://{gcs.bucket}/run"
    with open(tmp_path / "killed.log", "w") as log:
        p = spawn(args(work, data_dir), log, tmp_path / "cache")
        done = epath.Path(work) / "checkpoints" / "8" / "commit_success.txt"
        t = time.time()
        while not done.exists():
            assert p.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() - t < 300
            time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait()
    have = checkpoint.Checkpoints(work).steps()
    assert 8 in have and STEPS not in have, have
    text = run(args(work, data_dir), tmp_path / "resumed.log")
    resumed_from = max(have)
    assert f"resuming from checkpoint {work}/checkpoints/{resumed_from} at step {resumed_from}" in text, text[-3000:]
    got = losses(work)
    assert sorted(got) == list(range(1, STEPS + 1))  # each step once
    assert got == ref_losses  # bit-identical, the steps before and after the kill
    step, got_params = params(work)
    ref_step, ref_params = params(ref)
    assert step == ref_step == STEPS and got_params.keys() == ref_params.keys()
    for k in ref_params:
        np.testing.assert_array_equal(got_params[k], ref_params[k], err_msg=k)

    export = f"gs://{gcs.bucket}/export"
    run(["export", f"--workdir={work}", f"--out={export}"], tmp_path / "export.log")
    assert (epath.Path(export) / "config.json").exists() and (epath.Path(export) / "tokenizer.model").exists()
    out = run(["generate", f"--workdir={export}", "--prompt=The ", "--max-new-tokens=5"], tmp_path / "gen.log")
    assert "The " in out

    assert not (ROOT / "gs:").exists() and not pathlib.Path("gs:").exists()  # nothing went to a local "gs:" dir
