"""The attention core: the three kernels agree on every mask kind, values and gradients; masks mean what they say."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models.attention import AttentionMask, attend
from llmjax.models.layers import relative_position_bucket

B, T, S, N, H = 2, 37, 29, 4, 8


def _qkv(key, t, s, n, kvh, h=H):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, t, n, h)), jax.random.normal(kk, (B, s, kvh, h)),
            jax.random.normal(kv, (B, s, kvh, h)))


def _mask(kind, t, s, rng):
    """Masks of every kind on random lengths / segments."""
    pos_q = np.tile(np.arange(t), (B, 1))
    pos_k = np.tile(np.arange(s), (B, 1))
    seg_q, seg_k = np.ones((B, t), np.int32), np.ones((B, s), np.int32)
    prefix = None
    causal = kind in ("causal", "prefix", "packed_causal", "padding_causal")
    if kind.startswith("padding"):
        seg_q[0, t - 5:] = 0
        seg_k[0, s - 5:] = 0
        seg_k[1, s - 2:] = 0
    if kind.startswith("packed"):
        assert t == s
        cuts = sorted(rng.choice(np.arange(1, t - 1), 3, replace=False))
        for b in range(B):
            seg = np.zeros(t, np.int32)
            pos = np.zeros(t, np.int32)
            start = 0
            for i, c in enumerate(list(cuts) + [t - 3]):
                seg[start:c] = i + 1
                pos[start:c] = np.arange(c - start)
                start = c
            seg_q[b], pos_q[b] = seg, pos  # last 3 tokens are padding (segment 0)
        seg_k, pos_k = seg_q.copy(), pos_q.copy()
    if kind == "prefix":
        lens = rng.integers(1, t, size=B)
        prefix = np.arange(s)[None, :] < lens[:, None]
    return AttentionMask(jnp.asarray(seg_q), jnp.asarray(seg_k), jnp.asarray(pos_q), jnp.asarray(pos_k),
                         None if prefix is None else jnp.asarray(prefix), causal=causal)


KINDS = ["bidirectional", "causal", "prefix", "padding", "padding_causal", "packed", "packed_causal", "cross"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kernels_match_reference(kind, kv_heads):
    rng = np.random.default_rng(0)
    t, s = (T, S) if kind == "cross" else (T, T)
    q, k, v = _qkv(jax.random.key(1), t, s, N, kv_heads)
    mask = _mask("padding" if kind == "cross" else kind, t, s, rng)
    ref = jax.jit(functools.partial(attend, kernel="reference", scale=0.3))(q, k, v, mask)
    assert np.isfinite(np.asarray(ref)).all()
    for kernel, kw in [("dot_product", {}), ("blockwise", dict(block_size=8)), ("blockwise", dict(block_size=16))]:
        out = jax.jit(functools.partial(attend, kernel=kernel, scale=0.3, **kw))(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5, err_msg=f"{kernel} {kw}")


@pytest.mark.parametrize("kernel", ["dot_product", "blockwise"])
def test_kernels_match_reference_with_bias_and_gradients(kernel):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(jax.random.key(2), T, T, N, 2)
    mask = _mask("packed_causal", T, T, rng)
    w = jax.random.normal(jax.random.key(3), q.shape)

    def loss(q, k, v, table, kernel):
        def bias(q_pos, kv_pos):  # T5 relative bias as a function of positions: [B, N, t, s]
            buckets = relative_position_bucket(kv_pos[:, None, :] - q_pos[:, :, None], bidirectional=True,
                                               num_buckets=32, max_distance=128)
            return jnp.take(table, buckets, axis=0).transpose(0, 3, 1, 2)

        out = attend(q, k, v, mask, kernel=kernel, bias=bias, scale=1.0, block_size=8)
        return jnp.sum(out * w)

    table = jax.random.normal(jax.random.key(5), (32, N))
    grad = lambda kern: jax.jit(jax.value_and_grad(functools.partial(loss, kernel=kern), argnums=(0, 1, 2, 3)))
    ref_val, ref_grads = grad("reference")(q, k, v, table)
    val, grads = grad(kernel)(q, k, v, table)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, rg, name in zip(grads, ref_grads, "qkvb"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.abs(np.asarray(ref_grads[3])).sum() > 0  # the bias table does receive gradient


@pytest.mark.parametrize("kind", ["prefix", "packed_causal", "cross"])  # causal, padding and T != S among them
def test_blockwise_flash_backward_matches_autodiff(kind):
    """Without a bias the blockwise kernel differentiates with the hand-written flash backward pass (P recomputed
    from the saved log-sum-exp, dropout masks redrawn): the same values and gradients as the reference kernel
    and, with dropout, as autodiff through the same tiles (the rematerialised path a bias takes)."""
    from llmjax.models.attention import _blockwise_remat, _flash  # the two backward passes being compared

    rng = np.random.default_rng(2)
    t, s = (T, S) if kind == "cross" else (T, T)
    q, k, v = _qkv(jax.random.key(6), t, s, N, 2)
    mask = _mask("padding" if kind == "cross" else kind, t, s, rng)
    w = jax.random.normal(jax.random.key(7), q.shape)
    grad = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
    ref = grad(lambda q, k, v: attend(q, k, v, mask, kernel="reference", scale=0.3))(q, k, v)
    flash = grad(lambda q, k, v: attend(q, k, v, mask, kernel="blockwise", scale=0.3, block_size=8))(q, k, v)
    # remat=True (the model recomputes its blocks): the flash kernel under jax.checkpoint, the same gradients
    rematted = grad(lambda q, k, v: attend(q, k, v, mask, kernel="blockwise", scale=0.3, block_size=8,
                                           remat=True))(q, k, v)
    for got, want in zip(jax.tree.leaves(flash) + jax.tree.leaves(rematted), jax.tree.leaves(ref) * 2):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    # With dropout, on inputs padded to whole blocks as blockwise_attention pads them.
    tp, sp = -(-t // 8) * 8, -(-s // 8) * 8
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q, k, v, w = pad(q, tp), pad(k, sp), pad(v, sp), pad(w, tp)
    mask = type(mask)(pad(mask.q_segment_ids, tp), pad(mask.kv_segment_ids, sp), pad(mask.q_positions, tp),
                      pad(mask.kv_positions, sp), None if mask.kv_prefix is None else pad(mask.kv_prefix, sp),
                      causal=mask.causal)
    key = jax.random.key(8)
    dropped = grad(lambda q, k, v: _flash(0.3, 0.25, 8, 8, q, k, v, mask, key))(q, k, v)
    autodiff = grad(lambda q, k, v: _blockwise_remat(q, k, v, mask, None, scale=0.3, bq=8, bk=8, rate=0.25,
                                                     rng=key))(q, k, v)
    for got, want in zip(jax.tree.leaves(dropped), jax.tree.leaves(autodiff)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.asarray(dropped[1][0])[:, :t], np.asarray(flash[1][0]))  # dropout did act


def test_mask_semantics():
    """Spot-check the dense mask against the rules written in AttentionMask's docstring."""
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    prefix = jnp.array([[True, True, False, True, False, False]])
    m = np.asarray(AttentionMask(seg, seg, pos, pos, prefix, causal=True).dense()[0])
    expect = np.array([
        [1, 1, 0, 0, 0, 0],  # token 0 sees the prefix of its own segment (0, 1)
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # segment 2 starts; its prefix is token 3 only
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],  # padding sees nothing
    ], bool)
    np.testing.assert_array_equal(m, expect)
    bidir = np.asarray(AttentionMask(seg, seg, pos, pos, None, causal=False).dense()[0])
    assert bidir[0, 2] and not bidir[0, 3] and not bidir[:, 5].any()


