"""Mixture of experts in place of the MLP: softmax router, top-k experts, optional shared expert, capacity or
dropless dispatch, and the load-balancing / z losses collected per layer for the training objective.

Shape letters: B batch, T length, D d_model, E experts, K experts per token, C slots per expert, F expert
hidden size, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmjax import sharding as shd
from llmjax.models.config import ModelConfig
from llmjax.models.layers import MLP, activation_fn, dtype_of, normal_init

# ------------------------------------------------------------------------------------ statistics
# Each MoE layer reports {aux_loss, z_loss, dropped, routed, load[E]} to the innermost open collector. Only
# the loss computation opens one (model_loss); a plain forward pass or decoding records nothing.
_COLLECTOR: contextvars.ContextVar = contextvars.ContextVar("llmjax_moe_stats", default=None)


@contextlib.contextmanager
def collect_stats():
    """Collect the statistics of every MoE layer run inside the block: yields the list they are appended to."""
    records: list[dict] = []
    token = _COLLECTOR.set(records)
    try:
        yield records
    finally:
        _COLLECTOR.reset(token)


def record(stats: dict) -> None:
    records = _COLLECTOR.get()
    if records is not None:
        records.append(stats)


def summarize(records: list[dict], cfg: ModelConfig) -> dict:
    """One forward pass's MoE statistics, as sums that add across micro-batches and eval batches (divide by
    `count`): the weighted objective term, mean aux / z loss over the MoE layers, dropped and routed
    (token, expert) assignments over all layers, and the mean fraction of assignments per expert."""
    n = len(records)
    aux = sum(r["aux_loss"] for r in records) / n
    z = sum(r["z_loss"] for r in records) / n
    return {
        "objective": cfg.moe_aux_loss_weight * aux + cfg.moe_z_loss_weight * z,
        "aux_loss": aux,
        "z_loss": z,
        "dropped": sum(r["dropped"] for r in records),
        "routed": sum(r["routed"] for r in records),
        "load": sum(r["load"] for r in records) / n,
        "count": jnp.ones((), jnp.float32),
    }


def router_stats(logits, probs, top_i, mask, num_experts: int) -> dict:
    """Switch load-balancing loss E * sum_i f_i P_i (f_i: fraction of the token->expert assignments that go to
    expert i, P_i: mean router probability of expert i; 1.0 when both are uniform) and the router z-loss
    mean(logsumexp(logits)^2), over the real tokens (mask)."""
    m = mask.astype(jnp.float32)[..., None]  # [..., 1]
    n = jnp.maximum(jnp.sum(m), 1.0)
    k = top_i.shape[-1]
    assigned = jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32).sum(-2) * m  # [..., E]
    f = jnp.sum(assigned.reshape(-1, num_experts), 0) / (n * k)
    p = jnp.sum((probs * m).reshape(-1, num_experts), 0) / n
    z = jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * m[..., 0]) / n
    return {"aux_loss": num_experts * jnp.sum(f * p), "z_loss": z, "load": f}


def top_k(probs, k: int):
    """jax.lax.top_k over the last axis by k rounds of argmax (ties: lowest index first, as top_k): XLA
    partitions an argmax along sharded batch dimensions, whereas its TopK gathers the whole batch."""
    weights, ids = [], []
    p = probs
    for _ in range(k):
        i = jnp.argmax(p, axis=-1)
        weights.append(jnp.take_along_axis(probs, i[..., None], -1)[..., 0])
        ids.append(i.astype(jnp.int32))
        p = jnp.where(jax.nn.one_hot(i, p.shape[-1], dtype=bool), -jnp.inf, p)
    return jnp.stack(weights, -1), jnp.stack(ids, -1)


# --------------------------------------------------------------------------------------- experts
class ExpertLinear(nnx.Module):
    """E independent [Din, Dout] projections stored as one kernel [E, Din, Dout] (bias [E, Dout])."""

    def __init__(self, num: int, d_in: int, d_out: int, *, axes, use_bias: bool, init_std: float, dtype: str,
                 param_dtype: str, rngs: nnx.Rngs):
        pdt = dtype_of(param_dtype)
        self.dtype = dtype_of(dtype)
        self.kernel = nnx.Param(normal_init(init_std)(rngs.params(), (num, d_in, d_out), pdt), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((num, d_out), pdt), logical_axes=(axes[0], axes[2])) if use_bias else None

    def per_expert(self, x):  # [E, ..., Din] -> [E, ..., Dout]
        w = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("e...i,eio->e...o", x.astype(self.dtype), w)
        if self.bias is not None:
            b = self.bias[...].astype(self.dtype)
            y = y + b.reshape(b.shape[0], *([1] * (y.ndim - 2)), b.shape[1])
        return y

    def grouped(self, x, group_sizes, expert_of_row, kernel=None, bias=None):
        """Rows of x [M, Din] sorted by expert, group_sizes [E] rows each -> [M, Dout] (rows past the groups
        come out 0 apart from the bias, which the caller ignores). `kernel`/`bias` override the stored ones
        (the local shard under expert parallelism)."""
        w = (self.kernel[...] if kernel is None else kernel).astype(self.dtype)
        y = jax.lax.ragged_dot(x.astype(self.dtype), w, group_sizes.astype(jnp.int32))
        b = bias if kernel is not None else (None if self.bias is None else self.bias[...])
        if b is not None:
            y = y + jnp.take(b.astype(self.dtype), jnp.minimum(expert_of_row, b.shape[0] - 1), axis=0)
        return y


class Experts(nnx.Module):
    """E feed-forward networks with the MLP's activation: wo(act(wi x)) or gated wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_init_std: float | None = None):
        e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim
        common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        up = dict(axes=("expert", "embed", "mlp"), init_std=cfg.init_std, **common)
        self.act = activation_fn(cfg.activation)
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = ExpertLinear(e, d, f, **up)
            self.wi_1 = ExpertLinear(e, d, f, **up)
        else:
            self.wi = ExpertLinear(e, d, f, **up)
        self.wo = ExpertLinear(e, f, d, axes=("expert", "mlp", "embed"), init_std=out_init_std or cfg.init_std,
                               **common)

    def linears(self) -> list[ExpertLinear]:
        return [self.wi_0, self.wi_1, self.wo] if self.gated else [self.wi, self.wo]

    def ffn(self, x, apply):
        """apply(linear, x) runs one projection; the activation pattern is the MLP's."""
        if self.gated:
            h = self.act(apply(self.wi_0, x)) * apply(self.wi_1, x)
        else:
            h = self.act(apply(self.wi, x))
        return apply(self.wo, h)


