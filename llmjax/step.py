"""The jitted train and eval steps: (state, batch) -> (state, metrics), and the metrics they report.

`make_train_step` is one jit-compiled function (state donated) that runs on 1 CPU device, a simulated mesh,
several processes or a pod alike; everything about placement comes from the mesh and the logical rules. What
it trains on is a loss function (llmjax.objectives.loss: an objective's, or a fine-tuning task's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llmjax import sharding as shd
from llmjax.models import moe
from llmjax.objectives.loss import family_loss, token_weights
from llmjax.state import TrainState


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
    return with_router_losses(family_loss)(model, batch, label_smoothing=label_smoothing, z_loss=z_loss,
                                            deterministic=deterministic)


# ------------------------------------------------------------------------------------------------ steps
def make_train_step(graphdef, tx, state_sh, batch_sh, *, micro_batches: int = 1, label_smoothing=0.0, z_loss=0.0,
                    lr_schedule=None, loss_fn=None, weights_fn=None, rules: dict | None = None):
    """A jitted (state, batch) -> (state, metrics). The loss of every part is its sum divided by the part's
    total weight in the whole global batch (mean over tokens; BERT adds the mean NSP loss). With
    micro_batches > 1 the gradient is accumulated over sequential slices of the batch, giving the same
    result as one step on the full batch.

    loss_fn(model, batch, *, label_smoothing, z_loss, deterministic) -> (total, {part: LossSums}) and
    weights_fn(batch) -> {part: total weight} replace model_loss / the token weights for other tasks
    (fine-tuning heads); a part named "lm" is reported as loss/accuracy/tokens, others as <part>_loss etc.
    `rules` (logical axis -> mesh axis) let modules see the mesh: MoE expert parallelism, context parallelism
    and the sharded embedding lookup; without them those run as GSPMD places them."""
    loss_fn = with_router_losses(loss_fn or family_loss)
    weights_fn = weights_fn or token_weights
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

    def train_step(state: TrainState, batch):  # the name profiles show: the compiled module is jit_train_step
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
        metrics = {k: v for k, v in metrics_of(sums).items()}
        metrics["grad_norm"] = grad_norm
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        return new, metrics

    jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
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


def metrics_of(sums: dict) -> dict:
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
    loss_fn = with_router_losses(loss_fn or family_loss)
    mesh = jax.tree.leaves(batch_sh)[0].mesh if rules is not None else None

    def eval_step(state: TrainState, batch):  # jit_eval_step in profiles
        model = nnx.merge(graphdef, state.params, state.rest, copy=True)
        with shd.activation_layout(mesh, rules):
            _, sums = loss_fn(model, batch, deterministic=True)
        return sums  # summed, so several eval batches add up exactly

    return MeshJit(jax.jit(eval_step, in_shardings=(state_sh, batch_sh)), jax.tree.leaves(batch_sh)[0].mesh)


def global_batch(local: dict, mesh, process_count: int | None = None) -> dict:
    """Per-process numpy rows -> global jax.Arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def batch_shardings(mesh, example: dict) -> dict:
    return {k: shd.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