def test_attention_dropout_changes_output_and_keeps_expectation():
    q, k, v = _qkv(jax.random.key(4), 16, 16, N, N)
    mask = _mask("bidirectional", 16, 16, np.random.default_rng(0))
    base = attend(q, k, v, mask, kernel="reference", scale=0.3)
    for kernel in ("reference", "blockwise"):
        one = lambda key: attend(q, k, v, mask, kernel=kernel, scale=0.3, block_size=8, dropout_rate=0.3,
                                 dropout_rng=key)
        outs = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), 200))  # 200 dropout draws at once
        assert not np.allclose(outs[0], base) and not np.allclose(outs[0], outs[1])
        # Inverted dropout is unbiased: the mean over many draws approaches the deterministic output.
        np.testing.assert_allclose(np.mean(outs, 0), base, atol=0.15)


def _autodiff_attention(q, k, v, mask, bias, scale):
    """The textbook formula on [B, T, N, H], differentiated by JAX: the reference kernel's hand-written
    backward pass must give the same gradients."""
    g = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # query head n uses kv head n // g
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) * scale
    if bias is not None:
        s = s + bias
    allowed = mask.dense()[:, None]
    p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
    o = jnp.einsum("bnts,bsnh->btnh", p, vr)
    return jnp.where(mask.dense().any(-1)[:, :, None, None], o, 0.0)


