"""Parameter trees by path: the one home of how llmjax names a leaf ('decoder/layers/0/mlp/wi/kernel'),
flattens and nests trees by that name, writes values into an nnx.State and builds a model from given values.

Two layouts of a layer stack: unrolled, 'decoder/layers/{i}/...' per layer, and scanned (model.scan_layers),
'decoder/blocks/{j}/...' with a leading axis over scan steps, layer i = step i // P, slot j = i % P
(P = model.scan_period). `in_layout` converts {path: array} trees between them (checkpoints, exports,
Hugging Face weights and --init-from work with either)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.models.transformer import build_model


def key_name(k) -> str:
    """'kernel' from one pytree path entry (DictKey, GetAttrKey, SequenceKey or a plain key)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'decoder/layers/0/mlp/wi/kernel' from a pytree path."""
    return "/".join(key_name(k) for k in path)


def flat_values(state) -> dict[str, Any]:
    """{'encoder/layers/0/mlp/wi/kernel': value} of an nnx.State (arrays, ShapeDtypeStructs or shardings)."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'layers': {0: {'w': x}}}} -> {'a/layers/0/w': x}."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "/"))
        else:
            flat[key] = v
    return flat


def unflatten(flat: dict[str, Any], *, int_keys: bool = True) -> dict:
    """Inverse of `flatten`; numeric path parts become int keys (as nnx lists of layers use) unless
    int_keys=False (Orbax trees, whose keys are all strings)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = [int(p) if int_keys and p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


_UNROLLED = re.compile(r"(.*/)?layers/(\d+)/(.*)")
_SCANNED = re.compile(r"(.*/)?blocks/(\d+)/(.*)")


def is_scanned_path(path: str) -> bool:
    """Whether the leaf at `path` holds a scanned stack's values (a leading axis over scan steps)."""
    return _SCANNED.fullmatch(path) is not None


def _stack(arrays):
    return np.stack(arrays) if all(isinstance(a, np.ndarray) for a in arrays) else jnp.stack(arrays)


def _layer_leaves(flat: dict[str, Any], pattern: re.Pattern) -> tuple[dict, list[tuple[str, int, str, Any]]]:
    """({path: value} of the leaves outside layer stacks, [(stack prefix, index, rest of the path, value)])."""
    others, leaves = {}, []
    for path, v in flat.items():
        m = pattern.fullmatch(path)
        if m is None:
            others[path] = v
        else:
            leaves.append((m.group(1) or "", int(m.group(2)), m.group(3), v))
    return others, leaves


def stack_layers(flat: dict[str, Any], period: int) -> dict[str, Any]:
    """Unrolled {'x/layers/{i}/rest': a} -> scanned {'x/blocks/{i % period}/rest': stack over i // period}."""
    out, leaves = _layer_leaves(flat, _UNROLLED)
    groups: dict = {}
    for prefix, i, rest, v in leaves:
        groups.setdefault((prefix, i % period, rest), {})[i // period] = v
    for (prefix, j, rest), by_step in groups.items():
        if sorted(by_step) != list(range(len(by_step))):
            raise ValueError(f"{prefix}layers: layers missing for slot {j} of scanned steps ({sorted(by_step)})")
        out[f"{prefix}blocks/{j}/{rest}"] = _stack([by_step[u] for u in range(len(by_step))])
    return out


def unstack_layers(flat: dict[str, Any]) -> dict[str, Any]:
    """Scanned {'x/blocks/{j}/rest': [U, ...]} -> unrolled {'x/layers/{u * P + j}/rest': [...]}, P the number
    of slots of that stack."""
    out, leaves = _layer_leaves(flat, _SCANNED)
    slots: dict = {}
    for prefix, j, _, _ in leaves:
        slots.setdefault(prefix, set()).add(j)
    for prefix, j, rest, v in leaves:
        period = len(slots[prefix])
        for u in range(v.shape[0]):
            out[f"{prefix}layers/{u * period + j}/{rest}"] = v[u]
    return out


def listing(names, limit: int = 8) -> str:
    """'a, b, c (+N more)': the first `limit` of `names`, sorted."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class ParamsMismatch(ValueError):
    """Given parameters that do not fit a model: the message lists the missing, unexpected or misshapen ones."""


def fitted(expected: dict[str, Any], values: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flat `values` (either layer layout) in the layout of the flat `expected` (arrays or ShapeDtypeStructs),
    cast to their dtypes; the paths and every shape must match exactly (ParamsMismatch otherwise)."""
    slots = {k.split("/blocks/")[1].split("/")[0] for k in expected if is_scanned_path(k)}
    values = stack_layers(unstack_layers(values), len(slots)) if slots else unstack_layers(values)
    missing, unexpected = set(expected) - set(values), set(values) - set(expected)
    if missing or unexpected:
        raise ParamsMismatch(f"parameters do not match the llmjax model: missing {listing(missing) or '-'}; "
                             f"unexpected {listing(unexpected) or '-'}")
    bad = [f"{k} {tuple(np.shape(values[k]))} vs {tuple(expected[k].shape)}"
           for k in expected if tuple(np.shape(values[k])) != tuple(expected[k].shape)]
    if bad:
        raise ParamsMismatch(f"parameter shapes do not match the llmjax model (given vs model): {listing(bad)}")
    return {k: np.asarray(values[k]).astype(expected[k].dtype) for k in expected}


def in_layout(flat: dict[str, Any], model_cfg) -> dict[str, Any]:
    """{path: array} of either layout in the layout of `model_cfg` (scanned or unrolled)."""
    if model_cfg.scan_layers:
        return stack_layers(unstack_layers(flat), model_cfg.scan_period)  # also re-slots another period's steps
    return unstack_layers(flat)


def set_params(state_params, values: dict[str, Any]) -> None:
    """Write `values` (by path) into the Variables of an nnx.State, keeping each Variable's sharding."""
    for p, var in nnx.to_flat_state(state_params):
        key = path_str(p)
        if key in values:
            old = var.get_value()
            new = values[key]
            sharding = getattr(old, "sharding", None)
            var.set_value(jax.device_put(jnp.asarray(new, old.dtype), sharding) if sharding is not None
                          else jnp.asarray(new, old.dtype))


def build_with_params(model_cfg, values: dict, seed: int = 0):
    """The model of `model_cfg` with the parameters `values` ({path: array}, either layer layout); the others
    (new heads, adapters) initialised as build_model would. Only those are compiled and drawn: an eager or whole
    random init costs seconds even for tiny models."""
    values = in_layout(values, model_cfg)
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, seed))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    fresh_names = set(flat_values(params)) - set(values)

    @jax.jit
    def fresh():
        _, p, rest = nnx.split(build_model(model_cfg, seed), nnx.Param, ...)
        return {k: v for k, v in flat_values(p).items() if k in fresh_names}, rest

    new, rest = fresh()
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
    set_params(params, {**values, **new})
    return nnx.merge(graphdef, params, rest)
