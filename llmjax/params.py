"""Parameter trees by path: the one home of how llmjax names a leaf ('decoder/layers/0/mlp/wi/kernel'),
flattens and nests trees by that name, writes values into an nnx.State and builds a model from given values."""

from __future__ import annotations

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
    """The model of `model_cfg` with the parameters `values` ({path: array}); the others (new heads, adapters)
    initialised as build_model would. Only those are compiled and drawn: an eager or whole random init costs
    seconds even for tiny models."""
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