@pytest.mark.parametrize("kind, kv_heads, length", [(kind, kvh, T) for kind in KINDS for kvh in (4, 1)] + [
    # 128 tokens: causal masks take the query-block path (2 blocks of 64)
    (kind, 2, 128) for kind in ("causal", "packed_causal", "padding_causal")])
def test_reference_kernel_values_and_gradients_match_autodiff(kind, kv_heads, length):
    rng = np.random.default_rng(3)
    t, s = (length, S) if kind == "cross" else (length, length)
    q, k, v = _qkv(jax.random.key(5), t, s, N, kv_heads)
    mask = _mask("padding" if kind == "cross" else kind, t, s, rng)
    bias = 0.5 * jax.random.normal(jax.random.key(6), (1, N, t, s))  # a learned bias: it gets a gradient too
    w = jax.random.normal(jax.random.key(7), q.shape)
    for b in (None, bias):
        def loss(fn, q, k, v, b):
            return jnp.sum(fn(q, k, v, b) * w)
        kernel = lambda q, k, v, b: attend(q, k, v, mask, kernel="reference", bias=b, scale=0.3)
        plain = lambda q, k, v, b: _autodiff_attention(q, k, v, mask, b, 0.3)
        argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)
        got = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums))(q, k, v, b)
        want = jax.jit(jax.value_and_grad(functools.partial(loss, plain), argnums))(q, k, v, b)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
        for name, x, y in zip("qkvb", got[1], want[1]):
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4, err_msg=f"d{name}, bias={b is not None}")


