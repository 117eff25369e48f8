"""The train state and the optimizer: TrainState, the Optax optimizer from the `optim` config section, and
the state initialised directly sharded on a mesh (or abstractly, as the target a checkpoint restores into)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import sharding as shd
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.transformer import build_model
from llmjax.params import build_with_params, is_scanned_path, key_name, path_str


# ----------------------------------------------------------------------------------------------- config
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
        name = path_str(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        is_embedding = name.endswith("embedding")
        is_vector = value.ndim - is_scanned_path(name) < 2  # a scanned stack's leading axis counts no layer dim
        ok = True
        if is_embedding and not c.decay_embeddings:
            ok = False
        if is_vector and not c.decay_norms_and_biases:
            ok = False
        return var.replace(ok) if isinstance(var, nnx.Variable) else ok

    return jax.tree.map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(c, total_steps: int, trainable: frozenset[str] | None = None) -> optax.GradientTransformation:
    """The optimizer of the `optim` section; with `trainable` (parameter paths, LoRA fine-tuning) only those
    parameters are updated and get optimizer state, every other update is exactly zero."""
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
    tx = optax.chain(*parts)
    return tx if trainable is None else only_trainable(tx, trainable)


def only_trainable(tx: optax.GradientTransformation, trainable: frozenset[str]) -> optax.GradientTransformation:
    """Run `tx` on the parameters named in `trainable` only (its state, clipping norm and weight decay see
    nothing else); every other parameter gets an update of exactly zero and has no optimizer state."""
    pick = lambda tree: tree.filter(lambda path, _: path_str(path) in trainable)  # noqa: E731

    def init(params):
        return tx.init(pick(params))

    def update(updates, state, params=None):
        sub, state = tx.update(pick(updates), state, None if params is None else pick(params))
        return nnx.merge_state(jax.tree.map(jnp.zeros_like, updates), sub), state

    return optax.GradientTransformation(init, update)


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
        keys = tuple(key_name(k) for k in path)
        for n in range(len(keys)):
            cand = keys[n:]
            if cand and cand[-1] == "value":
                cand = cand[:-1]
            if cand in by_shape_path and shapes[cand] == leaf.shape:
                return by_shape_path[cand]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abs_opt)


def init_state_from(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int, values: dict):
    """(graphdef, TrainState, shardings): the parameters `values` ({path: array}) where given, fresh ones (new
    heads, adapters) elsewhere, fresh optimizer state; placed with the shardings of init_state_abstract. The
    random init is compiled for the fresh parameters only (compiling all of it costs seconds)."""
    graphdef, _, state_sh = init_state_abstract(model_cfg, tx, mesh, rules, seed)
    _, params, rest = nnx.split(build_with_params(model_cfg, values, seed), nnx.Param, ...)
    params = jax.device_put(params, state_sh.params)
    rest = jax.device_put(rest, state_sh.rest)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sh.step)
    return graphdef, TrainState(step=step, params=params, rest=rest, opt_state=opt_state), state_sh


def replicated_state(model, tx, mesh):
    """(graphdef, TrainState, shardings) of an existing model's parameters, replicated on `mesh` (the small
    models of a comparison's adaptation and probes), with a fresh optimizer state. The arrays are copies:
    the train step donates them and `model` stays valid."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))
    state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    return graphdef, jax.device_put(state, state_sh, may_alias=False), state_sh
