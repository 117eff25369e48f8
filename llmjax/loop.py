"""The one training loop, used by pretraining (llmjax.train), fine-tuning (llmjax.finetune) and the comparison
grid (llmjax.compare): the state on the mesh (fresh, from given parameters, or resumed from the newest good
checkpoint), the steps, evaluation, metrics and TensorBoard, checkpoints, preemption and keep-best.

What a kind of run trains differs only in what it passes in: the loss and its weights, the batches, the
evaluation, the parameters it starts from and which of them train (LoRA).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from llmjax import checkpoint as ckpt_lib
from llmjax import metrics as mt
from llmjax import storage
from llmjax import profiling
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.params import flat_values, flatten, set_params, unflatten
from llmjax.state import TrainState, init_state, init_state_abstract, init_state_from
from llmjax.step import global_batch

log = logging.getLogger("llmjax")


def default_train_config() -> ml_collections.ConfigDict:
    """The `train` section, read by the loop and the steps."""
    c = ml_collections.ConfigDict()
    c.steps = 300
    c.batch_size = 16  # global rows per step, all processes together
    c.seq_length = 128  # packed row length (encoder side for encoder-decoder)
    c.micro_batches = 1  # gradient accumulation: the batch is split into this many sequential micro-batches
    c.seed = 0
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 8
    c.num_samples = 3  # sampled continuations printed at evaluation (decoder models)
    c.sample_length = 40
    c.label_smoothing = 0.0
    c.z_loss = 0.0
    c.peak_flops = 0.0  # per device, for MFU; 0 = known accelerator peak or a measured matmul peak on CPU
    c.checkpoint_every = 100  # asynchronous Orbax save every this many steps (and at the end); 0 = only at the end
    c.keep_checkpoints = 3  # the newest K complete checkpoints are kept in WORKDIR/checkpoints; 0 = keep all
    c.data_workers = 0  # Grain worker processes building batches in the background (0 = in this process)
    c.keep_best = False  # also keep the parameters with the lowest validation loss in WORKDIR/best (export layout)
    c.profile_steps = ""  # "N,M": jax.profiler trace of steps N..M (N >= 2) into WORKDIR/tensorboard; "" = off
    return c


# ------------------------------------------------------------------------------------------------ state
@dataclasses.dataclass
class Start:
    """The state a run starts from: fresh or resumed (then `step` > 0 and `data_state` is the iterator's)."""

    graphdef: object
    state: TrainState
    state_sh: TrainState
    step: int = 0
    data_state: dict | None = None
    resumed_from: Path | None = None


def saved_view(state: TrainState, trainable: frozenset[str] | None) -> TrainState:
    """What a checkpoint holds: the whole state, or (LoRA) only the trainable parameters, plus the rest."""
    if trainable is None:
        return state
    params = unflatten({k: v for k, v in flat_values(state.params).items() if k in trainable}, int_keys=False)
    return TrainState(step=state.step, params=params, rest=state.rest, opt_state=state.opt_state)


def start_state(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int, *, checkpoints=None,
                cfg_json: dict | None = None, values: dict | None = None, trainable: frozenset[str] | None = None,
                check: bool = True) -> Start:
    """The sharded state of a run: resumed from the newest good checkpoint in `checkpoints` if there is one,
    else fresh: random (values None) or the parameters `values` ({path: array}) with fresh ones elsewhere.
    With `trainable` (LoRA) checkpoints hold only those parameters and the others come from `values`.
    `check` refuses a checkpoint whose config changes the state's shapes (ConfigError naming the field)."""
    has_checkpoints = checkpoints is not None and bool(checkpoints.steps())
    if values is None:
        if has_checkpoints:
            graphdef, abstract, state_sh = init_state_abstract(model_cfg, tx, mesh, rules, seed)
            found = checkpoints.restore_latest(abstract, state_sh, cfg_json, check=check)
            if found is not None:
                state, data_state, step, _ = found
                return Start(graphdef, state, state_sh, step, data_state, checkpoints.directory / str(step))
        return Start(*init_state(model_cfg, tx, mesh, rules, seed))
    graphdef, state, state_sh = init_state_from(model_cfg, tx, mesh, rules, seed, values)
    if has_checkpoints:
        found = checkpoints.restore_latest(saved_view(state, trainable), saved_view(state_sh, trainable), cfg_json,
                                           check=check)
        if found is not None:
            restored, data_state, step, _ = found
            if trainable is not None:  # the frozen parameters stay those of `values`
                set_params(state.params, flatten(restored.params))
                restored = TrainState(step=restored.step, params=state.params, rest=restored.rest,
                                      opt_state=restored.opt_state)
            return Start(graphdef, restored, state_sh, step, data_state, checkpoints.directory / str(step))
    return Start(graphdef, state, state_sh)


# ------------------------------------------------------------------------------------------------- loop
@dataclasses.dataclass
class Result:
    state: TrainState
    step: int
    train: dict  # the last logged training metrics
    eval: dict  # the last evaluation
    eval_start: dict  # the evaluation before the first step (resumed: the first one in metrics.jsonl, or {})
    preempted: str | None = None  # the signal that stopped the run early, or None
    eval_start_step: int = 0  # the step of eval_start


def fit(step_fn, start: Start, batches: Iterator[dict], tc, mesh, *, first_batch: dict | None = None,
        evaluate: Callable[[TrainState], dict] | None = None, workdir=None, checkpoints=None,
        cfg_json: dict | None = None, trainable: frozenset[str] | None = None,
        data_state: Callable[[int], dict] | None = None, flops_per_step: float | None = None,
        on_eval: Callable[[int, TrainState, dict], dict | None] | None = None, eval_at_start: bool | None = None,
        progress: bool = True, desc: str = "train") -> Result:
    """Run `step_fn` from `start` to tc.steps on the local batches of `batches` (the first one may be given as
    `first_batch`, already drawn). Every tc.log_every steps the metrics are written (WORKDIR/metrics.jsonl and
    TensorBoard, when `workdir` is given). Every tc.eval_every steps `evaluate(state)` runs, then
    `on_eval(step, state, metrics)`, which may return {tag: text} for TensorBoard; with tc.keep_best the best
    parameters go to WORKDIR/best. With `checkpoints` the state is saved every tc.checkpoint_every steps, at
    the end, and when SIGTERM/SIGINT arrives (the loop then stops after the current step); `trainable` (LoRA)
    saves only those parameters. `data_state(step)` is the data position saved with a checkpoint (default:
    the iterator's get_state()). With `flops_per_step` the training metrics include tokens/s and MFU."""
    is_writer = jax.process_index() == 0
    writer = mt.MetricsWriter(workdir, enabled=is_writer) if workdir is not None else None
    write = writer.write if writer is not None else (lambda *a, **k: None)
    step, state = start.step, start.state
    resumed = start.resumed_from is not None
    if resumed and is_writer and workdir is not None:
        drop_metrics_after(workdir, step)  # the steps after the checkpoint are run again
    if data_state is None:
        data_state = lambda _: batches.get_state()  # noqa: E731
    peak = None
    if flops_per_step is not None:
        peak, peak_source = mt.peak_flops_per_device(tc.peak_flops)
        log.info("peak %.3g FLOP/s per device (%s); %.3g FLOPs per step", peak, peak_source, flops_per_step)

    eval_start, eval_start_step, last_eval = {}, step, {}
    if evaluate is not None and (eval_at_start if eval_at_start is not None else not resumed):
        eval_start = last_eval = evaluate(state)
        write(step, eval_start, "eval")
        log.info("step %d: validation %s", step, describe(eval_start))
    elif resumed and workdir is not None:  # the interrupted run's evaluations, for the summary
        earlier = mt.evaluations(mt.read_metrics(workdir))
        if earlier:
            (eval_start_step, eval_start), (_, last_eval) = earlier[0], earlier[-1]
    if resumed and step >= tc.steps:
        log.info("already trained to step %d (train.steps=%d): nothing to do", step, tc.steps)
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and is_writer), desc=desc, unit="step",
               dynamic_ncols=True)
    batch = first_batch if first_batch is not None else (next(batches) if step < tc.steps else None)
    last_train = {}
    window_start, window_steps = time.perf_counter(), 0
    preempted = None
    last_saved = start.resumed_from  # the newest checkpoint known finite: named when a non-finite value stops the run
    best = ckpt_lib.read_best(workdir) if workdir is not None else None  # (step, loss) kept so far, across resumes
    preemption = ckpt_lib.Preemption() if checkpoints is not None else _NoPreemption()
    with preemption:
        try:
            while step < tc.steps:
                profiling.before_step(tc, workdir, step + 1, start.step)  # starts the train.profile_steps trace
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):  # steps in the profile plugin
                    state, m = step_fn(state, global_batch(batch, mesh))
                profiling.after_step(tc, step + 1, (state, m))  # at the window's end: blocks, writes the trace
                step += 1
                window_steps += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    m = {k: float(v) for k, v in m.items()}  # the only host sync: at logging steps
                    step_time = (time.perf_counter() - window_start) / window_steps
                    m["step_time"] = step_time
                    if flops_per_step is not None:
                        m.update(perplexity=float(np.exp(min(m["loss"], 50.0))), tokens_per_sec=m["tokens"] / step_time,
                                 mfu=flops_per_step / step_time / (peak * jax.device_count()))
                        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}")
                    else:  # a task's loss (fine-tuning, probes): rows and labels rather than tokens
                        m.pop("tokens", None)
                        bar.set_postfix({k: f"{v:.3f}" for k, v in m.items() if k.endswith(("loss", "accuracy"))})
                    write(step, m)  # written first (non-finite as null): the row shows what went wrong
                    last_train = m
                    window_start, window_steps = time.perf_counter(), 0
                    _check_finite(step, m, last_saved)
                if evaluate is not None and (step % tc.eval_every == 0 or step == tc.steps):
                    last_eval = evaluate(state)
                    write(step, last_eval, "eval")
                    _check_finite(step, {f"validation {k}": v for k, v in last_eval.items() if k == "loss"},
                                  last_saved)  # before keep-best can save non-finite parameters
                    if (tc.get("keep_best", False) and workdir is not None and last_eval
                            and (best is None or last_eval["loss"] < best[1])):
                        ckpt_lib.save_best(workdir, step, state, last_eval["loss"], cfg_json)
                        best = (step, last_eval["loss"])
                    bar.write(f"step {step}: validation {describe(last_eval)}")
                    texts = on_eval(step, state, last_eval) if on_eval is not None else None
                    for tag, text in (texts or {}).items():
                        if writer is not None:
                            writer.text(step, tag, text)
                    window_start, window_steps = time.perf_counter(), 0  # evaluation time is not training time
                stop = preemption.reached(step)  # every step, on every process (the sync point needs it)
                if checkpoints is not None:
                    checkpoints.check()  # a background save that failed (disk full) stops the run, naming it
                if checkpoints is not None and (
                        stop or step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0)):
                    # Never save a non-finite state: retention would then drop a good checkpoint for it.
                    saved = saved_view(state, trainable)
                    finite, guarded = jax.device_get((_all_finite(saved), {k: m[k] for k in GUARDED if k in m}))
                    _check_finite(step, {"state": 0.0 if finite else math.nan, **guarded}, last_saved)
                    # The iterator has produced exactly `step` batches here: its state resumes at batch step+1.
                    checkpoints.save(step, saved, data_state(step), cfg_json)
                    last_saved = checkpoints.directory / str(step)
                    if writer is not None:
                        writer.flush()  # on a bucket, the rows up to the checkpoint are written with it
                if stop:
                    preempted = preemption.signal or "SIGTERM"
                    break
                if step < tc.steps:
                    batch = next(batches)
        finally:
            if checkpoints is not None:
                checkpoints.close()  # waits until the last asynchronous save is complete (and visible)
            bar.close()
            if writer is not None:
                writer.close()
    if preempted is not None:
        log.warning("preempted (%s) at step %d: saved checkpoint %s; run the same command to resume",
                    preempted, step, checkpoints.directory / str(step))
    return Result(state, step, last_train, last_eval, eval_start, preempted, eval_start_step)