def test_reference_kernel_gradients_with_dropout_match_finite_differences():
    """Dropout goes through the hand-written backward pass too: check it numerically, for a fixed draw."""
    from jax.test_util import check_grads

    q, k, v = _qkv(jax.random.key(8), 12, 12, N, 2, h=4)
    mask = _mask("packed_causal", 12, 12, np.random.default_rng(4))
    bias = 0.5 * jax.random.normal(jax.random.key(9), (1, N, 12, 12))
    f = lambda q, k, v, b: attend(q, k, v, mask, kernel="reference", bias=b, scale=0.5, dropout_rate=0.3,
                                  dropout_rng=jax.random.key(10))
    assert not np.allclose(f(q, k, v, bias), attend(q, k, v, mask, kernel="reference", bias=bias, scale=0.5))
    check_grads(f, (q, k, v, bias), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------- the C++ CPU kernel
def _packed_rows(b, t, rng):
    """Segment ids / positions [b, t]: row 0 one document, row 1 three packed documents and padding, row 2
    all padding, the others random packings."""
    seg, pos = np.ones((b, t), np.int32), np.tile(np.arange(t, dtype=np.int32), (b, 1))
    for r in range(1, b):
        cuts = [0, *sorted(rng.choice(np.arange(1, t - 8), 2, replace=False)), t - 7 * (r % 2)]
        for i in range(3):
            seg[r, cuts[i]:cuts[i + 1]] = i + 1
            pos[r, cuts[i]:cuts[i + 1]] = np.arange(cuts[i + 1] - cuts[i])
        seg[r, cuts[3]:] = 0
    if b > 2:
        seg[2] = 0
    return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize("mesh_sizes,b,t", [(dict(data=1), 2, 512), (dict(data=4, tensor=2), 8, 128)],
                         ids=["1-device", "8-devices"])
def test_cpu_kernel_matches_reference_values_and_gradients(mesh_sizes, b, t):
    """The C++ kernel (attention_kernel 'cpu_flash', what 'auto' picks on the CPU) against the reference: causal
    packed rows with padding, grouped-query heads, on one device and per shard on a data x tensor mesh."""
    from llmjax import sharding as shd
    from llmjax.kernels import cpu_attention

    assert cpu_attention.available()  # this machine has AVX-512 and g++: the kernel must build and load
    rng = np.random.default_rng(0)
    n, kvh = 4, 2
    q, k, v = (jax.random.normal(key, (b, t, heads, 64)) for key, heads in
               zip(jax.random.split(jax.random.key(0), 3), (n, kvh, kvh)))
    seg, pos = _packed_rows(b, t, rng)
    cot = jax.random.normal(jax.random.key(1), q.shape)

    def loss(kernel, q, k, v):
        mask = AttentionMask(seg, seg, pos, pos, None, causal=True)
        return jnp.sum(attend(q, k, v, mask, kernel=kernel, scale=0.125) * cot)

    devices = jax.devices()[:math.prod(mesh_sizes.values())]
    with jax.set_mesh(shd.make_mesh(shd.mesh_config(**mesh_sizes), devices)):
        fast = jax.jit(jax.value_and_grad(functools.partial(loss, "cpu_flash"), argnums=(0, 1, 2)))
        assert "llmjax_attention_fwd" in fast.lower(q, k, v).as_text()  # the kernel ran, not a fallback
        got = fast(q, k, v)
        out = attend(q, k, v, AttentionMask(seg, seg, pos, pos, None, causal=True), kernel="cpu_flash", scale=0.125)
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    for name, g, r in zip("qkv", got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-4, err_msg=f"d{name}")
    if b > 2:
        assert np.all(np.asarray(out)[2] == 0.0)  # an all-padding row outputs zeros
    assert np.all(np.asarray(out)[1][np.asarray(seg)[1] == 0] == 0.0)  # as do padding tokens


def test_cpu_kernel_covers_only_what_it_computes_exactly():
    """Attentions the kernel does not compute fall back to the reference (same result, no custom call)."""
    from llmjax import sharding as shd

    rng = np.random.default_rng(1)
    b, t = 2, 128
    q, k, v = (jax.random.normal(key, (b, t, 4, 64)) for key in jax.random.split(jax.random.key(2), 3))
    seg, pos = _packed_rows(b, t, rng)
    causal = AttentionMask(seg, seg, pos, pos, None, causal=True)
    cases = {
        "bidirectional": (q, k, v, AttentionMask(seg, seg, pos, pos, None, causal=False), None),
        "prefix LM": (q, k, v, AttentionMask(seg, seg, pos, pos, pos < 5, causal=True), None),
        "bias": (q, k, v, causal, jnp.zeros((1, 4, t, t))),
        "head dim 32": (q[..., :32], k[..., :32], v[..., :32], causal, None),
        "bfloat16": (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal, None),
        "T not a multiple of 64": (q[:, :100], k[:, :100], v[:, :100],
                                   AttentionMask(seg[:, :100], seg[:, :100], pos[:, :100], pos[:, :100], None,
                                                 causal=True), None),
    }
    with jax.set_mesh(shd.make_mesh(shd.mesh_config(data=1), jax.devices()[:1])):
        for name, (q1, k1, v1, mask, bias) in cases.items():
            fn = jax.jit(lambda q1, k1, v1: attend(q1, k1, v1, mask, kernel="cpu_flash", bias=bias, scale=0.125))
            assert "llmjax_attention" not in fn.lower(q1, k1, v1).as_text(), name
            ref = attend(q1, k1, v1, mask, kernel="reference", bias=bias, scale=0.125)
            np.testing.assert_allclose(np.asarray(fn(q1, k1, v1), np.float32), np.asarray(ref, np.float32),
                                       atol=1e-6, err_msg=name)


def test_cpu_kernel_without_a_compiler_falls_back_with_a_warning(tmp_path):
    """No usable C++ compiler: `available()` is False for both CPU kernels (attention, matmul) and says why;
    nothing is left in the kernel cache; the model still runs (on XLA's attention and dot)."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig()\n"
            "import jax.numpy as jnp\n"
            "from llmjax.kernels import cpu_attention as c, cpu_matmul as m\n"
            "from llmjax.models.layers import matmul\n"
            "print('available', c.available(), m.available())\n"
            "print('matmul', float(matmul(jnp.ones((4, 3)), jnp.ones((3, 2))).sum()))\n")
    env = dict(__import__("os").environ, CXX=str(tmp_path / "no-such-compiler"), LLMJAX_KERNEL_CACHE=str(tmp_path / "cache"),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "available False False" in out.stdout and "matmul 24.0" in out.stdout
    assert "CPU attention kernel unavailable" in out.stderr and "no-such-compiler" in out.stderr
    assert "CPU matmul kernel unavailable" in out.stderr
    assert not any((tmp_path / "cache").glob("*.so"))
