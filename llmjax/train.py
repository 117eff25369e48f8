"""The training step and its pieces: sharded state init, the optimizer, the per-objective loss, micro-batching.

`train_step` is one jit-compiled function (state donated) that runs on 1 CPU device, a simulated mesh,
several processes or a pod alike; everything about placement comes from the mesh and the logical rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import sharding as shd
from llmjax.models import moe
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.transformer import build_model
from llmjax.objectives import losses


# ----------------------------------------------------------------------------------------------- config
def default_train_config() -> ml_collections.ConfigDict:
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
    c.keep_checkpoints = 3  # the newest K complete checkpoints are kept in WORKDIR/checkpoints
    c.data_workers = 0  # Grain worker processes building batches in the background (0 = in this process)
    c.keep_best = False  # also keep the parameters with the lowest validation loss in WORKDIR/best (export layout)
    return c


def default_optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.optimizer = "adamw"  # adamw | adafactor
    c.learning_rate = 1e-3
    c.schedule = "cosine"  # cosine | linear | rsqrt (T5) | constant, each after linear warmup
    c.warmup_steps = 50
    c.min_lr_ratio = 0.1  # cosine / linear end at learning_rate * min_lr_ratio
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1
    c.decay_embeddings = False  # weight decay on token / position embedding tables
    c.decay_norms_and_biases = False
    c.clip_norm = 1.0  # global gradient norm clipping; 0 = off
    return c


# ------------------------------------------------------------------------------------------- optimizer
def learning_rate_schedule(c, total_steps: int):
    warm = int(c.warmup_steps)
    peak = float(c.learning_rate)
    decay_steps = max(total_steps - warm, 1)
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=c.min_lr_ratio)
    elif c.schedule == "linear":
        after = optax.linear_schedule(peak, peak * c.min_lr_ratio, decay_steps)
    elif c.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif c.schedule == "rsqrt":  # T5: lr = peak * sqrt(warmup / step) after warmup
        w = max(warm, 1)
        after = lambda s: peak * jnp.sqrt(w / (s + w))
    else:
        raise ConfigError(f"optim.schedule: unknown schedule {c.schedule!r}; choose cosine, linear, rsqrt or constant")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def decay_mask(params, c):
    """True where weight decay applies: matrices, not (by default) embeddings, norms or biases."""

    def one(path, var):
        name = "/".join(_key_name(k) for k in path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        is_embedding = name.endswith("embedding")
        is_vector = value.ndim < 2
        ok = True
        if is_embedding and not c.decay_embeddings:
            ok = False
        if is_vector and not c.decay_norms_and_biases:
            ok = False
        return var.replace(ok) if isinstance(var, nnx.Variable) else ok

    return jax.tree.map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _key_name(k) -> str:
    """'embedding' from a pytree path entry (DictKey, GetAttrKey, SequenceKey or a plain key)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(c, total_steps)
    parts = []
    if c.clip_norm:
        parts.append(optax.clip_by_global_norm(c.clip_norm))
    if c.optimizer == "adamw":
        parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                                 mask=lambda p: decay_mask(p, c)))
    elif c.optimizer == "adafactor":
        parts.append(optax.adafactor(lr, weight_decay_rate=c.weight_decay or None,
                                     weight_decay_mask=lambda p: decay_mask(p, c)))
    else:
        raise ConfigError(f"optim.optimizer: unknown optimizer {c.optimizer!r}; choose adamw or adafactor")
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------------------ state
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training. A pytree (registered below) so it can be jit-ted and donated."""

    step: jax.Array
    params: Any  # nnx.State of Params
    rest: Any  # nnx.State of everything else in the model (dropout RNG streams)
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "rest", "opt_state"], meta_fields=[])


def _replicated(mesh, tree):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def init_state(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int):
    """Create parameters and optimizer state directly sharded on `mesh` (never whole on one host).

    Returns (graphdef, state, state_shardings)."""
    return _init_state(model_cfg, tx, mesh, rules, seed, abstract_only=False)


def init_state_abstract(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int):
    """Like init_state but allocates nothing: (graphdef, state of ShapeDtypeStructs, state_shardings), the
    target a checkpoint is restored into."""
    return _init_state(model_cfg, tx, mesh, rules, seed, abstract_only=True)


def _init_state(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int, *, abstract_only: bool):
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, seed))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    params_sh = shd.state_shardings(abs_params, mesh, rules)
    rest_sh = _replicated(mesh, abs_rest)

    def make_opt(params):
        return tx.init(params)

    abs_opt = jax.eval_shape(make_opt, abs_params)
    # Optimizer moments mirror their parameter's sharding; scalars (counts) are replicated.
    opt_sh = _opt_shardings(abs_opt, abs_params, params_sh, mesh)
    state_sh = TrainState(step=NamedSharding(mesh, P()), params=params_sh, rest=rest_sh, opt_state=opt_sh)

    @functools.partial(jax.jit, out_shardings=state_sh)
    def init():
        _, params, rest = nnx.split(build_model(model_cfg, seed), nnx.Param, ...)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=make_opt(params))

    if abstract_only:
        return graphdef, jax.eval_shape(init), state_sh
    return graphdef, init(), state_sh


def _opt_shardings(abs_opt, abs_params, params_sh, mesh):
    """Give each optimizer leaf the sharding of the parameter it mirrors (same path suffix and shape)."""
    by_shape_path = {}
    for path, var in nnx.to_flat_state(params_sh):
        by_shape_path[tuple(map(str, path))] = var.get_value()
    shapes = {tuple(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(abs_params)}

    def one(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        for n in range(len(keys)):
            cand = keys[n:]
            if cand and cand[-1] == "value":
                cand = cand[:-1]
            if cand in by_shape_path and shapes[cand] == leaf.shape:
                return by_shape_path[cand]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abs_opt)


# ------------------------------------------------------------------------------------------------- loss
def with_router_losses(loss_fn):
    """loss_fn plus a part "moe" when the model has mixture-of-experts layers (llmjax.models.moe.summarize:
    the weighted router losses, which the train step adds to the objective). make_train_step and
    make_eval_step wrap every loss_fn with it, so task losses (fine-tuning, probes) keep the router losses."""

    def wrapped(model, batch: dict, **kw):
        with moe.collect_stats() as moe_stats:
            total, sums = loss_fn(model, batch, **kw)
        if moe_stats:
            sums = {**sums, "moe": moe.summarize(moe_stats, model.cfg)}
        return total, sums

    return wrapped


def model_loss(model, batch: dict, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
               deterministic: bool = True) -> tuple[jax.Array, dict]:
    """(summed loss, metric sums) of one batch for the model's family; the batch keys are those of
    llmjax.data.packing (see llmjax.data.pipeline). Models with mixture-of-experts layers add a part "moe"
    (see with_router_losses)."""
    return with_router_losses(_family_loss)(model, batch, label_smoothing=label_smoothing, z_loss=z_loss,
                                            deterministic=deterministic)


def _family_loss(model, batch: dict, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 deterministic: bool = True):
    family = model.cfg.family
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    if family == "decoder":
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                       prefix_mask=batch.get("prefix_mask"), deterministic=deterministic)
        sums = {"lm": losses.cross_entropy(logits, batch["targets"], batch["weights"], **kw)}
    elif family == "encoder_decoder":
        logits = model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_segment_ids"],
                       batch["decoder_segment_ids"], batch["encoder_positions"], batch["decoder_positions"],
                       deterministic=deterministic)
        sums = {"lm": losses.cross_entropy(logits, batch["decoder_targets"], batch["decoder_weights"], **kw)}
    else:
        out = model(batch["inputs"], batch["segment_ids"], batch["positions"], batch.get("token_type_ids"),
                    deterministic=deterministic)
        nsp = "nsp_labels" in batch and "nsp_logits" in out
        parts = losses.mlm_nsp_loss(
            out["mlm_logits"], batch["targets"], batch["weights"],
            out["nsp_logits"] if nsp else None, batch["nsp_labels"] if nsp else None,
            batch.get("nsp_weights") if nsp else None, **kw)
        sums = {"lm": parts["mlm"]}
        if nsp:
            sums["nsp"] = parts["nsp"]
    total = sums["lm"].loss
    return total, sums


def _weights_of(batch: dict) -> dict:
    """Total loss weight of each loss part in `batch`: data only, known before the forward pass."""
    w = batch["decoder_weights"] if "decoder_weights" in batch else batch["weights"]
    out = {"lm": jnp.sum(w.astype(jnp.float32))}
    if "nsp_labels" in batch:
        nw = batch.get("nsp_weights")
        out["nsp"] = jnp.sum(nw.astype(jnp.float32)) if nw is not None else jnp.asarray(batch["nsp_labels"].size, jnp.float32)
    return out


def make_train_step(graphdef, tx, state_sh, batch_sh, *, micro_batches: int = 1, label_smoothing=0.0, z_loss=0.0,
                    lr_schedule=None, loss_fn=None, weights_fn=None, rules: dict | None = None):
    """A jitted (state, batch) -> (state, metrics). The loss of every part is its sum divided by the part's
    total weight in the whole global batch (mean over tokens; BERT adds the mean NSP loss). With
    micro_batches > 1 the gradient is accumulated over sequential slices of the batch, giving the same
    result as one step on the full batch.

    loss_fn(model, batch, *, label_smoothing, z_loss, deterministic) -> (total, {part: LossSums}) and
    weights_fn(batch) -> {part: total weight} replace model_loss / the token weights for other tasks
    (fine-tuning heads); a part named "lm" is reported as loss/accuracy/tokens, others as <part>_loss etc.
    `rules` (logical axis -> mesh axis) let modules constrain activations (MoE expert parallelism)."""
    loss_fn = with_router_losses(loss_fn or _family_loss)
    weights_fn = weights_fn or _weights_of
    mesh = jax.tree.leaves(batch_sh)[0].mesh if rules is not None else None

    def grads_of(params, rest, batch, denominators):
        def f(p):
            model = nnx.merge(graphdef, p, rest, copy=True)  # fresh Variables at this trace level
            _, sums = loss_fn(model, batch, label_smoothing=label_smoothing, z_loss=z_loss, deterministic=False)
            objective = sum(sums[k].loss / jnp.maximum(denominators[k], 1e-8) for k in sums if k != "moe")
            if "moe" in sums:  # router losses: the mean over micro-batches of each one's weighted term
                objective = objective + sums["moe"]["objective"] / micro_batches
            return objective, (sums, nnx.state(model, nnx.Not(nnx.Param)))

        (_, (sums, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return sums, new_rest, grads

    def step(state: TrainState, batch):
        with shd.activation_layout(mesh, rules):  # MoE dispatch buffers pinned to the mesh while tracing
            return _step(state, batch)

    def _step(state: TrainState, batch):
        denominators = weights_fn(batch)
        if micro_batches == 1:
            sums, rest, grads = grads_of(state.params, state.rest, batch, denominators)
        else:
            split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

            def body(carry, micro):
                acc_sums, acc_grads, rest = carry
                sums, rest, grads = grads_of(state.params, rest, micro, denominators)
                return (jax.tree.map(jnp.add, acc_sums, sums), jax.tree.map(jnp.add, acc_grads, grads), rest), None

            first = jax.tree.map(lambda x: x[0], split)
            shapes = jax.eval_shape(lambda: grads_of(state.params, state.rest, first, denominators))
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
            (sums, grads, rest), _ = jax.lax.scan(body, (zeros(shapes[0]), zeros(shapes[2]), state.rest), split)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        metrics = {k: v for k, v in _metrics(sums).items()}
        metrics["grad_norm"] = grad_norm
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        return new, metrics

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    return MeshJit(jitted, jax.tree.leaves(batch_sh)[0].mesh)


class MeshJit:
    """A jitted step that is traced, compiled and run under its mesh (jax.set_mesh): activations keep their
    batch sharding (layers.shard_batch) and the TPU splash kernel runs per shard, as `llmjax compile` checks."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def _metrics(sums: dict) -> dict:
    """Means of summed LossSums: part "lm" -> loss/accuracy/tokens, any other part p -> p_loss/p_accuracy;
    "moe" -> moe_aux_loss, moe_z_loss, moe_dropped_fraction and moe_load_<i> (fraction of assignments)."""
    out = {}
    for name, part in sums.items():
        if name == "moe":
            n = jnp.maximum(part["count"], 1.0)
            out["moe_aux_loss"] = part["aux_loss"] / n
            out["moe_z_loss"] = part["z_loss"] / n
            out["moe_dropped_fraction"] = part["dropped"] / jnp.maximum(part["routed"], 1.0)
            for i in range(part["load"].shape[0]):
                out[f"moe_load_{i}"] = part["load"][i] / n
            continue
        w = jnp.maximum(part.weight, 1e-8)
        prefix = "" if name == "lm" else f"{name}_"
        out[prefix + "loss"] = part.loss / w
        out[prefix + "accuracy"] = part.correct / w
        if name == "lm":
            out["tokens"] = part.weight
    return out


