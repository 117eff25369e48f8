"""The CPU matmul kernel (llmjax.kernels.cpu_matmul, OpenBLAS through jax.ffi): values and gradients equal XLA's
dot, the model's layers use it on one CPU device, and it steps aside where it cannot run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding as shd
from llmjax.kernels import cpu_matmul
from llmjax.models.config import ModelConfig
from llmjax.models.layers import matmul
from llmjax.models.transformer import build_model


def one_device_mesh():
    return jax.set_mesh(shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1]))


@pytest.mark.parametrize("m,k,n", [(2048, 512, 512), (5, 64, 3000), (3, 7, 2), (300, 70, 17)],
                         ids=["split-rows", "split-columns", "tiny", "ragged"])
@pytest.mark.parametrize("transpose_w", [False, True], ids=["w", "w.T"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_matches_xla_dot_values_and_gradients(m, k, n, transpose_w, with_bias):
    """x @ w (+ b), or x @ w.T, and its gradients for every operand, against float64 numpy; the output is cut into
    blocks of rows (M >= N) or of columns (N > M), or not cut at all when tiny."""
    keys = jax.random.split(jax.random.key(m * n + k), 4)
    x = jax.random.normal(keys[0], (m, k))
    w = jax.random.normal(keys[1], (n, k) if transpose_w else (k, n)) / np.sqrt(k)
    b = jax.random.normal(keys[2], (n,)) if with_bias else None
    g = jax.random.normal(keys[3], (m, n))

    def loss(x, w, b):
        return jnp.sum(cpu_matmul.matmul(x, w, b, transpose_w=transpose_w) * g)

    with one_device_mesh():
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) if with_bias else (0, 1)))
        hlo = fn.lower(x, w, b).as_text()
        value, grads = fn(x, w, b)
    assert hlo.count("@llmjax_matmul(") == 3  # forward, dx and dw all ran on the kernel

    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    wk = w64.T if transpose_w else w64  # [k, n]
    y = x64 @ wk + (np.asarray(b, np.float64) if with_bias else 0.0)
    np.testing.assert_allclose(float(value), float(np.sum(y * g64)), rtol=1e-5, atol=1e-3)
    dw = x64.T @ g64
    expected = [g64 @ wk.T, dw.T if transpose_w else dw] + ([g64.sum(0)] if with_bias else [])
    for name, got, want in zip(("dx", "dw", "db"), grads, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(max(m, k)), err_msg=name)


@pytest.mark.parametrize("m,d,f", [(512, 128, 512), (64, 128, 1024), (3, 7, 5)],
                         ids=["split-rows", "split-columns", "tiny"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_mlp_with_the_activation_inside_the_matmuls(m, d, f, activation, with_bias):
    """act(x w1 + b1) w2 + b2 with exact GELU or ReLU applied by the first matmul's kernel call, its gradient by
    the call that computes the hidden layer's gradient, and the bias gradients summed by the calls that read the
    output gradients: values and gradients against float64 numpy, with pre-activations beyond +-6 (the
    GELU's erf saturates) and 6 kernel calls, no other matmul, no erf left to XLA."""
    keys = jax.random.split(jax.random.key(m + d + f), 6)
    x = jax.random.normal(keys[0], (m, d))
    w1 = 3.0 * jax.random.normal(keys[1], (d, f)) / np.sqrt(d)
    b1 = jax.random.normal(keys[2], (f,)) if with_bias else None
    w2 = jax.random.normal(keys[3], (f, d)) / np.sqrt(f)
    b2 = jax.random.normal(keys[4], (d,)) if with_bias else None
    g = jax.random.normal(keys[5], (m, d))

    def loss(x, w1, b1, w2, b2):
        return jnp.sum(cpu_matmul.mlp(x, w1, b1, w2, b2, activation) * g)

    with one_device_mesh():
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4) if with_bias else (0, 1, 3)))
        hlo = fn.lower(x, w1, b1, w2, b2).as_text()
        value, grads = fn(x, w1, b1, w2, b2)
    assert hlo.count("@llmjax_matmul(") == 6
    assert "dot_general" not in hlo and "erf" not in hlo

    x64, w164, w264, g64 = (np.asarray(a, np.float64) for a in (x, w1, w2, g))
    u = x64 @ w164 + (np.asarray(b1, np.float64) if with_bias else 0.0)
    assert u.size < 1000 or (u.min() < -6 and u.max() > 6)  # the activation is tested where erf saturates
    if activation == "gelu":
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(u / math.sqrt(2.0)))
        h, dact = u * cdf, cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    else:
        h, dact = np.maximum(u, 0.0), (u > 0).astype(np.float64)
    y = h @ w264 + (np.asarray(b2, np.float64) if with_bias else 0.0)
    np.testing.assert_allclose(float(value), float(np.sum(y * g64)), rtol=1e-5, atol=1e-3)
    du = (g64 @ w264.T) * dact
    expected = {"dx": du @ w164.T, "dw1": x64.T @ du, "db1": du.sum(0), "dw2": h.T @ g64, "db2": g64.sum(0)}
    names = ["dx", "dw1", "db1", "dw2", "db2"] if with_bias else ["dx", "dw1", "dw2"]
    for name, got in zip(names, grads):
        want = expected[name]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(max(m, f)), err_msg=name)


