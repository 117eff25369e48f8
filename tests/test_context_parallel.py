"""Context parallelism: the sequence dimension of activations split over the `context` mesh axis, attention as
each shard's queries against the gathered keys and values. Same losses and parameters as one device, for every
family (causal with RoPE and packed documents, a bidirectional encoder with learned positions, T5 with its
relative bias and cross-attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding as shd
from llmjax.models.transformer import build_model
from llmjax.step import model_loss

from test_train import run_losses, synthetic_batches, tiny_cfg

CASES = {
    "decoder": tiny_cfg(),
    "encoder": tiny_cfg(family="encoder", position="learned", norm_position="post", activation="gelu",
                        num_kv_heads=None, tie_embeddings=True),
    "encoder_decoder": tiny_cfg(family="encoder_decoder", position="relative", num_kv_heads=None),
}


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_context_parallel_steps_equal_one_device():
    """The decoder (RoPE, packed documents, padding) with context=4, and data=2 x context=4, against one device:
    losses and parameters after 3 steps within 1e-5. The other families' gradients: below."""
    cfg = CASES["decoder"]
    batches = synthetic_batches(3)
    one, s1, _ = run_losses(cfg, shd.mesh_config(data=1), batches, devices=jax.devices()[:1])
    for mesh in (dict(data=1, context=4), dict(data=2, context=4)):
        devices = jax.devices()[: mesh["data"] * mesh["context"]]
        split, s2, (_, _, _, _, m) = run_losses(cfg, shd.mesh_config(**mesh), batches, devices=devices)
        assert m.shape["context"] == 4
        np.testing.assert_allclose(split, one, rtol=0, atol=1e-5, err_msg=str(mesh))
        for a, b in zip(_leaves(s1), _leaves(s2)):  # the updates, i.e. the gradients, agree too
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=str(mesh))


@pytest.mark.parametrize("family,mesh", [("decoder", dict(data=2, context=4)), ("encoder", dict(data=2, context=4)),
                                         ("encoder_decoder", dict(data=2, context=2, tensor=2))])
def test_context_parallel_gradients_equal_one_device(family, mesh):
    """The loss's gradients themselves, for every family: a bidirectional encoder with learned positions, T5 with
    its relative bias and cross-attention (Adam's updates would hide a gradient off by a constant factor)."""
    cfg = CASES[family]
    batch = {k: jnp.asarray(v) for k, v in synthetic_batches(1, family=family)[0].items()}
    graphdef, params, rest = nnx.split(build_model(cfg, 0), nnx.Param, ...)

    def loss(p, b):
        return model_loss(nnx.merge(graphdef, p, rest, copy=True), b, deterministic=True)[0]

    one = jax.jit(jax.grad(loss))(params, batch)
    m = shd.make_mesh(shd.mesh_config(**mesh))

    def split(p, b):
        with shd.activation_layout(m, shd.rules_dict(shd.DEFAULT_RULES)):
            return jax.grad(loss)(p, b)

    with jax.set_mesh(m):
        many = jax.jit(split)(params, batch)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-5)  # float32: |grad| ~36


def test_attention_memory_per_device_falls_with_the_context_size():
    """Compiled temporaries of one causal attention layer (forward + backward) at 8k tokens with the reference
    kernel, whose [B, N, T/c, S] scores dominate: halved by each doubling of the context axis; far less with the
    blockwise kernel, still falling with the context size
    (benchmarks/context_memory.py; the tables in docs/scaling.md)."""
    from benchmarks.context_memory import attention_temp_bytes  # noqa: E402 (the benchmark's own measurement)

    temp = {c: attention_temp_bytes(8192, c, kernel="reference") for c in (1, 2, 4, 8)}
    assert temp[4] < 0.55 * temp[2] and temp[8] < 0.55 * temp[4], temp
    assert temp[8] < temp[1] / 3, temp
    # The blockwise kernel (flash backward: no [T, S] residuals) at 16k: the queries' share halves with c=2,
    # and even one device needs less than the reference kernel split 8 ways at half the length.
    flash = {c: attention_temp_bytes(16384, c, kernel="blockwise") for c in (1, 2)}
    assert flash[2] < 0.65 * flash[1] and flash[1] < temp[8] / 2, (flash, temp)


def test_lengths_must_split_over_the_context_axis():
    from llmjax.models.config import ConfigError  # noqa: E402

    mesh = shd.make_mesh(shd.mesh_config(data=2, context=4))
    with pytest.raises(ConfigError, match=r"train.seq_length=18 is not divisible by mesh.context=4"):
        shd.validate_layout(tiny_cfg(), mesh, 8, seq_length=18)
    shd.validate_layout(tiny_cfg(), mesh, 8, seq_length=16)