def make_eval_step(graphdef, state_sh, batch_sh, *, loss_fn=None, rules: dict | None = None):
    loss_fn = with_router_losses(loss_fn or _family_loss)
    mesh = jax.tree.leaves(batch_sh)[0].mesh if rules is not None else None

    def step(state: TrainState, batch):
        model = nnx.merge(graphdef, state.params, state.rest, copy=True)
        with shd.activation_layout(mesh, rules):
            _, sums = loss_fn(model, batch, deterministic=True)
        return sums  # summed, so several eval batches add up exactly

    return MeshJit(jax.jit(step, in_shardings=(state_sh, batch_sh)), jax.tree.leaves(batch_sh)[0].mesh)


def global_batch(local: dict, mesh, process_count: int | None = None) -> dict:
    """Per-process numpy rows -> global jax.Arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def batch_shardings(mesh, example: dict) -> dict:
    return {k: shd.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}


# ------------------------------------------------------------------------------------------------- loop
SAMPLE_PROMPTS = ("The ", "def ", "Return the ")


def objective_config_for(cfg) -> dict:
    """The objective's config fields: its `objective_args` plus the row length from train.seq_length."""
    args = dict(cfg.objective_args.to_dict()) if cfg.get("objective_args") else {}
    length_field = "inputs_length" if cfg.objective == "span_corruption" else "max_length"
    args.setdefault(length_field, int(cfg.train.seq_length))
    return args


