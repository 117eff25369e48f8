"""Pretraining: `train_and_evaluate(cfg, workdir)` prepares the data, builds the sharded state (or resumes it)
and runs the training loop (llmjax.loop) with the objective's loss; the workdir gets config.json,
command.txt, sharding.txt, metrics.jsonl, TensorBoard events, checkpoints/ and loss.png."""

from __future__ import annotations

import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import checkpoint as ckpt_lib
from llmjax import loop
from llmjax import metrics as mt
from llmjax import sharding as shd
from llmjax import storage
from llmjax.data import pipeline
from llmjax.data.prepare import prepare
from llmjax.data.shards import TOKENIZER_FILE
from llmjax.data.tokenizer import Tokenizer
from llmjax.data.vocab import SpecialIds
from llmjax.generate import generate
from llmjax.loop import model_of
from llmjax.config import check_train_config, objective_config_for
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.flops import train_flops
from llmjax.models.transformer import build_model
from llmjax.objectives import check_family, make_objective
from llmjax.objectives.loss import objective_loss
from llmjax.params import ParamsMismatch, fitted, flat_values
from llmjax.runs import load_pretrained
from llmjax.state import learning_rate_schedule, make_optimizer
from llmjax.step import batch_shardings, global_batch, make_eval_step, make_train_step, metrics_of
from llmjax.workdir import lock_workdir

log = logging.getLogger("llmjax")
SAMPLE_PROMPTS = ("The ", "def ", "Return the ")


def check_run_config(cfg, model_cfg: ModelConfig):
    try:
        check_family(cfg.objective, model_cfg.family)
    except ValueError as e:
        raise ConfigError(f"objective / model.family: {e}") from None
    try:  # built once here so that a bad objective_args field is one clear error before data preparation
        make_objective(cfg.objective, SpecialIds(cfg.data.vocab_size, cfg.data.num_sentinels), model_cfg.family,
                       **objective_config_for(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"objective_args ({cfg.objective}): {e}") from None
    if cfg.data.vocab_size != model_cfg.vocab_size:
        raise ConfigError(
            f"data.vocab_size={cfg.data.vocab_size} differs from model.vocab_size={model_cfg.vocab_size}; "
            "the tokenizer and the embedding table must agree: set both")
    if model_cfg.position == "learned" and cfg.train.seq_length > model_cfg.max_length:
        raise ConfigError(
            f"train.seq_length={cfg.train.seq_length} exceeds model.max_length={model_cfg.max_length}, the size "
            "of the learned position table; raise model.max_length or lower train.seq_length")
    check_train_config(cfg)  # every number of the train and optim sections, before data preparation


def train_and_evaluate(cfg, workdir, *, progress: bool = True, init_from=None) -> dict:
    """The main job: prepare data, build the sharded state, train for train.steps, evaluate, log, plot.
    Returns the last train and eval metrics. `init_from` (a training workdir or export directory) gives a new
    run its initial parameters; a run that resumes ignores it."""
    workdir = storage.path(workdir)  # a local directory or a gs:// URL
    model_cfg = ModelConfig.from_dict(cfg.model)
    check_run_config(cfg, model_cfg)
    # The mesh against the devices and the batch against the mesh, before the lock and the data preparation.
    mesh = shd.make_mesh(cfg.mesh)
    shd.validate_layout(model_cfg, mesh, cfg.train.batch_size, cfg.train.micro_batches, cfg.train.seq_length)
    initial = None
    if init_from is not None and ckpt_lib.Checkpoints(workdir).steps():
        log.info("%s has checkpoints: resuming them; --init-from %s is not used", workdir, init_from)
    elif init_from is not None:  # the source's parameters must fit the model, checked before anything is written
        initial = (init_from, *initial_params(init_from, model_cfg, cfg.train.seed))
    with lock_workdir(workdir):  # one run per workdir: a second one is refused here, before it writes anything
        return _train_and_evaluate(cfg, workdir, model_cfg, mesh, progress=progress, initial=initial)


def initial_params(init_from, model_cfg: ModelConfig, seed: int) -> tuple[dict, object]:
    """({path: array} in model_cfg's layer layout, the source's tokenizer file or None) of --init-from: every
    parameter of the model, with its shape (a LoRA run's adapters are merged; the layer layout converts)."""
    try:
        values, _, tokenizer, described = load_pretrained(init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"--init-from: {e}") from None
    expected = flat_values(nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, seed)), nnx.Param))
    try:
        values = fitted(expected, values)  # the layer layout converts
    except ParamsMismatch as e:
        raise ConfigError(f"--init-from {init_from}: its parameters do not fit this run's model ({e}); the model "
                          "section must describe the same model (only model.scan_layers and settings that change "
                          "no parameter may differ)") from None
    log.info("initial parameters from %s", described)
    return values, tokenizer


