"""Profiles (issue 21): train.profile_steps=N,M writes a jax.profiler trace of steps N..M into WORKDIR/tensorboard
(plugins/profile/<run>/<host>.xplane.pb, what TensorBoard's profile plugin and XProf read) that names the train step
(the compiled module jit_train_step) and annotates each profiled step; bad values are one-line ConfigErrors."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llmjax import loop, profiling
from llmjax import sharding as shd
from llmjax.config import check_train_config, load_config
from llmjax.loop import default_train_config
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.state import default_optim_config, init_state, make_optimizer
from llmjax.step import batch_shardings, make_train_step

ROOT = pathlib.Path(__file__).parent.parent


# ------------------------------------------------------------------ the trace file, read without its .proto
def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message: varints as int, length-delimited as bytes."""
    i, out = 0, []

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire} at byte {i}")
        out.append((number, wire, value))
    return out


def _first(fields, number, default=None):
    return next((v for n, _, v in fields if n == number), default)


def trace_events(path) -> list[tuple[str, str, dict]]:
    """(plane name, event name, {stat name: value}) of every event of an XSpace (tsl/profiler/protobuf/xplane.proto:
    XSpace.planes 1; XPlane name 2, lines 3, event_metadata 4 and stat_metadata 5 (maps: key 1, value 2, each
    metadata with id 1 and name 2); XLine events 4; XEvent metadata_id 1, stats 4; XStat metadata_id 1 and one
    value: 2-4 numbers, 5 str, 6 bytes, 7 ref (a stat metadata id whose name is the string))."""
    out = []
    for plane in (v for n, _, v in _fields(pathlib.Path(path).read_bytes()) if n == 1):
        fields = _fields(plane)
        name = _first(fields, 2, b"").decode()
        meta = {4: {}, 5: {}}
        for n, _, entry in fields:
            if n in meta:
                entry = _fields(entry)
                meta[n][_first(entry, 1, 0)] = _first(_fields(_first(entry, 2, b"")), 2, b"").decode()
        events, stats = meta[4], meta[5]
        for line in (v for n, _, v in fields if n == 3):
            for event in (v for n, _, v in _fields(line) if n == 4):
                event = _fields(event)
                values = {}
                for stat in (v for n, _, v in event if n == 4):
                    stat = _fields(stat)
                    kind, value = next(((n, v) for n, _, v in stat if n != 1), (None, None))
                    value = stats.get(value, value) if kind == 7 else value
                    values[stats.get(_first(stat, 1, 0), "?")] = value.decode() if kind in (5, 6) else value
                out.append((name, events.get(_first(event, 1, 0), "?"), values))
    return out


def profile_files(tensorboard: pathlib.Path) -> list[pathlib.Path]:
    return sorted((tensorboard / "plugins" / "profile").glob("*/*.xplane.pb"))


def profiled_steps(events) -> list[int]:
    return sorted(s["step_num"] for _, name, s in events if name == "train" and "step_num" in s)


# ------------------------------------------------------------------------------------------------ tests
def tiny_fit(workdir, steps: int, profile_steps: str):
    """The training loop (llmjax.loop.fit, as `llmjax train` runs it) on a 1-layer decoder, 8 CPU devices and
    random packed rows: the real train step and hooks, without data preparation, evaluation or checkpoints."""
    cfg = ModelConfig(family="decoder", vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_length=16)
    tc = default_train_config()
    tc.update(steps=steps, batch_size=8, seq_length=16, log_every=2, profile_steps=profile_steps)
    mesh = shd.make_mesh(shd.mesh_config())
    tx = make_optimizer(default_optim_config(), steps)
    graphdef, state, state_sh = init_state(cfg, tx, mesh, shd.rules_dict(shd.DEFAULT_RULES), seed=0)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            tokens = rng.integers(1, 64, (8, 17)).astype(np.int32)
            yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 16), np.float32),
                   "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32),
                                                                                   (8, 1))}

    it = batches()
    first = next(it)
    step_fn = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, first))
    return loop.fit(step_fn, loop.Start(graphdef, state, state_sh), it, tc, mesh, first_batch=first,
                    workdir=workdir, progress=False)