# ------------------------------------------------------------------------------------------ layer
class MoE(nnx.Module):
    """Router + experts (+ shared expert): [B, T, D] -> [B, T, D], recording its router statistics.

    Routing: softmax over E router logits (float32), the top K experts per token, their probabilities as
    gate weights (renormalised to sum 1 with `moe_renormalize`, as Mixtral). Dispatch:
      capacity (moe_capacity_factor > 0): per row, each expert has C = ceil(factor * T * K / E) slots (at
      most T), filled first by the tokens' first choices, then second choices, ..., in token order; the
      assignments that find no slot are dropped (the token keeps its residual and other experts). One-hot
      dispatch / combine einsums over [E, B, C, D] buffers, experts on the `expert` mesh axis.
      dropless (0 / None): assignments sorted by expert and run as grouped matmuls (jax.lax.ragged_dot);
      with an `expert` mesh axis each device runs its own experts on the assignments of its expert group.
    Padding tokens (mask False) take no capacity slot, no expert compute, and no part in the statistics."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_init_std: float | None = None):
        self.cfg = cfg
        self.router = nnx.Param(
            normal_init(cfg.init_std)(rngs.params(), (cfg.d_model, cfg.num_experts), dtype_of(cfg.param_dtype)),
            logical_axes=("embed", None))
        self.experts = Experts(cfg, rngs=rngs, out_init_std=out_init_std)
        self.shared = (MLP(cfg.replace(mlp_dim=cfg.expert_mlp_dim), rngs=rngs, out_init_std=out_init_std)
                       if cfg.moe_shared_expert else None)
        self.jitter_rngs = rngs["dropout"].fork() if cfg.moe_router_jitter > 0 else None

    # ------------------------------------------------------------------------------ routing
    def route(self, x, deterministic: bool = True):
        """x [B, T, D] -> (router logits [B, T, E] float32, probabilities, top-k weights [B, T, K], ids)."""
        c = self.cfg
        xr = x.astype(jnp.float32)
        if self.jitter_rngs is not None and not deterministic:
            j = c.moe_router_jitter
            xr = xr * jax.random.uniform(self.jitter_rngs(), xr.shape, jnp.float32, 1.0 - j, 1.0 + j)
        logits = xr @ self.router[...].astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_w, top_i = top_k(probs, c.experts_per_token)
        if c.moe_renormalize:
            top_w = top_w / jnp.sum(top_w, -1, keepdims=True)
        return logits, probs, top_w, top_i

    def capacity(self, length: int) -> int:
        c = self.cfg
        return max(1, min(length, math.ceil(c.moe_capacity_factor * length * c.experts_per_token / c.num_experts)))

    def __call__(self, x, mask=None, *, deterministic: bool = True):
        c = self.cfg
        if mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        mask = mask.astype(bool)
        logits, probs, top_w, top_i = self.route(x, deterministic)
        stats = router_stats(logits, probs, top_i, mask, c.num_experts)
        if c.moe_capacity_factor:
            y, dropped = self._capacity_dispatch(x, mask, top_w, top_i)
        else:
            y, dropped = self._dropless_dispatch(x, mask, top_w, top_i), jnp.zeros((), jnp.float32)
        stats["dropped"] = dropped
        stats["routed"] = jnp.sum(mask.astype(jnp.float32)) * c.experts_per_token
        record(stats)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.astype(x.dtype)

    # ----------------------------------------------------------------------------- capacity
    def slots(self, mask, top_i):
        """Slot of every assignment in its expert's buffer and whether it got one: ([B, T, K] int, [B, T, K]
        bool), priority first choices before second choices, then token order."""
        b, t, k = top_i.shape
        onehot = jax.nn.one_hot(top_i, self.cfg.num_experts, dtype=jnp.int32) * mask[..., None, None]  # [B,T,K,E]
        by_choice = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, -1)  # choice-major priority
        position = (jnp.cumsum(by_choice, axis=1) - 1).reshape(b, k, t, -1).transpose(0, 2, 1, 3)
        slot = jnp.sum(position * onehot, -1)  # [B, T, K]
        keep = (slot < self.capacity(t)) & mask[..., None]
        return slot, keep

    def _capacity_dispatch(self, x, mask, top_w, top_i):
        c = self.cfg
        cap = self.capacity(x.shape[1])
        slot, keep = self.slots(mask, top_i)
        dt = x.dtype
        expert_1h = jax.nn.one_hot(top_i, c.num_experts, dtype=dt) * keep[..., None].astype(dt)  # [B,T,K,E]
        slot_1h = jax.nn.one_hot(slot, cap, dtype=dt)  # [B, T, K, C]
        dispatch = jnp.einsum("btke,btkc->btec", expert_1h, slot_1h)  # [B, T, E, C] 0/1
        combine = jnp.einsum("btke,btkc->btec", expert_1h * top_w[..., None].astype(dt), slot_1h)
        by_rows, by_experts = (None, "batch", None, None), ("expert", "batch", None, None)
        # Dispatch where the rows live, then move each expert's slots to its device: an all-to-all over the
        # `expert` mesh axis (and back after the experts), rather than gathering every row on every device.
        expert_in = shd.constrain(jnp.einsum("btec,btd->ebcd", dispatch, x), by_rows)  # [E, B, C, D]
        expert_in = shd.constrain(expert_in, by_experts)
        out = self.experts.ffn(expert_in, lambda lin, h: shd.constrain(lin.per_expert(h), by_experts))
        out = shd.constrain(out, by_rows)
        y = shd.constrain(jnp.einsum("ebcd,btec->btd", out, combine), ("batch", None, None))
        dropped = jnp.sum(mask[..., None] & ~keep).astype(jnp.float32)
        return y, dropped

    # ----------------------------------------------------------------------------- dropless
    def _dropless_dispatch(self, x, mask, top_w, top_i):
        layout = shd.current_layout()
        if layout is not None and layout[0].shape["expert"] > 1:
            return self._dropless_expert_parallel(x, mask, top_w, top_i, *layout)
        b, t, d = x.shape
        kernels = [(lin.kernel[...], None if lin.bias is None else lin.bias[...]) for lin in self.experts.linears()]
        y = self._grouped_ffn(x.reshape(b * t, d), mask.reshape(-1), top_w.reshape(b * t, -1),
                              top_i.reshape(b * t, -1), kernels, first_expert=0)
        return y.reshape(b, t, d)

    def _grouped_ffn(self, x, mask, top_w, top_i, kernels, *, first_expert):
        """Tokens x [N, D] through the experts first_expert .. first_expert + len(kernel) - 1 that they chose:
        assignments sorted by expert, grouped matmuls, weighted sum back per token -> [N, D]. Assignments to
        other experts (and padding) are sorted past the last group, computed as nothing and weighted 0."""
        n, k = top_i.shape
        local = kernels[0][0].shape[0]
        e = top_i.reshape(-1) - first_expert  # [N*K]
        valid = (e >= 0) & (e < local) & jnp.repeat(mask, k)
        e = jnp.where(valid, e, local)
        order = jnp.argsort(e, stable=True)
        group_sizes = jnp.zeros((local + 1,), jnp.int32).at[e].add(1)[:local]
        rows = x[order // k]  # [N*K, D], grouped by expert
        e_sorted = e[order]
        weights_of = {id(lin): kb for lin, kb in zip(self.experts.linears(), kernels)}  # (kernel, bias) per layer
        out = self.experts.ffn(rows, lambda lin, h: lin.grouped(h, group_sizes, e_sorted, *weights_of[id(lin)]))
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        out = out[inverse].reshape(n, k, -1)
        w = jnp.where(valid.reshape(n, k), top_w, 0.0).astype(out.dtype)
        return jnp.einsum("nkd,nk->nd", out, w)

    def _dropless_expert_parallel(self, x, mask, top_w, top_i, mesh, rules):
        """Dropless with experts split over the `expert` mesh axis (shard_map): every device gathers the
        routed tokens of its expert group, runs its E/ep experts on the assignments that chose them, and a
        reduce-scatter returns each device's token rows summed over the group's experts."""
        ep = mesh.shape["expert"]
        if self.cfg.num_experts % ep:
            raise ValueError(f"model.num_experts={self.cfg.num_experts} is not divisible by mesh.expert={ep}")
        batch_axes = shd.batch_axes(mesh)
        if x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
            raise ValueError(f"MoE: batch {x.shape[0]} not divisible by the batch shards {batch_axes} of the mesh")
        row = P(batch_axes)
        linears = self.experts.linears()
        kernels = [(lin.kernel[...], None if lin.bias is None else lin.bias[...]) for lin in linears]
        kernel_specs = [(P("expert"), None if b is None else P("expert")) for _, b in kernels]
        local_e = self.cfg.num_experts // ep

        def body(x, mask, top_w, top_i, kernels):
            b, t, d = x.shape
            gather = lambda a: jax.lax.all_gather(a.reshape(b * t, *a.shape[2:]), "expert", tiled=True)
            xs, ms, ws, ids = gather(x), gather(mask), gather(top_w), gather(top_i)
            first = jax.lax.axis_index("expert") * local_e
            y = self._grouped_ffn(xs, ms, ws, ids, kernels, first_expert=first)  # [ep*b*t, D] partial sums
            y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
            return y.reshape(b, t, d)

        fn = jax.shard_map(body, mesh=mesh, in_specs=(row, row, row, row, kernel_specs), out_specs=row,
                           check_vma=False)
        return fn(x, mask, top_w, top_i, kernels)