def test_steps_aside_where_it_cannot_run():
    """bfloat16, a mesh of several devices (a custom call is not partitioned), an empty dimension and fewer than
    MIN_ROWS rows (a decode step's matrix-vector products, faster on XLA's dot) use XLA's dot: no custom call,
    the same result."""
    x = jax.random.normal(jax.random.key(0), (64, 32))
    w = jax.random.normal(jax.random.key(1), (32, 16))
    assert cpu_matmul.available()  # this machine has g++ and the scipy-openblas32 wheel
    cases = {
        "bfloat16": (one_device_mesh, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
        "8-device mesh": (lambda: jax.set_mesh(shd.make_mesh(shd.mesh_config(data=8), jax.devices()[:8])), x, w),
        "empty rows": (one_device_mesh, x[:0], w),
        "few rows": (one_device_mesh, x[:cpu_matmul.MIN_ROWS - 1], w),
    }
    for name, (mesh, x1, w1) in cases.items():
        with mesh():
            fn = jax.jit(lambda x1, w1: matmul(x1, w1))
            assert "llmjax_matmul" not in fn.lower(x1, w1).as_text(), name
            got = fn(x1, w1)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(x1 @ w1, np.float32), rtol=1e-2 if
                                   x1.dtype == jnp.bfloat16 else 1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_decoder_trains_the_same_with_and_without_the_kernel(monkeypatch, name):
    """A small GPT (biases, tied output embedding, GELU inside the MLP's matmuls) and Llama (RoPE, grouped-query
    heads, SwiGLU, no biases, an output projection) on one CPU device: every Linear and the output logits run on
    the kernel, q, k and v as one matmul, and loss and gradients match the XLA-dot model's."""
    extra = {"gpt": dict(activation="gelu", position="learned"),
             "llama": dict(activation="swiglu", norm="rmsnorm", use_bias=False, position="rope", num_kv_heads=2,
                           tie_embeddings=False)}[name]
    cfg = ModelConfig(family="decoder", vocab_size=97, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                      max_length=32, **extra)
    model = build_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 32)))

    def loss_fn(model):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    def run():
        with one_device_mesh():
            step = nnx.jit(nnx.value_and_grad(loss_fn))
            return step.lower(model).as_text(), step(model)

    hlo, (loss, grads) = run()
    monkeypatch.setattr(cpu_matmul, "usable", lambda x, w: False)
    hlo_xla, (loss_xla, grads_xla) = run()
    # 2 layers x (q|k|v as one matmul, o, the MLP's 2 or 3) + the logits, each forward + 2 backward calls
    assert hlo.count("@llmjax_matmul(") == 3 * (2 * (4 if name == "gpt" else 5) + 1)
    assert "llmjax_matmul" not in hlo_xla
    if name == "gpt":  # the MLP's GELU and its gradient are applied inside its matmuls (cpu_matmul.mlp)
        assert "erf" not in hlo and "erf" in hlo_xla
    np.testing.assert_allclose(float(loss), float(loss_xla), rtol=1e-6)
    for (path, g), g_xla in zip(jax.tree.leaves_with_path(nnx.state(grads)), jax.tree.leaves(nnx.state(grads_xla))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_xla), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_self_attention_from_one_qkv_matmul(monkeypatch, position):
    """Causal self-attention on one CPU device, head dim 64: q, k and v come from one matmul and the C++ attention
    kernel reads them in place (packed) unless RoPE must rotate them first; either way loss and gradients match a
    model on XLA's dot and the reference attention."""
    cfg = ModelConfig(family="decoder", vocab_size=97, d_model=128, num_layers=2, num_heads=2, mlp_dim=256,
                      max_length=64, activation="gelu", position=position)
    model = build_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 65)))
    seg = jnp.asarray([[1] * 40 + [2] * 24, [1] * 50 + [0] * 14])  # two packed documents; a padded row
    pos = jnp.asarray([list(range(40)) + list(range(24)), list(range(64))])

    def loss_fn(model):
        logits = model(tokens[:, :-1], seg, pos)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * (seg > 0)) / jnp.sum(seg > 0)

    def run(model):
        with one_device_mesh():
            step = nnx.jit(nnx.value_and_grad(loss_fn))
            return step.lower(model).as_text(), step(model)

    hlo, (loss, grads) = run(model)
    assert ("@llmjax_attention_fwd_packed(" in hlo) == (position == "learned")
    assert ("@llmjax_attention_fwd(" in hlo) == (position == "rope")
    monkeypatch.setattr(cpu_matmul, "usable", lambda x, w: False)
    hlo_ref, (loss_ref, grads_ref) = run(build_model(cfg.replace(attention_kernel="reference"), 0))
    assert "llmjax_" not in hlo_ref
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    for (path, g), g_ref in zip(jax.tree.leaves_with_path(nnx.state(grads)), jax.tree.leaves(nnx.state(grads_ref))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-3, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
