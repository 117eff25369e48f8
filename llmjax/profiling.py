"""Profiles of chosen training steps: `--config.train.profile_steps=N,M` records a jax.profiler trace of steps N
to M (1-based, as the `step` of metrics.jsonl) into WORKDIR/tensorboard, the directory of the run's TensorBoard
scalars: `tensorboard --logdir WORKDIR/tensorboard` (with the profile plugin, `pip install xprof`) shows it in the
Profile tab, or XProf reads WORKDIR/tensorboard directly. JAX writes the trace itself (no plugin needed to write
it), as plugins/profile/<date_time>/<host>.xplane.pb (and <host>.trace.json.gz), on CPU, GPU and TPU alike.

How (as MaxText and Levanter do it): the trace starts just before step N, after the step that compiles the train
step (a run's first step: step 1, or the first step after a resume), so it holds steady-state steps; every step
is annotated `jax.profiler.StepTraceAnnotation("train", step_num=step)`, which the profile plugin uses to split
the timeline into steps (step-time breakdown, per-step overview); after step M the outputs are blocked on
(jax.block_until_ready) so that the trace holds the device work of the profiled steps, not just their dispatch,
and then the trace is written. The compiled train step is named `jit_train_step` (llmjax.step), the
evaluation step `jit_eval_step`.

Only process 0 records (as MetricsWriter, which alone writes WORKDIR/tensorboard): every process runs the same SPMD
program, so one host's trace shows the step; N hosts writing into one shared (or bucket) directory would each
make their own <date_time> run folder, and tracing costs every host memory and time at the end of the window.
"""

from __future__ import annotations

import atexit
import logging

import jax

from llmjax.metrics import tensorboard_dir

log = logging.getLogger("llmjax")

FIELD = "train.profile_steps"
EXAMPLE = "--config.train.profile_steps=5,8"


def parse_profile_steps(value) -> tuple[int, int] | None:
    """'' (off) -> None; 'N' -> (N, N); 'N,M' -> (N, M), steps N to M inclusive. A bad value raises ValueError
    with a one-line message naming the field and the fix."""
    if value is None:
        return None
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    text = text.strip().strip("()[]'\"").replace(" ", "")
    if not text:
        return None
    parts = text.split(",")
    if len(parts) == 1:
        parts = parts * 2
    try:
        first, last = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        first = last = None
    if first is None:
        raise ValueError(f"{FIELD} must be 'N,M' (profile steps N to M), 'N' or '' (off), got {value!r}; "
                         f"e.g. {EXAMPLE}")
    if first < 2:
        raise ValueError(f"{FIELD}={value!r} starts at step {first}, but step 1 compiles the train step; start at "
                         f"step 2 or later, e.g. {EXAMPLE}")
    if last < first:
        raise ValueError(f"{FIELD}={value!r} ends before it starts; give the first step, then the last "
                         f"(N <= M), e.g. --config.train.profile_steps={last},{first}")
    return first, last


class _Active:
    """The trace being recorded (the profiler records one trace at a time, process-wide)."""

    log_dir: str | None = None
    last: int = 0
    exit_hook: bool = False


def before_step(tc, workdir, step: int, start_step: int) -> None:
    """Called by the training loop before running step `step` (1-based) of a run that started after step
    `start_step` (0, or the resumed checkpoint's step): starts the trace at the first profiled step, skipping
    the run's compiling first step. Does nothing without train.profile_steps, a workdir, or off process 0."""
    steps = parse_profile_steps(tc.get("profile_steps", ""))
    if steps is None or workdir is None or jax.process_index() != 0:
        return
    first, last = steps
    compiles = start_step + 1  # the run's first step compiles the train step: never traced
    begin = max(first, compiles + 1)
    if step != begin or begin > last:
        if step == compiles and first <= compiles <= last:
            log.info("%s: step %d compiles the train step (the run's first step): not profiled", FIELD, step)
        return
    if _Active.log_dir is not None:  # left running by an interrupted earlier run in this process
        _stop()
    if not _Active.exit_hook:  # registered with the first trace, not at import
        atexit.register(_stop_at_exit)
        _Active.exit_hook = True
    try:
        jax.profiler.start_trace(tensorboard_dir(workdir))
    except RuntimeError as e:  # e.g. a trace started by the caller: a profile never stops the run
        log.warning("%s: not profiling: %s", FIELD, e)
        return
    _Active.log_dir, _Active.last = tensorboard_dir(workdir), last
    log.info("profiling steps %d to %d into %s", begin, min(last, tc.steps), _Active.log_dir)


def after_step(tc, step: int, outputs) -> None:
    """Called by the training loop after dispatching step `step` with its `outputs`: after the last profiled
    step (or the run's last step, if earlier) waits for the outputs, so that the device work is in the trace,
    then writes the trace."""
    if _Active.log_dir is None or (step < _Active.last and step < tc.steps):
        return
    jax.block_until_ready(outputs)
    _stop()


def _stop() -> None:
    log_dir, _Active.log_dir = _Active.log_dir, None
    try:
        jax.profiler.stop_trace()
    except Exception as e:  # writing it failed (e.g. a full disk): the run goes on without it
        log.warning("%s: could not write the profile to %s: %s", FIELD, log_dir, e)
        return
    log.info("wrote the profile to %s/plugins/profile (view: tensorboard --logdir %s, Profile tab)", log_dir,
             log_dir)


def _stop_at_exit() -> None:
    """A run stopped inside the window (preemption, an error) still writes what was traced at exit."""
    if _Active.log_dir is not None:
        _stop()
