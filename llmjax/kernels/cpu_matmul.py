"""float32 matmuls for XLA:CPU on OpenBLAS (cpu_matmul.cc called through jax.ffi).

On this project's bench machine XLA:CPU's own dots (YNNPACK, or Eigen) reach ~250 GFLOP/s on two cores where
OpenBLAS's AVX-512 sgemm reaches ~300, and the bench step spends three quarters of its time in matmuls. The
kernel splits each matmul into one block of rows (or columns) per core, computed by a single-threaded
`scipy_cblas_sgemm` call on XLA's intra-op thread pool, and adds the bias of a Linear layer inside the GEMM
(sgemm's beta = 1 on a bias-filled output). The library comes from the scipy-openblas32 wheel (a pinned
dependency); its thread count is set to 1 on load, which touches no other library's BLAS (numpy bundles its own).

`matmul(x, w, bias)` computes x @ w (+ bias), `matmul(x, w, transpose_w=True)` x @ w.T (tied output
embeddings); both are differentiable (the backward pass is two more calls of the same kernel: dx = g op(w)^T,
dw = x^T g, or g^T x for a transposed w; the call computing dx also sums g's columns, the bias gradient).
`mlp(x, w1, b1, w2, b2, "gelu" | "relu")` is a Linear-activation-Linear MLP whose activation is applied by the
first matmul's call and whose activation gradient is applied by the call computing the hidden layer's gradient
(no XLA pass over the [rows, hidden] activations for either). The model gets them through llmjax.kernels.dispatch
on one CPU device for float32 (`usable`); everywhere else, and with LLMJAX_CPU_KERNELS=0, it uses XLA's dot.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import native

log = logging.getLogger("llmjax")

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
MAX_DIM = 2**31 - 1  # sgemm takes 32-bit ints (scipy-openblas32)
# Fewer rows than this (decoding: one row per sequence) make a matmul a matrix-vector product bound by reading w,
# which XLA's dot streams on all cores ~3x faster at one row than per-core sgemm blocks (GPT-2 small's tied
# output embedding, 154 MB: 8 vs 24 ms; benchmarks/decoding.py); from ~32 rows on they are about even.
MIN_ROWS = 32


@functools.cache
def available() -> bool:
    """Whether the kernel is built, OpenBLAS is loaded and the target is registered with XLA (logs why not, once)."""
    if not native.enabled():
        return False
    try:
        import scipy_openblas32  # loaded when the kernel is first asked for, not at import

        blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
        blas.scipy_openblas_set_num_threads(1)  # one sgemm per core, run by XLA's thread pool
        lib = native.register("cpu_matmul", FLAGS, {"llmjax_matmul": "Matmul"})
        lib.LlmjaxSetSgemm(ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p))
    except (ImportError, AttributeError, OSError, RuntimeError) as e:
        log.warning("llmjax CPU matmul kernel unavailable (%s); using XLA's dot", e)
        return False
    return True


def usable(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul(x, w, ...)` should run on the kernel here: 2-D float32 operands with no empty or
    oversized dimension, at least MIN_ROWS rows of x (fewer: XLA's dot is faster), traced for one CPU device (the
    kernel is not partitioned), and the kernel available."""
    return (x.ndim == 2 and w.ndim == 2 and x.dtype == jnp.float32 and w.dtype == jnp.float32
            and 0 < min(*x.shape, *w.shape) and max(*x.shape, *w.shape) <= MAX_DIM and x.shape[0] >= MIN_ROWS
            and native.platform() == "cpu" and native.one_device() and available())


# cpu_matmul.cc's `epilogue` attribute: an activation applied to the output (keeping the pre-activation), or
# the gradient through that activation applied to the output, given the saved pre-activation.
EPILOGUES = {None: 0, "gelu": 1, "relu": 2, "gelu_grad": 3, "relu_grad": 4}
ACTIVATIONS = ("gelu", "relu")  # the activations `mlp` applies inside its matmuls: exact GELU and ReLU


def _call(a, b, bias=None, *, trans_a: bool = False, trans_b: bool = False, epilogue: str | None = None,
          aux=None, sum_a: bool = False):
    """(C, U, S): C = op(a) op(b) (+ bias) through `epilogue`, U the pre-activation (empty unless the epilogue is an
    activation), S the column sums of `a` (empty unless sum_a)."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    empty = jnp.zeros((0,), jnp.float32)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    keeps_pre = epilogue in ACTIVATIONS
    return jax.ffi.ffi_call("llmjax_matmul", (f32(m, n), f32(m, n) if keeps_pre else f32(0),
                                              f32(a.shape[1]) if sum_a else f32(0)))(
        a, b, empty if bias is None else bias, empty if aux is None else aux,
        trans_a=trans_a, trans_b=trans_b, epilogue=np.int64(EPILOGUES[epilogue]), sum_a=sum_a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x, w, bias, transpose_w):
    return _call(x, w, bias, trans_b=transpose_w)[0]


def _matmul_fwd(x, w, bias, transpose_w):
    return _matmul(x, w, bias, transpose_w), (x, w, bias is not None)


def _matmul_bwd(transpose_w, res, g):
    x, w, has_bias = res
    dx, _, db = _call(g, w, trans_b=not transpose_w, sum_a=has_bias)  # g w^T (g w for a transposed w); sum of g
    dw = _call(g, x, trans_a=True)[0] if transpose_w else _call(x, g, trans_a=True)[0]  # g^T x | x^T g
    return dx, dw, db if has_bias else None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, transpose_w: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or w.T for w [N, K] with transpose_w) + bias [N], float32, on one CPU device."""
    native.require(available(), "matmul")
    return _matmul(x, w, bias, transpose_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mlp(x, w1, b1, w2, b2, activation):
    return _mlp_fwd(x, w1, b1, w2, b2, activation)[0]


def _mlp_fwd(x, w1, b1, w2, b2, activation):
    h, u, _ = _call(x, w1, b1, epilogue=activation)
    y = _call(h, w2, b2)[0]
    return y, (x, w1, w2, u, h, b1 is not None, b2 is not None)


def _mlp_bwd(activation, res, g):
    x, w1, w2, u, h, has_b1, has_b2 = res
    du, _, db2 = _call(g, w2, trans_b=True, epilogue=f"{activation}_grad", aux=u, sum_a=has_b2)  # (g w2^T) act'(u)
    dw2 = _call(h, g, trans_a=True)[0]
    dx, _, db1 = _call(du, w1, trans_b=True, sum_a=has_b1)
    dw1 = _call(x, du, trans_a=True)[0]
    return dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array, b2: jax.Array | None, activation: str
        ) -> jax.Array:
    """act(x [M, D] @ w1 [D, F] + b1) @ w2 [F, D] + b2 with act "gelu" (exact) or "relu", float32, on one CPU
    device: the activation is applied by the first matmul's kernel call and its gradient by the call computing
    the gradient of the hidden layer, so neither is a pass of its own; the bias gradients are summed by the
    calls that read the output gradients."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"cpu_matmul.mlp: activation {activation!r} is not one of {ACTIVATIONS}")
    native.require(available(), "matmul")
    return _mlp(x, w1, b1, w2, b2, activation)
