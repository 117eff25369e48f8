"""Device mesh from config and the one table mapping logical axis names to mesh axes.

Parameters carry `logical_axes` metadata ('embed', 'heads', 'mlp', ...); `rules` (config.sharding.rules)
map each name to a mesh axis ('data', 'fsdp', 'tensor', 'expert') or None. Changing parallelism is a
config change only.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.models.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")  # context: the sequence dimension of activations
# Batch rows are split over every axis that holds a different slice of the data.
BATCH_AXES = ("data", "fsdp", "expert")
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("expert", "expert"),
    ("layers", None),  # the stacked blocks of a scanned stack (model.scan_layers)
)


DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)


def mesh_config(**sizes) -> ml_collections.ConfigDict:
    """The `mesh` section: a size per axis within a slice (one size may be -1 to take the remaining devices),
    and `dcn_<axis>`, how many slices that axis spans over the data-centre network (1 = none)."""
    d = {a: 1 for a in MESH_AXES}
    d.update(data=-1)
    d.update({a: 1 for a in DCN_AXES})
    d.update(sizes)
    return ml_collections.ConfigDict(d)


def sharding_config() -> ml_collections.ConfigDict:
    """The `sharding` section: `rules`, logical axis -> mesh axis (or None), as lists for ml_collections."""
    return ml_collections.ConfigDict({"rules": [list(r) for r in DEFAULT_RULES]})


def dcn_shape(mesh_cfg) -> dict[str, int]:
    """{axis: slices it spans} (mesh.dcn_<axis>; configs from before multi-slice meshes have none: 1)."""
    out = {}
    for a in MESH_AXES:
        s = mesh_cfg.get(f"dcn_{a}", 1)
        if not isinstance(s, int) or s < 1:
            raise ConfigError(f"mesh.dcn_{a}: the number of slices the {a!r} axis spans must be a positive integer, "
                              f"got {s!r}")
        out[a] = s
    return out


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """{axis: size within one slice} for `num_devices` devices in all (mesh.dcn_* slices of equal size)."""
    unknown = set(mesh_cfg.keys()) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)}; the mesh axes are {', '.join(MESH_AXES)} (and "
                          f"{', '.join(DCN_AXES)} for the slices)")
    slices = math.prod(dcn_shape(mesh_cfg).values())
    if num_devices % slices:
        raise ConfigError(f"mesh: the dcn_* axes ask for {slices} slices, which does not divide the {num_devices} "
                          "devices; set them so their product is the number of slices")
    num_devices //= slices
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}  # a config from before an axis existed: size 1
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a}: size must be a positive integer or -1, got {s}")
    where = f"{num_devices} devices" + (f" of each of the {slices} slices" if slices > 1 else "")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"mesh: the fixed axes ({', '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)}) multiply to "
                f"{known}, which does not divide the {where}; change them so their product divides {num_devices}")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"mesh: {' x '.join(f'{a}={s}' for a, s in sizes.items())} = {known} devices, but there are {where}; "
            f"make the product {num_devices} or set one axis (e.g. mesh.data) to -1")
    return sizes


def _slices(devices: list, n: int) -> list[list]:
    """The devices of each of n slices: by the TPU's slice_index, or (devices without one: CPUs, GPUs) in n
    equal groups of consecutive processes' devices, which is how hosts are grouped then."""
    if all(hasattr(d, "slice_index") for d in devices):
        found = sorted({d.slice_index for d in devices})
        if len(found) != n:
            raise ConfigError(f"mesh: the dcn_* axes ask for {n} slices, but the devices are in {len(found)}; set "
                              f"their product to {len(found)}")
        return [[d for d in devices if d.slice_index == s] for s in found]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    per = len(ordered) // n
    return [ordered[i * per:(i + 1) * per] for i in range(n)]


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh of the `mesh` section. With slices (mesh.dcn_*), each axis is dcn x ici long and only the
    dcn part crosses slices: a device's index along an axis is its slice's index times the ici size plus its
    index within the slice."""
    devices = list(devices if devices is not None else jax.devices())
    sizes, dcn = resolve_mesh_shape(mesh_cfg, len(devices)), dcn_shape(mesh_cfg)
    # Auto axes: XLA propagates shardings through reshapes and einsums (GSPMD), the model stays mesh-agnostic.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    ici_shape, dcn_shape_ = tuple(sizes[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)
    if math.prod(dcn_shape_) > 1:
        groups = _slices(devices, math.prod(dcn_shape_))
        if all(hasattr(d, "slice_index") for d in devices):  # TPU slices: JAX places each slice by its topology
            grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape_, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=auto)
        grid = np.empty(tuple(i * d for i, d in zip(ici_shape, dcn_shape_)), dtype=object)
        for s, group in enumerate(groups):
            at = np.unravel_index(s, dcn_shape_)
            block = tuple(slice(k * i, (k + 1) * i) for k, i in zip(at, ici_shape))
            grid[block] = np.asarray(group, dtype=object).reshape(ici_shape)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if devices == list(jax.devices()):
        return jax.make_mesh(ici_shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(ici_shape), MESH_AXES, axis_types=auto)


def rules_dict(rules: Iterable) -> dict[str, Any]:
    out = {}
    for item in rules:
        name, target = item[0], item[1]
        if name in out and out[name] != target:
            raise ConfigError(
                f"sharding.rules: logical axis {name!r} is mapped twice ({out[name]!r} and {target!r}); keep one")
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                raise ConfigError(f"sharding.rules: {name!r} -> {t!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        out[name] = target
    return out


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: dict, mesh: Mesh, what: str = "") -> P:
    """PartitionSpec for an array with these logical axes. Size-1 mesh axes are left out (they shard
    nothing and only clutter the spec); a dimension that the mapped mesh axes do not divide is an error."""
    used: dict[str, str] = {}
    spec = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if mesh.shape[t] > 1)
        for t in targets:
            if t in used:
                raise ConfigError(
                    f"sharding.rules: {what or 'an array'} has logical axes {used[t]!r} and {name!r} both mapped to "
                    f"mesh axis {t!r}; an array dimension can use a mesh axis only once — map one of them elsewhere")
            used[t] = name
        size = math.prod(mesh.shape[t] for t in targets)
        if size > 1 and dim % size:
            raise ConfigError(
                f"sharding: {what or 'an array'} dimension {name!r} of size {dim} is not divisible by mesh axes "
                f"{'x'.join(targets)} = {size}; change the mesh (e.g. mesh.{targets[0]}) or map {name!r} to None "
                f"in sharding.rules")
        spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, rules: dict):
    """NamedShardings for an nnx.State of Variables whose metadata has `logical_axes` (others replicate)."""

    def one(path, var):
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        value = var.value if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", ())
        if axes is None or len(shape) == 0:
            spec = P()
        else:
            spec = logical_to_spec(axes, shape, rules, mesh, what="/".join(map(str, path)))
        sharding = NamedSharding(mesh, spec)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------------- activations
# (mesh, rules) while a step is traced; modules pin chosen activations with `constrain`. Unset (a plain
# forward pass, decoding, a test without a mesh) every constraint is a no-op.
_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("llmjax_activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(mesh: Mesh | None, rules: dict | None):
    """Within this block (around the tracing of a step), `constrain` places activations on `mesh`."""
    token = _LAYOUT.set(None if mesh is None or rules is None else (mesh, dict(rules)))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def current_layout() -> tuple[Mesh, dict] | None:
    return _LAYOUT.get()


def activation_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict) -> P:
    """PartitionSpec of an activation from logical names. 'batch' takes every batch mesh axis (data, fsdp,
    expert) that no other dimension of the array uses, so [expert, batch, ...] tensors of an MoE layer put
    experts on `expert` and rows on the rest (XLA inserts the all-to-all). A dimension the mesh axes do not
    divide is left unsharded (activations never fail the layout)."""
    used: set[str] = set()
    spec: list = [None] * len(axes)
    for pass_batch in (False, True):
        for i, (name, dim) in enumerate(zip(axes, shape)):
            if name is None or (name == "batch") != pass_batch:
                continue
            if name == "batch":
                targets = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1 and a not in used)
            else:
                target = rules.get(name)
                targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
                targets = tuple(t for t in targets if mesh.shape[t] > 1 and t not in used)
            if not targets or dim % math.prod(mesh.shape[t] for t in targets):
                continue
            used.update(targets)
            spec[i] = targets[0] if len(targets) == 1 else targets
    return P(*spec)


def constrain(x, axes: Sequence[str | None]):
    """with_sharding_constraint by logical axis names under `activation_layout`; otherwise x unchanged."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(axes, x.shape, mesh, rules)))


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch mesh axes (data, fsdp, expert) that split something on this mesh (size > 1)."""
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    axes = batch_axes(mesh)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def validate_layout(model_cfg, mesh: Mesh, global_batch_size: int, micro_batches: int = 1,
                    seq_length: int | None = None):
    """Fail at start, with the fix, on layouts that cannot work."""
    c = mesh.shape.get("context", 1)
    if seq_length is not None and c > 1 and seq_length % c:
        raise ConfigError(
            f"train.seq_length={seq_length} is not divisible by mesh.context={c}; context parallelism splits every "
            f"sequence into {c} equal parts: use a length that is a multiple of {c}")
    n = batch_shards(mesh)
    per_micro = global_batch_size // max(micro_batches, 1)
    if global_batch_size % max(micro_batches, 1):
        raise ConfigError(
            f"train.batch_size={global_batch_size} is not divisible by train.micro_batches={micro_batches}")
    if per_micro % n:
        raise ConfigError(
            f"train.batch_size: each micro-batch has {per_micro} rows, not divisible by the {n} batch shards "
            f"(mesh data x fsdp x expert = {' x '.join(str(mesh.shape[a]) for a in BATCH_AXES)}); "
            f"use a batch size that is a multiple of {n * max(micro_batches, 1)}")
    e = mesh.shape["expert"]
    if getattr(model_cfg, "num_experts", 0) and model_cfg.num_experts % e:
        raise ConfigError(
            f"mesh.expert={e} does not divide model.num_experts={model_cfg.num_experts}; expert parallelism gives "
            f"each device of the expert axis the same number of experts, so choose mesh.expert among the divisors "
            f"of {model_cfg.num_experts}")
    t = mesh.shape["tensor"]
    if model_cfg.num_heads % t:
        raise ConfigError(
            f"mesh.tensor={t} does not divide model.num_heads={model_cfg.num_heads}; tensor parallelism splits "
            f"attention heads, so choose mesh.tensor among the divisors of {model_cfg.num_heads}")


def describe(abstract_state, state_sh) -> str:
    """One line per parameter: path, shape and resolved PartitionSpec (logged at start-up)."""
    shapes = dict(nnx.to_flat_state(abstract_state))
    lines = []
    for path, var in nnx.to_flat_state(state_sh):
        shape = tuple(shapes[path].get_value().shape)
        lines.append(f"  {'/'.join(map(str, path)):56s} {str(shape):>16s} {var.get_value().spec}")
    return "\n".join(lines)


def sync(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
