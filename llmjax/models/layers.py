"""Building blocks shared by every family: Linear (with optional LoRA), embeddings, norms, MLPs, positions.

Every parameter carries `logical_axes` metadata (names such as 'embed', 'heads', 'mlp', 'vocab');
llmjax.sharding maps those names to mesh axes, so parallelism is a config change only.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import sharding as shd
from llmjax.kernels import dispatch
from llmjax.models.config import ACTIVATIONS, ModelConfig

Shape = tuple[int, ...]


def dtype_of(name: str):
    return jnp.dtype(name)


def _as_shape(x: int | Sequence[int]) -> Shape:
    return (x,) if isinstance(x, int) else tuple(x)


def matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, transpose_w: bool = False) -> jax.Array:
    """x [rows, K] @ w [K, N] (w [N, K] transposed with transpose_w) + bias [N]."""
    y = dispatch.matmul(x, w, bias, transpose_w=transpose_w)  # a kernel, where one runs faster than XLA's dot
    if y is not None:
        return y
    y = x @ (w.T if transpose_w else w)
    return y if bias is None else y + bias


def shard_batch(x: jax.Array) -> jax.Array:
    """Keep an activation's leading (batch) dimension split over the batch mesh axes, and the sequence dimension
    of [B, T, ...] activations over the `context` axis (context parallelism), leaving the other dimensions to
    the compiler. Only under a mesh context (jax.set_mesh); a no-op otherwise.

    Without it GSPMD may follow the FSDP-sharded weights instead ('embed' over fsdp) and replicate the batch:
    every chip then holds the whole batch's MLP activations and logits."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim == 0:
        return x
    axes = shd.batch_axes(mesh)
    if axes and x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    context = mesh.shape.get("context", 1)
    by_length = x.ndim >= 3 and context > 1 and x.shape[1] % context == 0
    if not axes and not by_length:
        return x
    rest = [jax.sharding.PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)
    if by_length:
        rest[0] = "context"
    first = (axes if len(axes) > 1 else axes[0]) if axes else jax.sharding.PartitionSpec.UNCONSTRAINED
    spec = jax.sharding.PartitionSpec(first, *rest)
    return jax.lax.with_sharding_constraint(x, spec)