def check_resume_tokenizer(workdir, data_dir, checkpoint) -> None:
    """Refuse to resume a run whose data now has another tokenizer than the one it was trained with (kept in the
    workdir): the same ids would mean other pieces, e.g. after a data setting changed, or with data prepared by
    an llmjax that reserves other ids (ids 7-9 became UL2's mode tokens in tokenizer trainer version 2)."""
    kept = workdir / TOKENIZER_FILE
    if kept.exists() and kept.read_bytes() != (data_dir / TOKENIZER_FILE).read_bytes():
        raise ConfigError(f"cannot resume from {checkpoint}: the run was trained with the tokenizer {kept} but its "
                          f"data {data_dir} has another one (a data setting changed, or the data was prepared by "
                          "another llmjax version); resume with the run's data settings or start a new workdir")


def _train_and_evaluate(cfg, workdir, model_cfg: ModelConfig, mesh, *, progress: bool, initial=None) -> dict:
    is_writer = jax.process_index() == 0
    tc = cfg.train
    cfg_json = json.loads(cfg.to_json_best_effort())
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=tc.keep_checkpoints)
    finished = finished_summary(checkpoints, cfg_json, workdir, tc.steps)
    if finished is not None:  # the same command again after the run ended: say so, change nothing
        return finished
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)

    # Process 0 prepares first; the others then find its result on a shared filesystem (or, on hosts with their
    # own disks, prepare their own identical copy).
    if not is_writer:
        shd.sync("llmjax_prepare")
    manifest = prepare(cfg.data, workdir, progress=progress and is_writer)
    if is_writer:
        shd.sync("llmjax_prepare")
    data_dir = storage.path(manifest["dir"])
    tokenizer = Tokenizer.load(data_dir / TOKENIZER_FILE)
    init_from, values, source_tokenizer = initial or (None, None, None)
    if source_tokenizer is not None and storage.path(source_tokenizer).read_bytes() != \
            (data_dir / TOKENIZER_FILE).read_bytes():
        raise ConfigError(f"--init-from {init_from} was trained with another tokenizer ({source_tokenizer}) than this "
                          f"run's data ({data_dir / TOKENIZER_FILE}); set data.tokenizer_model={source_tokenizer}")
    if is_writer and not (workdir / TOKENIZER_FILE).exists():  # the run's tokenizer travels with it (export)
        (data_dir / TOKENIZER_FILE).copy(workdir / TOKENIZER_FILE)

    rules = shd.rules_dict(cfg.sharding.rules)
    tx = make_optimizer(cfg.optim, tc.steps)
    start = loop.start_state(model_cfg, tx, mesh, rules, tc.seed, checkpoints=checkpoints, cfg_json=cfg_json,
                             values=values)
    if start.resumed_from is not None:
        check_resume_tokenizer(workdir, data_dir, start.resumed_from)
        log.info("resuming from checkpoint %s at step %d", start.resumed_from, start.step)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(start.state.params))
    log.info("model: %s family, %.2fM parameters; mesh %s", model_cfg.family, n_params / 1e6, dict(mesh.shape))

    obj_args = objective_config_for(cfg)
    train_it = pipeline.make_train_iterator(
        data_dir, cfg.objective, global_batch_size=tc.batch_size, seed=tc.seed, family=model_cfg.family,
        objective_config=obj_args, num_workers=int(tc.get("data_workers", 0)))
    if start.data_state is not None:
        try:
            train_it.set_state(start.data_state)
        except ValueError as e:
            train_it.close() if hasattr(train_it, "close") else None
            raise ConfigError(f"cannot resume from {start.resumed_from}: {e} (train.batch_size, train.seed and the "
                              "data must stay as they were)") from None
    # Written once the resume is accepted: a refused one leaves the run's config.json and command.txt as they were.
    if is_writer:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
        (workdir / "command.txt").write_text(" ".join(sys.argv) + "\n")
        abstract = nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, tc.seed)), nnx.Param)
        (workdir / "sharding.txt").write_text(
            f"mesh {dict(mesh.shape)}\n" + shd.describe(abstract, start.state_sh.params) + "\n")
    first = next(train_it)
    batch_sh = batch_shardings(mesh, first)
    loss_fn, weights_fn = objective_loss(cfg.objective)
    step_fn = make_train_step(start.graphdef, tx, start.state_sh, batch_sh, micro_batches=tc.micro_batches,
                              label_smoothing=tc.label_smoothing, z_loss=tc.z_loss,
                              lr_schedule=learning_rate_schedule(cfg.optim, tc.steps), loss_fn=loss_fn,
                              weights_fn=weights_fn, rules=rules)
    eval_fn = make_eval_step(start.graphdef, start.state_sh, batch_sh, loss_fn=loss_fn, rules=rules)
    eval_batches_count = [None]

    def evaluate(state) -> dict:
        it = pipeline.make_eval_iterator(
            data_dir, cfg.objective, global_batch_size=tc.batch_size, num_batches=eval_batches_count[0],
            seed=tc.seed, family=model_cfg.family, objective_config=obj_args)
        eval_batches_count[0] = it.num_batches
        total = None
        for i, b in enumerate(it):
            if i >= tc.eval_batches:
                break
            sums = eval_fn(state, global_batch(b, mesh))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return {k: float(v) for k, v in metrics_of(total).items()} if total is not None else {}

    sampling = model_cfg.family == "decoder" and tc.num_samples

    def on_eval(step, state, _):  # sampled continuations, as TensorBoard text
        if sampling:
            return {"samples": "\n\n".join(sample_texts(start.graphdef, state, tokenizer, tc))}

    # FLOPs of one step: every row is a full packed example of the configured lengths.
    lengths = {k: v.shape[1] for k, v in first.items() if v.ndim == 2}
    enc_len = lengths.get("encoder_inputs", lengths.get("inputs"))
    flops_per_step = tc.batch_size * train_flops(model_cfg, enc_len, lengths.get("decoder_inputs"))
    try:
        result = loop.fit(step_fn, start, train_it, tc, mesh, first_batch=first, evaluate=evaluate, workdir=workdir,
                          checkpoints=checkpoints, cfg_json=cfg_json, flops_per_step=flops_per_step, on_eval=on_eval,
                          progress=progress)
    finally:
        train_it.close() if hasattr(train_it, "close") else None
    summary = {"train": result.train, "eval": result.eval, "eval_start": result.eval_start}
    if result.preempted is not None:
        return {**summary, "preempted_at": result.step}
    if is_writer:
        log.info("wrote %s", mt.plot_losses(workdir))
    if sampling and is_writer:
        print("\nsamples:")
        for s in sample_texts(start.graphdef, result.state, tokenizer, tc):
            print("  " + repr(s))
    print(f"validation loss: {result.eval_start.get('loss', float('nan')):.4f} at step {result.eval_start_step} -> "
          f"{result.eval.get('loss', float('nan')):.4f} at step {result.step}")
    return summary