# ------------------------------------------------------------------------------------ non-finite guard
# A NaN/inf loss, gradient norm or state stops the run before it is saved. The check reads values the loop
# syncs anyway: the metrics at logging steps (already floated there) and, at checkpoint steps, the metrics
# plus one all-finite reduction over the saved state (one host sync next to a save that copies the state to
# the host). Other steps add no sync: a NaN between logging steps is caught at the next logging or checkpoint
# step, still before anything non-finite is saved.
class NonFiniteError(ConfigError):
    """Training diverged (a non-finite loss, gradient norm or state): a user error the CLI prints in one line."""


GUARDED = ("loss", "grad_norm")


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _check_finite(step: int, values: dict, last_saved) -> None:
    bad = {k: float(v) for k, v in values.items() if k in (*GUARDED, "state") or k.startswith("validation")}
    bad = {k: v for k, v in bad.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join("the state has NaN/inf values" if k == "state" else f"{k.replace('_', ' ')} is {v}"
                         for k, v in bad.items())
        then = (f"the last good checkpoint is {last_saved}; lower optim.learning_rate or set optim.clip_norm and run "
                "the same command to resume from it" if last_saved is not None else
                "no checkpoint was saved; lower optim.learning_rate or set optim.clip_norm and start again")
        raise NonFiniteError(f"training diverged at step {step}: {what}; stopped before saving it ({then})")


class _NoPreemption:
    """A run without checkpoints (comparison probes) has nothing to save: signals keep their usual effect."""

    signal = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def reached(self, step: int) -> bool:
        return False


def describe(m: dict) -> str:
    """'loss 2.3456, accuracy 0.512[, exact match 0.4][, perplexity 10.43]' of evaluation metrics."""
    parts = [f"loss {m.get('loss', float('nan')):.4f}", f"accuracy {m.get('accuracy', float('nan')):.3f}"]
    if "exact_match" in m:
        parts.append(f"exact match {m['exact_match']:.3f}")
    if "perplexity" in m:
        parts.append(f"perplexity {m['perplexity']:.2f}")
    return ", ".join(parts)


def drop_metrics_after(workdir, step: int) -> None:
    """Resuming from `step` runs the later steps again: drop their rows of the interrupted run from
    metrics.jsonl, so that each step appears once. A torn line (the run was killed mid-write) is dropped."""
    path = storage.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [row for row in mt.parse_rows(path.read_bytes().decode(errors="replace"), path) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in keep))  # torn lines dropped (with a warning)


def check_resumable(checkpoints, info_file: Path, key: str, value) -> None:
    """Refuse to resume a workdir whose checkpoints were made for another setup (info_file's `key` differs)."""
    if checkpoints.steps() and info_file.is_file() and json.loads(info_file.read_text()).get(key) != value:
        raise ConfigError(f"{info_file.parent} holds checkpoints of a different setup; use a new --workdir")


def model_of(graphdef, state: TrainState):
    """The model of a state (a copy: the state's arrays stay valid for the next donated step)."""
    return nnx.merge(graphdef, state.params, state.rest, copy=True)