def check_run_config(cfg, model_cfg: ModelConfig):
    from llmjax.objectives import check_family

    try:
        check_family(cfg.objective, model_cfg.family)
    except ValueError as e:
        raise ConfigError(f"objective / model.family: {e}") from None
    if cfg.data.vocab_size != model_cfg.vocab_size:
        raise ConfigError(
            f"data.vocab_size={cfg.data.vocab_size} differs from model.vocab_size={model_cfg.vocab_size}; "
            "the tokenizer and the embedding table must agree: set both")
    if model_cfg.position == "learned" and cfg.train.seq_length > model_cfg.max_length:
        raise ConfigError(
            f"train.seq_length={cfg.train.seq_length} exceeds model.max_length={model_cfg.max_length}, the size "
            "of the learned position table; raise model.max_length or lower train.seq_length")
    if cfg.train.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {cfg.train.steps}")


def train_and_evaluate(cfg, workdir, *, progress: bool = True) -> dict:
    """The main job: prepare data, build the sharded state, train for train.steps, evaluate, log, plot.
    Returns the last train and eval metrics."""
    import logging
    import sys
    import time
    from pathlib import Path

    from tqdm import tqdm

    from llmjax import checkpoint as ckpt_lib
    from llmjax import metrics as mt
    from llmjax.data import pipeline
    from llmjax.data.prepare import prepare
    from llmjax.data.shards import TOKENIZER_FILE
    from llmjax.data.tokenizer import Tokenizer
    from llmjax.models.flops import train_flops

    log = logging.getLogger("llmjax")
    workdir = Path(workdir)
    model_cfg = ModelConfig.from_dict(cfg.model)
    check_run_config(cfg, model_cfg)
    is_writer = jax.process_index() == 0
    tc = cfg.train
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)

    if jax.process_count() > 1 and not is_writer:
        # Process 0 prepares first; the others then find its result on a shared filesystem (or, on hosts
        # with their own disks, prepare their own identical copy).
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llmjax_prepare")
    manifest = prepare(cfg.data, workdir, progress=progress and is_writer)
    if jax.process_count() > 1 and is_writer:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llmjax_prepare")
    data_dir = Path(manifest["dir"])
    tokenizer = Tokenizer.load(data_dir / TOKENIZER_FILE)
    if is_writer and not (workdir / TOKENIZER_FILE).exists():  # the run's tokenizer travels with it (export)
        shutil.copyfile(data_dir / TOKENIZER_FILE, workdir / TOKENIZER_FILE)

    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_dict(cfg.sharding.rules)
    shd.validate_layout(model_cfg, mesh, tc.batch_size, tc.micro_batches)
    tx = make_optimizer(cfg.optim, tc.steps)
    lr_schedule = learning_rate_schedule(cfg.optim, tc.steps)
    # Resume from the newest good checkpoint (restored straight onto this mesh), or start afresh.
    import json

    cfg_json = json.loads(cfg.to_json_best_effort())
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=tc.keep_checkpoints)
    resumed = None
    if checkpoints.steps():
        graphdef, abstract_state, state_sh = init_state_abstract(model_cfg, tx, mesh, rules, tc.seed)
        resumed = checkpoints.restore_latest(abstract_state, state_sh, cfg_json)
    if resumed is None:
        graphdef, state, state_sh = init_state(model_cfg, tx, mesh, rules, tc.seed)
        start_step = 0
    else:
        state, data_state, start_step, _ = resumed
        log.info("resuming from checkpoint %s at step %d", checkpoints.directory / str(start_step), start_step)
    if is_writer:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
        (workdir / "command.txt").write_text(" ".join(sys.argv) + "\n")
        if resumed is not None:
            _drop_metrics_after(workdir, start_step)  # the steps after the checkpoint are run again
    if is_writer:
        abstract = nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, tc.seed)), nnx.Param)
        (workdir / "sharding.txt").write_text(
            f"mesh {dict(mesh.shape)}\n" + shd.describe(abstract, state_sh.params) + "\n")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log.info("model: %s family, %.2fM parameters; mesh %s", model_cfg.family, n_params / 1e6, dict(mesh.shape))

    obj_args = objective_config_for(cfg)
    train_it = pipeline.make_train_iterator(
        data_dir, cfg.objective, global_batch_size=tc.batch_size, seed=tc.seed, family=model_cfg.family,
        objective_config=obj_args, num_workers=int(tc.get("data_workers", 0)))
    if resumed is not None:
        try:
            train_it.set_state(data_state)
        except ValueError as e:
            raise ConfigError(f"cannot resume from {checkpoints.directory / str(start_step)}: {e} (train.batch_size, "
                              "train.seed and the data must stay as they were)") from None
    first = next(train_it)
    batch_sh = batch_shardings(mesh, first)
    step_fn = make_train_step(graphdef, tx, state_sh, batch_sh, micro_batches=tc.micro_batches,
                              label_smoothing=tc.label_smoothing, z_loss=tc.z_loss, lr_schedule=lr_schedule,
                              rules=rules)
    eval_fn = make_eval_step(graphdef, state_sh, batch_sh, rules=rules)
    eval_batches_count = [None]

    def evaluate() -> dict:
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
        return {k: float(v) for k, v in _metrics(total).items()} if total is not None else {}

    # FLOPs of one step: every row is a full packed example of the configured lengths.
    lengths = {k: v.shape[1] for k, v in first.items() if v.ndim == 2}
    enc_len = lengths.get("encoder_inputs", lengths.get("inputs"))
    flops_per_step = tc.batch_size * train_flops(model_cfg, enc_len, lengths.get("decoder_inputs"))
    peak, peak_source = mt.peak_flops_per_device(tc.peak_flops)
    log.info("peak %.3g FLOP/s per device (%s); %.3g FLOPs per step", peak, peak_source, flops_per_step)
    writer = mt.MetricsWriter(workdir, enabled=is_writer)

    if resumed is None:
        start_eval = evaluate()
        writer.write(0, start_eval, "eval")
        log.info("step 0: validation loss %.4f", start_eval.get("loss", float("nan")))
    else:
        start_eval = {}
        if start_step >= tc.steps:
            log.info("already trained to step %d (train.steps=%d): nothing to do", start_step, tc.steps)
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and is_writer), desc="train", unit="step",
               dynamic_ncols=True)
    batch = first
    last_train, last_eval = {}, start_eval
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    preempted = None
    best = ckpt_lib.read_best(workdir)  # (step, validation loss) kept so far, across resumes
    with ckpt_lib.Preemption() as preemption:
        try:
            while step < tc.steps:
                state, m = step_fn(state, global_batch(batch, mesh))
                step += 1
                window_steps += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    m = {k: float(v) for k, v in m.items()}  # the only host sync: at logging steps
                    step_time = (time.perf_counter() - window_start) / window_steps
                    m.update(
                        perplexity=float(np.exp(min(m["loss"], 50.0))), step_time=step_time,
                        tokens_per_sec=m["tokens"] / step_time,
                        mfu=flops_per_step / step_time / (peak * jax.device_count()),
                    )
                    writer.write(step, m)
                    last_train = m
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if step % tc.eval_every == 0 or step == tc.steps:
                    last_eval = evaluate()
                    writer.write(step, last_eval, "eval")
                    if tc.get("keep_best", False) and last_eval and (best is None or last_eval["loss"] < best[1]):
                        ckpt_lib.save_best(workdir, step, state, last_eval["loss"], cfg_json)
                        best = (step, last_eval["loss"])
                    bar.write(f"step {step}: validation loss {last_eval['loss']:.4f} "
                              f"(accuracy {last_eval['accuracy']:.3f})")
                    if model_cfg.family == "decoder" and tc.num_samples:
                        samples = sample_texts(graphdef, state, tokenizer, tc)
                        writer.text(step, "samples", "\n\n".join(samples))
                    window_start, window_steps = time.perf_counter(), 0  # evaluation time is not training time
                stop = preemption.reached(step)  # every step, on every process (the sync point needs it)
                if stop or step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                    # The iterator has produced exactly `step` batches here: its state resumes at batch step+1.
                    checkpoints.save(step, state, train_it.get_state(), cfg_json)
                if stop:
                    preempted = step
                    break
                if step < tc.steps:
                    batch = next(train_it)
        finally:
            checkpoints.close()  # waits until the last asynchronous save is complete (and visible)
    bar.close()
    train_it.close() if hasattr(train_it, "close") else None
    if preempted is not None:
        log.warning("preempted (%s) at step %d: saved checkpoint %s; run the same command to resume",
                    preemption.signal or "SIGTERM", step, checkpoints.directory / str(step))
        writer.close()
        return {"train": last_train, "eval": last_eval, "eval_start": start_eval, "preempted_at": step}
    if is_writer:
        png = mt.plot_losses(workdir)
        log.info("wrote %s", png)
    if model_cfg.family == "decoder" and tc.num_samples and is_writer:
        print("\nsamples:")
        for s in sample_texts(graphdef, state, tokenizer, tc):
            print("  " + repr(s))
    print(f"validation loss: {start_eval.get('loss', float('nan')):.4f} at step {start_step} -> "
          f"{last_eval.get('loss', float('nan')):.4f} at step {step}")
    writer.close()
    return {"train": last_train, "eval": last_eval, "eval_start": start_eval}


def _drop_metrics_after(workdir, step: int) -> None:
    """Resuming from `step` runs the later steps again: drop their rows of the interrupted run from
    metrics.jsonl, so that each step appears once."""
    import json
    from pathlib import Path

    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def sample_texts(graphdef, state, tokenizer, tc) -> list[str]:
    """A few sampled continuations of fixed prompts (temperature 0.8, top-k 40)."""
    from llmjax.generate import generate

    model = nnx.merge(graphdef, state.params, state.rest, copy=True)
    prompts = [[tokenizer.special_ids.bos] + tokenizer.encode(p) for p in SAMPLE_PROMPTS[: tc.num_samples]]
    out = generate(model, prompts, max_new_tokens=tc.sample_length, method="sample", temperature=0.8, top_k=40,
                   seed=tc.seed)
    return [p + tokenizer.decode(t) for p, t in zip(SAMPLE_PROMPTS, out.tokens)]