def normal_init(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


class Linear(nnx.Module):
    """y = x W + b with W of shape `in_shape + out_shape` (e.g. [D, N, H] for a query projection),
    computed as one 2-D matmul [rows, prod(in)] @ [prod(in), prod(out)] (`matmul`), which runs fastest.

    With `lora_rank > 0` the base weight is frozen (no gradient flows into it) and a low-rank update
    (alpha / rank) * x A B is added, with B zero-initialised so the adapted layer starts equal to the base.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        use_bias: bool,
        init_std: float,
        dtype: str = "float32",
        param_dtype: str = "float32",
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = _as_shape(in_shape), _as_shape(out_shape)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"Linear: {len(axes)} axis names for a kernel of rank {len(self.in_shape) + len(self.out_shape)}")
        self.dtype = dtype_of(dtype)
        pdt = dtype_of(param_dtype)
        key = rngs.params()
        self.kernel = nnx.Param(normal_init(init_std)(key, self.in_shape + self.out_shape, pdt), logical_axes=tuple(axes))
        out_axes = tuple(axes[len(self.in_shape):])
        self.bias = nnx.Param(jnp.zeros(self.out_shape, pdt), logical_axes=out_axes) if use_bias else None
        self.lora_rank = lora_rank
        if lora_rank:
            n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
            self.lora_scale = lora_alpha / lora_rank
            self.lora_a = nnx.LoRAParam(
                # Drawn from the kernel's key, so adding adapters leaves every base weight's init unchanged.
                normal_init(1.0 / math.sqrt(n_in))(jax.random.fold_in(key, 1), (n_in, lora_rank), pdt),
                logical_axes=(None, None),
            )
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, n_out), pdt), logical_axes=(None, None))
        else:
            self.lora_a = self.lora_b = None

    def rows(self, x: jax.Array) -> jax.Array:
        """x [..., *in_shape] -> [rows, prod(in_shape)] in the compute dtype."""
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"Linear expects trailing dims {self.in_shape}, got input of shape {x.shape}")
        return x.reshape(-1, math.prod(self.in_shape)).astype(self.dtype)

    def operands(self) -> tuple[jax.Array, jax.Array | None]:
        """The layer as one 2-D matmul's operands in the compute dtype: (kernel [prod(in), prod(out)], bias
        [prod(out)] or None); with LoRA the frozen base kernel (the adapter's term is `__call__`'s)."""
        k_in, k_out = math.prod(self.in_shape), math.prod(self.out_shape)
        w = self.kernel[...]
        if self.lora_rank:
            w = jax.lax.stop_gradient(w)  # frozen base: only the adapter trains
        bias = None if self.bias is None else self.bias[...].reshape(k_out).astype(self.dtype)
        return w.reshape(k_in, k_out).astype(self.dtype), bias

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = self.rows(x)  # [rows, in]
        y = matmul(x2, *self.operands())  # [rows, out]
        if self.lora_rank:
            a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
            y = y + ((x2 @ a) @ b) * self.lora_scale
        return shard_batch(y.reshape(*lead, *self.out_shape))

    def merged_kernel(self) -> jax.Array:
        """The base kernel with the LoRA update folded in (for merging adapters)."""
        w = self.kernel[...]
        if not self.lora_rank:
            return w
        delta = (self.lora_a[...] @ self.lora_b[...]) * self.lora_scale
        return w + delta.reshape(w.shape).astype(w.dtype)


def matmul_side_by_side(x: jax.Array, layers: Sequence[Linear]) -> jax.Array | None:
    """The outputs of Linear layers that read the same input x (e.g. the q, k and v projections of self-attention)
    side by side, [rows, sum of their output sizes], from one matmul on their kernels side by side where a kernel
    runs that (`dispatch.matmul_side_by_side`); None elsewhere, and for layers that cannot share one matmul (LoRA,
    other input shapes or dtypes, a bias on some only)."""
    first = layers[0]
    x2 = first.rows(x)
    if len(layers) < 2 or any(m.lora_rank or m.in_shape != first.in_shape or m.dtype != first.dtype
                              or (m.bias is None) != (first.bias is None) for m in layers):
        return None
    ws, biases = zip(*(m.operands() for m in layers))
    return dispatch.matmul_side_by_side(x2, ws, None if first.bias is None else biases)


def linear_group(x: jax.Array, layers: Sequence[Linear]) -> list[jax.Array]:
    """[layer(x) for layer in layers], from one matmul where `matmul_side_by_side` applies."""
    y = matmul_side_by_side(x, layers)
    if y is None:
        return [m(x) for m in layers]
    lead, out, start = x.shape[: x.ndim - len(layers[0].in_shape)], [], 0
    for m in layers:
        size = math.prod(m.out_shape)
        out.append(shard_batch(y[:, start:start + size].reshape(*lead, *m.out_shape)))
        start += size
    return out


def sharded_take(table: jax.Array, ids: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """table[ids] for a table with logical `axes` and batch-sharded ids [B, ...], under a step's mesh as one
    shard_map: each device gathers the table (as FSDP gathers every weight) and looks up its own rows. Its
    backward pass is a local scatter-add and a reduction of the table's gradient over the devices, as for
    every other weight; left to GSPMD, the scatter-add would gather every row's gradient [B, T, D] from all
    batch shards (across slices too). Outside a mesh (decoding, tests): jnp.take."""
    layout = shd.current_layout()
    if layout is None:
        return jnp.take(table, ids, axis=0)
    mesh, rules = layout
    batch_axes = shd.batch_axes(mesh)
    if not batch_axes or ids.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        return jnp.take(table, ids, axis=0)
    spec = shd.logical_to_spec(axes, table.shape, rules, mesh)

    def local(t, i):
        for dim, names in enumerate(spec):
            if names is not None:
                t = jax.lax.all_gather(t, names, axis=dim, tiled=True)
        return jnp.take(t, i, axis=0)

    rows = jax.sharding.PartitionSpec(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, rows), out_specs=rows, check_vma=False)(table, ids)


class Embed(nnx.Module):
    """A [num, D] table: lookup by id, and `attend` for logits tied to the table."""

    def __init__(self, num: int, dim: int, *, axes=("vocab", "embed"), init_std: float, dtype, param_dtype, rngs):
        self.dtype = dtype_of(dtype)
        self.axes = tuple(axes)
        self.embedding = nnx.Param(
            normal_init(init_std)(rngs.params(), (num, dim), dtype_of(param_dtype)), logical_axes=self.axes
        )

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return shard_batch(sharded_take(self.embedding[...], ids, self.axes).astype(self.dtype))

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        table = self.embedding[...].astype(self.dtype)
        lead = x.shape[:-1]
        logits = matmul(x.reshape(-1, x.shape[-1]).astype(self.dtype), table, transpose_w=True)
        return shard_batch(logits.reshape(*lead, table.shape[0]))


def _normalize_fwd(x, scale, bias, eps: float, center: bool):
    if center:
        x = x - jnp.mean(x, -1, keepdims=True)
    r = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)
    xhat = x * r
    y = xhat * scale
    return (y if bias is None else y + bias), (xhat, r, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, center: bool) -> jax.Array:
    """LayerNorm (center=True) or RMSNorm of float32 x over the last axis, times scale (+ bias).

    The backward pass is written out, dx = r * (g*s - mean(g*s) - xhat * mean(g*s*xhat)) (no mean term for
    RMSNorm), which takes XLA two passes over x where autodiff takes five."""
    return _normalize_fwd(x, scale, bias, eps, center)[0]


def _normalize_bwd(eps, center, res, g):
    xhat, r, scale, bias = res
    gs = g * scale
    dx = gs - xhat * jnp.mean(gs * xhat, -1, keepdims=True)
    if center:
        dx = dx - jnp.mean(gs, -1, keepdims=True)
    lead = tuple(range(g.ndim - 1))
    dbias = None if bias is None else jnp.sum(g, lead)
    return r * dx, jnp.sum(g * xhat, lead), dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm (T5/Llama: no mean subtraction, no offset), computed in float32."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None):
        dim = dim or cfg.d_model
        pdt = dtype_of(cfg.param_dtype)
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, dtype_of(cfg.dtype)
        self.scale = nnx.Param(jnp.ones((dim,), pdt), logical_axes=("embed",))
        with_bias = cfg.norm == "layernorm" and cfg.norm_bias
        self.bias = nnx.Param(jnp.zeros((dim,), pdt), logical_axes=("embed",)) if with_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        y = normalize(x.astype(jnp.float32), self.scale[...].astype(jnp.float32), bias, self.eps,
                      self.kind == "layernorm")
        return y.astype(self.dtype)


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) (exact GELU, as torch.nn.functional.gelu), through erf with its derivative written out:
    jax.nn.gelu(approximate=False) goes through erfc, which made a GPT MLP's forward + backward on XLA:CPU
    about 1.7x slower."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return x * cdf, (cdf + x * pdf) * dx


def activation_fn(name: str):
    act = ACTIVATIONS[name][0]
    return {
        "relu": jax.nn.relu,
        "gelu": gelu_exact,
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }[act]


class MLP(nnx.Module):
    """Position-wise feed-forward: wo(act(wi x)), or gated wo(act(wi_0 x) * wi_1 x) (SwiGLU, GeGLU)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_init_std: float | None = None):
        lora = cfg.lora_rank if "mlp" in cfg.lora_targets else 0
        common = dict(
            use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora_rank=lora,
            lora_alpha=cfg.lora_alpha, rngs=rngs,
        )
        self.act = activation_fn(cfg.activation)
        self.act_name = ACTIVATIONS[cfg.activation][0]
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.mlp_dim, axes=("embed", "mlp"), init_std=cfg.init_std, **common)
            self.wi_1 = Linear(cfg.d_model, cfg.mlp_dim, axes=("embed", "mlp"), init_std=cfg.init_std, **common)
        else:
            self.wi = Linear(cfg.d_model, cfg.mlp_dim, axes=("embed", "mlp"), init_std=cfg.init_std, **common)
        self.wo = Linear(cfg.mlp_dim, cfg.d_model, axes=("mlp", "embed"), init_std=out_init_std or cfg.init_std, **common)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        if self.gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)  # [B, T, F]
            return self.wo(h)
        if not (self.wi.lora_rank or self.wo.lora_rank):  # a kernel may apply the activation inside its matmuls
            y = dispatch.mlp(self.wi.rows(x), *self.wi.operands(), *self.wo.operands(), self.act_name)
            if y is not None:
                return shard_batch(y.reshape(x.shape))
        return self.wo(self.act(self.wi(x)))


