"""Guards: a non-finite loss, gradient norm or state stops training with one clear message before it is saved;
metrics.jsonl survives torn lines (a kill or a full disk mid-write) and holds only valid JSON numbers."""

import json
import logging
import math
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import loop, metrics, sharding
from llmjax.metrics import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "gpt_tiny.py"
DATA = ["--config.data.max_documents=300", "--config.data.vocab_size=1000", "--config.model.vocab_size=1000"]


# ------------------------------------------------------------------------------- non-finite guard (fit)
class FakeCheckpoints:
    def __init__(self, directory):
        self.directory, self.saved = directory, []

    def save(self, step, state, data_state, cfg_json):
        assert bool(jax.device_get(loop._all_finite(state))), f"a non-finite state was saved at step {step}"
        self.saved.append(step)

    def check(self):
        pass

    def close(self):
        pass


class Batches:
    def __iter__(self):
        return self

    def __next__(self):
        return {"x": np.zeros((2, 4), np.int32)}

    def get_state(self):
        return {}


def fit_diverging(tmp_path, *, bad_step, bad, log_every, checkpoint_every=2, steps=8):
    """fit on a fake step whose state is {"w": ...}: at `bad_step` the step puts NaN into `bad` ("loss" or
    "state"). Returns (the NonFiniteError, the steps saved, the metrics rows)."""
    def step_fn(state, batch):
        n = int(state["n"]) + 1
        w = state["w"] + (jnp.nan if bad == "state" and n == bad_step else 0.0)
        loss = jnp.float32(jnp.nan if bad == "loss" and n == bad_step else 1.0 / n)
        return {"n": jnp.int32(n), "w": w}, {"loss": loss, "grad_norm": jnp.float32(1.0)}

    state = {"n": jnp.int32(0), "w": jnp.ones(3)}
    start = loop.Start(None, state, None)
    tc = loop.default_train_config()
    tc.update(steps=steps, log_every=log_every, checkpoint_every=checkpoint_every)
    mesh = sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])
    checkpoints = FakeCheckpoints(tmp_path / "checkpoints")
    with pytest.raises(loop.NonFiniteError) as e:
        loop.fit(step_fn, start, Batches(), tc, mesh, workdir=tmp_path, checkpoints=checkpoints, progress=False)
    return str(e.value), checkpoints.saved, read_metrics(tmp_path)


def test_nan_loss_at_a_logging_step_stops_before_saving(tmp_path):
    message, saved, rows = fit_diverging(tmp_path, bad_step=3, bad="loss", log_every=1)
    assert saved == [2]
    assert "step 3" in message and "loss is nan" in message and str(tmp_path / "checkpoints" / "2") in message
    assert rows[-1]["step"] == 3 and rows[-1]["train/loss"] is None  # the diverged row is kept, as null


def test_nan_state_between_logging_steps_is_never_saved(tmp_path):
    # No logging step before step 8: the check at the checkpoint step (4) finds the NaN state of step 3.
    message, saved, _ = fit_diverging(tmp_path, bad_step=3, bad="state", log_every=100)
    assert saved == [2]
    assert "step 4" in message and "NaN/inf" in message and str(tmp_path / "checkpoints" / "2") in message


def test_diverging_cli_run_exits_with_one_line_and_keeps_only_finite_checkpoints(tmp_path, tmp_path_factory,
                                                                                 worker_id):
    from conftest import prepared_data_dir

    data_dir = prepared_data_dir(tmp_path_factory, worker_id, str(CONFIG), DATA)  # shared with test_checkpoint
    workdir = tmp_path / "run"
    args = ["train", f"--config={CONFIG}", f"--workdir={workdir}", *DATA, f"--config.data.data_dir={data_dir}",
            "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
            "--config.model.num_heads=4", "--config.train.num_samples=0", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.checkpoint_every=1",
            "--config.train.batch_size=4", "--config.train.steps=12", "--config.optim.warmup_steps=2",
            "--config.optim.learning_rate=1e9", "--config.optim.clip_norm=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("llmjax train: training diverged at step "), out.stderr[-3000:]
    diverged = int(last.split("at step ")[1].split(":")[0])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < diverged  # warm-up step 1 (learning rate 0) is finite and saved
    assert str(workdir / "checkpoints" / str(max(saved))) in last
    text = (workdir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text and '"nan"' not in text
    assert any(v is None for r in read_metrics(workdir) for v in r.values())


# ----------------------------------------------------------------------------------------- metrics.jsonl
def strict_json(line):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"not a JSON number: {c}"))


def test_non_finite_metrics_are_written_as_null_and_loss_png_still_draws(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.0, "grad_norm": np.float32(1.5)})
    writer.write(2, {"loss": math.nan, "grad_norm": jnp.float32(jnp.inf)})
    writer.write(2, {"loss": -math.inf}, "eval")
    writer.write(3, {"loss": 1.0})
    writer.close()
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "train/loss": None, "train/grad_norm": None}
    assert rows[2] == {"step": 2, "eval/loss": None}
    assert os.path.getsize(metrics.plot_losses(tmp_path)) > 1000


TORN = '{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "train/lo'


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(TORN)
    with caplog.at_level(logging.WARNING, logger="llmjax"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "torn" in caplog.text
    loop.drop_metrics_after(tmp_path, 1)  # what a resume from checkpoint 1 does
    assert [strict_json(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_rows_appended_after_a_torn_line_stay_whole(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(TORN + "\x00garbage")
    writer = metrics.MetricsWriter(tmp_path)  # a fresh run in the same workdir (no checkpoint to resume)
    writer.write(1, {"loss": 3.0})
    writer.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 1.5), (1, 3.0)]


def test_tensorboard_events_hold_the_scalars_and_the_writer_does_not_import_torch(tmp_path):
    """TensorBoard gets every finite scalar at its step, and the writer leaves PyTorch unloaded (tensorboardX
    would import it, ~1 s of every run's start, when it is installed, as in the test extras)."""
    code = ("import sys; from llmjax import metrics; w = metrics.MetricsWriter(sys.argv[1]); "
            "w.write(1, {'loss': 2.5, 'grad_norm': 0.75}); w.write(2, {'loss': 1.25}, 'eval'); w.close(); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr[-2000:]
    from tensorboardX.proto import event_pb2  # the event records' own schema (installed with tensorboardX)

    scalars = []
    for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 16 + n
            scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    assert sorted(scalars) == [(1, "train/grad_norm", 0.75), (1, "train/loss", 2.5), (2, "eval/loss", 1.25)]