def test_trace_of_steps_names_the_train_step(tmp_path):
    """4 steps of the training loop with profile_steps=2,3: one trace of exactly steps 2 and 3, next to the
    TensorBoard scalars, whose host line dispatches the jitted train_step and whose executed XLA ops belong to
    the module jit_train_step (the device work is in the trace: the outputs were blocked on before writing it)."""
    tiny_fit(tmp_path, steps=4, profile_steps="2,3")
    files = profile_files(tmp_path / "tensorboard")
    assert len(files) == 1, files
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    events = trace_events(files[0])
    assert profiled_steps(events) == [2, 3]  # StepTraceAnnotation("train", step_num=...) of the profiled steps
    names = {name for _, name, _ in events}
    assert "PjitFunction(train_step)" in names, sorted(names)[:50]  # the host dispatch of the train step
    modules = {s.get("hlo_module") for _, _, s in events}
    assert "jit_train_step" in modules, modules  # the executed ops of the compiled train step
    print(f"trace {files[0].stat().st_size / 1e6:.2f} MB, {len(events)} events")


def run_steps(tmp_path, profile_steps: str, start_step: int, steps: int):
    """The loop's hooks around a small jitted step, as llmjax.loop.fit calls them."""
    f = jax.jit(lambda x: jnp.sin(x @ x))
    tc = ml_collections.ConfigDict(dict(steps=steps, profile_steps=profile_steps))
    x = jnp.ones((64, 64))
    for step in range(start_step, steps):
        profiling.before_step(tc, tmp_path, step + 1, start_step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
            x = f(x)
        profiling.after_step(tc, step + 1, x)
    return profile_files(tmp_path / "tensorboard")


def test_resumed_run_skips_its_compiling_step_and_stops_at_the_last_step(tmp_path):
    """A run resumed after step 3 compiles at step 4: profile_steps=2,9 traces steps 5..8 (the run ends at 8)."""
    files = run_steps(tmp_path, "2,9", start_step=3, steps=8)
    assert len(files) == 1 and profiled_steps(trace_events(files[0])) == [5, 6, 7, 8]


def test_only_process_zero_traces(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert run_steps(tmp_path, "2,3", start_step=0, steps=4) == []


def test_a_trace_started_by_the_caller_does_not_stop_the_run(tmp_path):
    jax.profiler.start_trace(str(tmp_path / "outer"))
    try:
        assert run_steps(tmp_path, "2,3", start_step=0, steps=4) == []  # a warning, no second trace, no error
    finally:
        jax.profiler.stop_trace()


@pytest.mark.parametrize("value,parsed", [("", None), ("5", (5, 5)), ("5,8", (5, 8)), (" 5, 8 ", (5, 8)),
                                          ("(5,8)", (5, 8))])
def test_profile_steps_values(value, parsed):
    assert profiling.parse_profile_steps(value) == parsed


@pytest.mark.parametrize("value,expected", [
    ("5,3", "train.profile_steps='5,3' ends before it starts; give the first step, then the last (N <= M), "
            "e.g. --config.train.profile_steps=3,5"),
    ("1,3", "step 1 compiles the train step; start at step 2 or later"),
    ("0", "starts at step 0"),
    ("a,b", "train.profile_steps must be 'N,M' (profile steps N to M), 'N' or '' (off), got 'a,b'"),
    ("2,3,4", "train.profile_steps must be 'N,M'"),
])
def test_bad_profile_steps_is_one_line_naming_the_field_and_the_fix(value, expected):
    cfg = load_config(ROOT / "configs" / "gpt_tiny.py")
    cfg.train.profile_steps = value
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert "--config.train.profile_steps=" in str(e.value)