def finished_summary(checkpoints, cfg_json: dict, workdir, steps: int) -> dict | None:
    """For a workdir whose newest checkpoint is at or past `steps` (its run ended), the run's summary read from
    metrics.jsonl, printed; None otherwise. Nothing is prepared, compiled, measured or written. A config whose
    model or optimizer differs from the checkpoint's is refused as on a resume (ConfigError)."""
    done = checkpoints.steps()
    if not done or done[0] < steps:
        return None
    where = checkpoints.directory / str(done[0])
    try:
        saved = checkpoints.read_config(done[0])
    except (OSError, ValueError):  # unreadable: the resume path reports it (and falls back to an older one)
        return None
    ckpt_lib.check_compatible(saved, cfg_json, str(where))
    rows = mt.read_metrics(workdir)
    evals = mt.evaluations(rows)
    trains = mt.evaluations(rows, "train")
    (s0, e0), (s1, e1) = (evals[0], evals[-1]) if evals else ((0, {}), (done[0], {}))
    print(f"{workdir} is already trained to step {done[0]} (train.steps={steps}); nothing to do. "
          f"validation loss: {e0.get('loss', float('nan')):.4f} at step {s0} -> {e1.get('loss', float('nan')):.4f} "
          f"at step {s1}. To train longer, raise --config.train.steps; to use it: "
          f"llmjax export --workdir {workdir} --out DIR")
    return {"train": trains[-1][1] if trains else {}, "eval": e1, "eval_start": e0, "finished": done[0]}


def sample_texts(graphdef, state, tokenizer, tc) -> list[str]:
    """A few sampled continuations of fixed prompts (temperature 0.8, top-k 40)."""
    model = model_of(graphdef, state)
    prompts = [[tokenizer.special_ids.bos] + tokenizer.encode(p) for p in SAMPLE_PROMPTS[: tc.num_samples]]
    out = generate(model, prompts, max_new_tokens=tc.sample_length, method="sample", temperature=0.8, top_k=40,
                   seed=tc.seed)
    return [p + tokenizer.decode(t) for p, t in zip(SAMPLE_PROMPTS, out.tokens)]