def sinusoidal_embedding(positions: jax.Array, dim: int, max_timescale: float = 10000.0) -> jax.Array:
    """[B, T] integer positions -> [B, T, dim] float32: sin on the first half of the channels, cos on the second."""
    half = dim // 2
    inv_freq = jnp.exp(-math.log(max_timescale) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on [B, T, N, H] with [B, T] positions, rotating the two halves of the
    head dimension against each other (the Llama / GPT-NeoX layout), computed in float32."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of key_position - query_position: exact buckets for small distances, logarithmic
    buckets up to max_distance, one bucket beyond; with `bidirectional` half the buckets are for keys
    after the query."""
    ret = jnp.zeros_like(relative_position)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n > 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = -jnp.minimum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_safe = jnp.maximum(n, max_exact).astype(jnp.float32)  # log of 0 never evaluated where it matters
    large = max_exact + (
        jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """T5 relative position bias: a [buckets, N] table, owned by a layer stack and shared by its layers."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embedding = nnx.Param(
            normal_init(cfg.init_std)(rngs.params(), (cfg.relative_buckets, cfg.num_heads), dtype_of(cfg.param_dtype)),
            logical_axes=(None, "heads"),
        )

    def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
        """[B, T] and [B, S] positions -> [B, N, T, S] float32 bias."""
        rel = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # [B, T, S, N]
        return bias.transpose(0, 3, 1, 2)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
