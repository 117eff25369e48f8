"""float32 matmuls for XLA:CPU on OpenBLAS (cpu_matmul.cc called through jax.ffi).

On this project's bench machine XLA:CPU's own dots (YNNPACK, or Eigen) reach ~250 GFLOP/s on two cores where
OpenBLAS's AVX-512 sgemm reaches ~300, and the bench step spends three quarters of its time in matmuls. The
kernel splits each matmul into one block of rows (or columns) per core, computed by a single-threaded
`scipy_cblas_sgemm` call on XLA's intra-op thread pool, and adds the bias of a Linear layer inside the GEMM
(sgemm's beta = 1 on a bias-filled output). The library comes from the scipy-openblas32 wheel (a pinned
dependency); its thread count is set to 1 on load, which touches no other library's BLAS (numpy bundles its own).

`matmul(x, w, bias)` computes x @ w (+ bias), `matmul(x, w, transpose_w=True)` x @ w.T (tied output
embeddings); both are differentiable (the backward pass is two more calls of the same kernel: dx = g op(w)^T,
dw = x^T g, or g^T x for a transposed w). llmjax.models.layers uses them on one CPU device for float32
(`usable`); everywhere else, and with LLMJAX_CPU_KERNELS=0, it uses XLA's dot.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import jax
import jax.numpy as jnp

from llmjax.kernels import native

log = logging.getLogger("llmjax")

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
MAX_DIM = 2**31 - 1  # sgemm takes 32-bit ints (scipy-openblas32)


@functools.cache
def available() -> bool:
    """Whether the kernel is built, OpenBLAS is loaded and the target is registered with XLA (logs why not, once)."""
    if not native.enabled():
        return False
    try:
        import scipy_openblas32

        blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
        blas.scipy_openblas_set_num_threads(1)  # one sgemm per core, run by XLA's thread pool
        lib = ctypes.cdll.LoadLibrary(str(native.build("cpu_matmul", FLAGS)))
        lib.LlmjaxSetSgemm(ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p))
        jax.ffi.register_ffi_target("llmjax_matmul", jax.ffi.pycapsule(lib.Matmul), platform="cpu")
    except (ImportError, AttributeError, OSError, RuntimeError) as e:
        log.warning("llmjax CPU matmul kernel unavailable (%s); using XLA's dot", e)
        return False
    return True


def usable(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul(x, w, ...)` should run on the kernel here: 2-D float32 operands with no empty or
    oversized dimension, traced for one CPU device (the kernel is not partitioned), and the kernel available."""
    return (x.ndim == 2 and w.ndim == 2 and x.dtype == jnp.float32 and w.dtype == jnp.float32
            and 0 < min(*x.shape, *w.shape) and max(*x.shape, *w.shape) <= MAX_DIM
            and native.platform() == "cpu" and native.one_device() and available())


def _call(a, b, bias, *, trans_a: bool = False, trans_b: bool = False):
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if bias is None:
        bias = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call("llmjax_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, bias, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x, w, bias, transpose_w):
    return _call(x, w, bias, trans_b=transpose_w)


def _matmul_fwd(x, w, bias, transpose_w):
    return _call(x, w, bias, trans_b=transpose_w), (x, w, bias is not None)


def _matmul_bwd(transpose_w, res, g):
    x, w, has_bias = res
    dx = _call(g, w, None, trans_b=not transpose_w)  # g w^T, or g w for a transposed w
    dw = _call(g, x, None, trans_a=True) if transpose_w else _call(x, g, None, trans_a=True)  # g^T x | x^T g
    return dx, dw, g.sum(axis=0) if has_bias else None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, transpose_w: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or w.T for w [N, K] with transpose_w) + bias [N], float32, on one CPU device."""
    return _matmul(x, w, bias, transpose_w)
